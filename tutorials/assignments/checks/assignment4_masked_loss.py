"""Checks of assignment 4: the masked, label-smoothed loss. Reference: lora_min.data.masked_lm_loss.

Each check varies one thing: the formulas are checked with every position in the mask, the
mask with no label smoothing in the way, so one bug costs the points of the check that names it.
"""
from __future__ import annotations

import ast
import math

import torch

from grading_common import Case, Check, Failure, close, label, rng, tensor
from lora_min.data import masked_lm_loss

TITLE = "the masked, label-smoothed loss"


# -----------------------------------------------------------------------------
# Probes: run in the child, on the submission


def probe_loss(student, logits, targets, mask, eps):
    return student.masked_lm_loss(logits, targets, mask, eps)


def probe_outside_mask(student, logits, targets, mask, eps, changed_logits, changed_targets):
    """The gradient of the loss, and the loss again after changing every position outside the mask."""
    logits = logits.clone().requires_grad_()
    loss = student.masked_lm_loss(logits, targets, mask, eps)
    loss.backward()
    with torch.no_grad():
        changed = student.masked_lm_loss(changed_logits, changed_targets, mask, eps)
    return {"loss": loss, "grad": logits.grad, "changed": changed}


# -----------------------------------------------------------------------------
# Cases and verdicts


def loss_inputs(name: str, n: int, full_mask: bool, scale: float = 3.0, smoothing: bool = False):
    """n (label, inputs) pairs; a partial mask keeps at least one position."""
    random = rng(name)
    for i in range(n):
        B, T, V, seed = random.randint(1, 4), random.randint(1, 8), random.randint(2, 30), random.randrange(2**31)
        if i == 0:
            B, T, V = 1, 1, 2  # the smallest: one sequence of one token
        eps = round(random.uniform(0.05, 0.5), 3) if smoothing else 0.0
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(B, T, V, generator=g) * scale
        targets = torch.randint(0, V, (B, T), generator=g)
        keep = 1.0 if full_mask else random.uniform(0.2, 0.9)
        mask = torch.rand(B, T, generator=g) < keep
        mask[seed % B, seed % T] = True
        fields = dict(B=B, T=T, V=V, positions_in_mask=int(mask.sum()), label_smoothing=eps, seed=seed)
        yield label(**fields), dict(logits=logits, targets=targets, mask=mask, eps=eps)


def loss_cases(name: str, n: int, full_mask: bool, what: str, scale: float = 3.0, smoothing: bool = False,
               atol: float = 1e-5) -> list[Case]:
    def verify(got, logits, targets, mask, eps):
        close(got, masked_lm_loss(logits, targets, mask, eps), what, atol=atol)
    return [Case(text, probe_loss, inputs, lambda got, inputs=inputs: verify(got, **inputs))
            for text, inputs in loss_inputs(name, n, full_mask, scale, smoothing)]


def plain_cases() -> list[Case]:
    return loss_cases("plain", 14, full_mask=True, what="loss without label smoothing, every position in the mask")


def smoothed_cases() -> list[Case]:
    return loss_cases("smoothed", 14, full_mask=True, smoothing=True,
                      what="loss with label smoothing, every position in the mask")


def outside_mask_cases() -> list[Case]:
    cases = []
    for text, inputs in loss_inputs("outside_mask", 14, full_mask=False):
        logits, targets, mask = inputs["logits"], inputs["targets"], inputs["mask"]
        changed = logits.clone()
        changed[~mask] = 100.0  # whatever the prompt and padding positions hold
        inputs.update(changed_logits=changed, changed_targets=torch.where(mask, targets, 0))

        def verify(out, mask=mask):
            grad = tensor(out["grad"], "the gradient of the logits")
            if grad.shape == mask.shape + grad.shape[-1:] and grad[~mask].abs().sum() > 0:
                raise Failure("positions outside the mask got a gradient: select the masked positions only")
            if not torch.isfinite(tensor(out["loss"], "loss")).all():
                raise Failure(f"the loss is {out['loss'].item()}; is the selection empty (a mean over no tokens)?")
            close(out["changed"], out["loss"].detach(),
                  "the loss changed when only positions outside the mask changed")
        cases.append(Case(text, probe_outside_mask, inputs, verify))
    return cases


def per_token_mean_cases() -> list[Case]:
    cases = loss_cases("per_token_mean", 12, full_mask=False, what="loss with some positions outside the mask")
    # Row 0 has one token in the loss with NLL log(4), row 1 three tokens with NLL ~0: the mean
    # over tokens is log(4) / 4, the mean of the per-row means is log(4) / 2.
    logits = torch.zeros(2, 3, 4)
    logits[1, :, 0] = 50.0
    mask = torch.tensor([[True, False, False], [True, True, True]])

    def verify(got):
        got = float(tensor(got, "loss"))
        if abs(got - math.log(4) / 2) < 1e-4:
            raise Failure(f"got {got:.4f}, the mean of the per-sequence means; expected {math.log(4) / 4:.4f}, "
                          "the mean over all tokens in the mask")
        if not abs(got - math.log(4) / 4) < 1e-4:
            raise Failure(f"got {got:.4f}, expected {math.log(4) / 4:.4f}")
    cases.insert(0, Case("one token in row 0, three in row 1", probe_loss,
                         dict(logits=logits, targets=torch.zeros(2, 3, dtype=torch.long), mask=mask, eps=0.0), verify))
    return cases


FORBIDDEN = ("cross_entropy", "nll_loss", "CrossEntropyLoss", "NLLLoss")


def no_cross_entropy(source: str) -> None:
    """Read by the grader from the file: the loss is written from log-probabilities."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return  # the file does not import: its cases failed already
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name in FORBIDDEN:
            raise Failure(f"line {node.lineno} uses {name}: write the loss from log-probabilities (log_softmax)")


def from_log_probs_cases() -> list[Case]:
    return loss_cases("from_log_probs", 6, full_mask=True, what="loss")


def stable_cases() -> list[Case]:
    def verify(got, logits, targets, mask, eps):
        if isinstance(got, torch.Tensor) and got.numel() == 1 and not torch.isfinite(got).all():
            raise Failure(f"the loss is {got.item()} for logits of size ~1000, where the answer is finite: "
                          "log(softmax) underflows to log(0) there, log_softmax does not "
                          "(if ordinary logits fail too, start there)")
        close(got, masked_lm_loss(logits, targets, mask, eps), "loss for logits of size ~1000", atol=1e-2)
    return [Case(text + ", logits ~1000", probe_loss, inputs, lambda got, inputs=inputs: verify(got, **inputs))
            for text, inputs in loss_inputs("stable", 10, full_mask=True, scale=1000.0)]


CHECKS = [
    Check("without smoothing: mean cross-entropy over the tokens", 2, plain_cases),
    Check("with label smoothing: (1 - eps) NLL + eps * mean of -log p", 3, smoothed_cases),
    Check("positions outside the mask have no effect and no gradient", 2, outside_mask_cases),
    Check("with a partial mask: the mean over all its tokens, not per sequence", 1, per_token_mean_cases),
    Check("written from log-probabilities, not F.cross_entropy", 1, from_log_probs_cases, no_cross_entropy),
    Check("numerically stable for large logits", 1, stable_cases),
]
