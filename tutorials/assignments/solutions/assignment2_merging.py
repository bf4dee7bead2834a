"""Assignment 2: merging and unmerging a LoRA update (Hu et al., 2021, §4.1).

After training, the update (alpha / r) * B A can be added into W0 once; the layer then costs
exactly what the pretrained layer costs (no extra inference latency). Unmerging takes it out
again, to train further or to switch to another task's adapter.

Fill in the two methods marked YOUR CODE HERE (replace the `raise NotImplementedError` line).
`forward` is given: it skips the update while the layer is merged. Check your work with

    python grade.py assignment2 assignment2_merging.py

Tutorial chapter 3 (tutorials/03_merging.md) explains why the half-precision rule matters.
"""
import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, which can be merged into it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for param in self.base.parameters():
            param.requires_grad = False
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)  # as nn.Linear does
        self.merged = False  # True while scale * B A is inside base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if not self.merged:
            h = h + (x @ self.A.T @ self.B.T) * self.scale
        return h

    @torch.no_grad()
    def merge(self) -> None:
        """Add scale * B A into self.base.weight (in place) and set self.merged.

        * Merging a layer that is already merged must change nothing.
        * The weight may be float16 or bfloat16: compute W0 + scale * B A in float32, then
          round the result once to the weight's dtype (and keep that dtype).
        """
        # BEGIN SOLUTION
        if self.merged:
            return
        weight = self.base.weight
        delta = self.scale * (self.B.float() @ self.A.float())
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True
        # END SOLUTION

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scale * B A from self.base.weight and clear self.merged.

        Unmerging a layer that is not merged must change nothing. Same precision rule as merge.
        """
        # BEGIN SOLUTION
        if not self.merged:
            return
        weight = self.base.weight
        delta = self.scale * (self.B.float() @ self.A.float())
        weight.copy_((weight.float() - delta).to(weight.dtype))
        self.merged = False
        # END SOLUTION
