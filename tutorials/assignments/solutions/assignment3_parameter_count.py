"""Assignment 3: counting trainable parameters (Hu et al., 2021, §4.2 and Table 4).

LoRA's headline: GPT-3 175B has 175 billion parameters, LoRA on W_q and W_v trains 18 million
(10,000 times fewer). Here you count, for GPT-2 as lora-min builds it (lora_min/model.py):

* every block has LayerNorm ln_1 (weight and bias), attention c_attn (n_embd -> 3 n_embd, with
  bias) and c_proj (n_embd -> n_embd, with bias), LayerNorm ln_2, and an MLP c_fc
  (n_embd -> 4 n_embd, with bias) and c_proj (4 n_embd -> n_embd, with bias);
* the model has token embeddings wte (vocab_size x n_embd), position embeddings wpe
  (block_size x n_embd), and a final LayerNorm ln_f; the LM head *is* wte (weight tying);
* LoRA adds, for every target in `targets` (each an n_embd x n_embd projection: "q", "k",
  "v" or "o") in every block, A: (r, n_embd) and B: (n_embd, r).

Fill in the three functions marked YOUR CODE HERE (replace the `raise NotImplementedError`
line). Check your work with

    python grade.py assignment3 assignment3_parameter_count.py
"""
import torch.nn as nn


def count_trainable(model: nn.Module) -> int:
    """The number of parameters of `model` that receive gradients (requires_grad).

    A parameter used in two places (GPT-2's tied embedding and LM head) counts once.
    """
    # BEGIN SOLUTION
    # model.parameters() yields each parameter object once, even when it is shared.
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
    # END SOLUTION


def lora_parameter_count(n_layer: int, n_embd: int, r: int, targets: tuple[str, ...]) -> int:
    """How many parameters LoRA of rank r on `targets` trains in a GPT-2 of this shape."""
    # BEGIN SOLUTION
    return n_layer * len(targets) * (r * n_embd + n_embd * r)
    # END SOLUTION


def gpt2_parameter_count(n_layer: int, n_embd: int, vocab_size: int = 50257, block_size: int = 1024) -> int:
    """How many parameters a GPT-2 of this shape has, without LoRA (gpt2 small: 124,439,808)."""
    # BEGIN SOLUTION
    layer_norm = 2 * n_embd
    attention = (n_embd * 3 * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd)
    mlp = (n_embd * 4 * n_embd + 4 * n_embd) + (4 * n_embd * n_embd + n_embd)
    block = 2 * layer_norm + attention + mlp
    embeddings = vocab_size * n_embd + block_size * n_embd
    return embeddings + n_layer * block + layer_norm
    # END SOLUTION
