"""Assignment 1: the LoRA layer (Hu et al., 2021, §4.1, Eq. 3).

A pretrained linear layer computes h = W0 x + b. LoRA freezes W0 and b and learns a low-rank
change of the weight, written as a product of two thin matrices:

    h = W0 x + b + (alpha / r) * B A x        A: (r, in_features), B: (out_features, r)

Fill in the two methods marked YOUR CODE HERE (replace the `raise NotImplementedError` line).
Keep every name and signature; add helpers if you like. Check your work with

    python grade.py assignment1 assignment1_lora_layer.py

Tutorial chapter 2 (tutorials/02_the_lora_layer.md) explains everything this needs.
"""
import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update of its weight."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for param in self.base.parameters():
            param.requires_grad = False  # W0 and b are frozen: only A and B learn
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.empty(base.out_features, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise A and B in place (use torch.nn.init) so that

        1. a fresh LoRALinear computes exactly what `base` computes, and
        2. the first gradient step changes the layer (some gradient is non-zero).
        Hint: the gradient of B A x with respect to A is zero when B is zero, and vice versa.
        """
        # BEGIN SOLUTION
        # As nn.Linear initialises its weight (and microsoft/LoRA its A); the paper says "random
        # Gaussian", any small random init works. B = 0 makes B A = 0 at the start.
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        nn.init.zeros_(self.B)
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), any number of leading dimensions.

        Compute the update as two thin products, x A^T then (x A^T) B^T, never the full
        (out_features, in_features) matrix B A: that is what makes LoRA cheap to train.
        """
        # BEGIN SOLUTION
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale
        # END SOLUTION
