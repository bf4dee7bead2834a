"""Assignment 8: a mixed batch, every row under its own adapter (Hu et al., 2021, §4.2).

One frozen model can serve many tasks: each task is a small adapter (A, B), and a batch may
mix requests of different tasks. Merging cannot do that (W0 holds one update at a time), but
the unmerged form can: row n adds its own adapter's update,

    h[n] = W0 x[n] + b + scale[k] * B[k] A[k] x[n]        k = adapter[n]

Tutorial chapter 6 (tutorials/06_many_tasks_one_model.md) serves three tasks this way.

Fill in the function marked YOUR CODE HERE (replace the `raise NotImplementedError` line).
Do it for the whole batch at once (index the stacked adapters with `adapter`), without a
Python loop over rows, and never form the (out, in) matrix B[k] A[k]. Check your work with

    python grade.py assignment8 assignment8_mixed_batch.py
"""
import torch


def mixed_lora(x: torch.Tensor, W0: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scale: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
    """A frozen linear layer plus, for each row, the LoRA update of that row's adapter.

    x: (N, T, in); W0: (out, in); b: (out,)
    A: (K, r, in), B: (K, out, r), scale: (K,): K adapters of rank r and their alpha / r
    adapter: (N,) integers: which adapter row n uses, -1 for none (the base layer alone)
    Returns (N, T, out).
    """
    # BEGIN SOLUTION
    h = x @ W0.T + b  # (N, T, out)
    k = adapter.clamp(min=0)  # -1 picks adapter 0 here; its update is dropped below
    update = (x @ A[k].transpose(1, 2)) @ B[k].transpose(1, 2) * scale[k][:, None, None]  # (N, T, out)
    return torch.where((adapter >= 0)[:, None, None], h + update, h)
    # END SOLUTION
