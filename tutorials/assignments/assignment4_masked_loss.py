"""Assignment 4: the masked, label-smoothed language-model loss (Hu et al., 2021, Table 11).

Fine-tuning on E2E trains the model to write the reference text given the meaning
representation, so the loss counts only the reference tokens: `loss_mask` is True there and
False on the prompt and the padding. The paper trains with label smoothing 0.1: the target
distribution puts 1 - eps on the right token and spreads eps evenly over the whole vocabulary,
so per token

    loss = (1 - eps) * (-log p[target]) + eps * mean over v of (-log p[v])

and the batch loss is the mean of that over every token in the mask (all sequences together:
a long reference counts more than a short one, as in microsoft/LoRA).

Fill in the function marked YOUR CODE HERE (replace the `raise NotImplementedError` line).
Write it from log-probabilities (torch.log_softmax), not with F.cross_entropy. Check with

    python grade.py assignment4 assignment4_masked_loss.py
"""
import torch


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """logits: (B, T, V); targets: (B, T) token ids; loss_mask: (B, T) bool. Returns a scalar."""
    raise NotImplementedError  # YOUR CODE HERE
