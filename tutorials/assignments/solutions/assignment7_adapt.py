"""Assignment 7: adapt a pretrained model, with LoRA or by full fine-tuning (Hu et al., 2021, §4).

The paradigm LoRA is made for: pretrain once, then adapt to a downstream task. Full
fine-tuning trains every weight of the pretrained model (and must store a whole copy per
task); LoRA freezes them all and trains only the small matrices A and B of each adapted
projection (the paper's §4.2 adapts W_q and W_v). Tutorial chapter 4
(tutorials/04_pretrain_then_adapt.md) does both on a toy GPT that sorts digits.

Fill in the two functions marked YOUR CODE HERE (replace the `raise NotImplementedError`
line). Keep every name and signature. Check your work with

    python grade.py assignment7 assignment7_adapt.py
"""
import torch
import torch.nn as nn

from lora_min.data import masked_lm_loss
from lora_min.model import GPT


def trainable_parameters(model: GPT, method: str) -> list[nn.Parameter]:
    """Prepare `model` for `method` and return the parameters to train, each once.

    "full": every parameter trains (GPT-2's embedding wte is also its LM head: one tensor).
    "lora": only the LoRA matrices train (named like "h.0.attn.lora.q.A"); every pretrained
            weight is frozen (requires_grad False), so it gets no gradient and never changes.
    """
    # BEGIN SOLUTION
    for name, param in model.named_parameters():
        param.requires_grad = method == "full" or ".lora." in name
    return [param for param in model.parameters() if param.requires_grad]  # parameters() yields a tied one once
    # END SOLUTION


def adapt(model: GPT, params: list[nn.Parameter], input_ids: torch.Tensor, targets: torch.Tensor,
          loss_mask: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Train `params` in place for `steps` steps on the whole batch, and return the loss before each step.

    One step: loss = masked_lm_loss(model(input_ids), targets, loss_mask); its gradient;
    one step of torch.optim.AdamW(params, lr=lr, weight_decay=0.0) (one optimizer for all steps).
    """
    # BEGIN SOLUTION
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = masked_lm_loss(model(input_ids), targets, loss_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
    # END SOLUTION
