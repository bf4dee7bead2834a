"""Checks of assignment 2: merging and unmerging. Reference: W0 + (alpha/r) B A formed here."""
from __future__ import annotations

import torch
import torch.nn as nn

from grading_common import Case, Check, Failure, close, equal, label, randn, rng, tensor

TITLE = "merging and unmerging"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -----------------------------------------------------------------------------
# Probes: run in the child, on the submission


def trained_layer(student, W0, b, A, B, r, alpha, dtype):
    base = nn.Linear(W0.shape[1], W0.shape[0])
    layer = student.LoRALinear(base, r, alpha)
    with torch.no_grad():
        base.weight.copy_(W0)
        base.bias.copy_(b)
        layer.A.copy_(A)
        layer.B.copy_(B)
    return layer.to(DTYPES[dtype])


@torch.no_grad()
def probe_merge(student, W0, b, A, B, r, alpha, x, dtype):
    """Merge, then merge again: the weight, flag and output after each."""
    layer = trained_layer(student, W0, b, A, B, r, alpha, dtype)
    before = layer(x.to(layer.base.weight.dtype))
    layer.merge()
    merged = {"W": layer.base.weight.clone(), "flag": layer.merged, "out": layer(x.to(layer.base.weight.dtype))}
    layer.merge()
    return {"before": before, "merged": merged, "W_twice": layer.base.weight.clone()}


@torch.no_grad()
def probe_unmerge(student, W0, b, A, B, r, alpha, x, dtype, merge_first):
    layer = trained_layer(student, W0, b, A, B, r, alpha, dtype)
    before = layer(x)
    if merge_first:
        layer.merge()
    layer.unmerge()
    return {"before": before, "W": layer.base.weight.clone(), "flag": layer.merged, "out": layer(x)}


# -----------------------------------------------------------------------------
# Cases and verdicts


def layers(name: str, n: int = 14):
    random = rng(name)
    yield 1, 1, 1, 1.0, 0, (1,)
    for _ in range(n - 1):
        yield (random.randint(1, 24), random.randint(1, 24), random.randint(1, 6), round(random.uniform(0.5, 64), 2),
               random.randrange(2**31), tuple(random.randint(1, 4) for _ in range(random.randint(1, 3))))


def make_cases(name: str, probe, verify, dtypes=("float32",), **extra) -> list[Case]:
    cases = []
    for (n_in, n_out, r, alpha, seed, leading), dtype in zip(layers(name), [*dtypes] * 14):
        inputs = dict(W0=randn(seed, n_out, n_in), b=randn(seed + 1, n_out), A=randn(seed + 2, r, n_in),
                      B=randn(seed + 3, n_out, r) * 0.1, r=r, alpha=alpha, x=randn(seed + 4, *leading, n_in),
                      dtype=dtype, **extra)
        cases.append(Case(label(n_in=n_in, n_out=n_out, r=r, alpha=alpha, seed=seed, dtype=dtype), probe, inputs,
                          lambda out, inputs=inputs: verify(out, **inputs)))
    return cases


def merged_weight(W0, A, B, r, alpha, dtype: torch.dtype) -> torch.Tensor:
    """W0 + (alpha/r) B A formed in float32 from the layer's (rounded) tensors, rounded once."""
    W0, A, B = (t.to(dtype).float() for t in (W0, A, B))
    return (W0 + (alpha / r) * (B @ A)).to(dtype)


def merge_keeps_outputs_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, dtype):
        if out["merged"]["flag"] is not True:
            raise Failure("merge() must set self.merged = True")
        close(out["merged"]["W"], merged_weight(W0, A, B, r, alpha, torch.float32), "merged weight vs W0 + (alpha/r) B A")
        close(out["merged"]["out"], tensor(out["before"], "output"), "output after merging", atol=1e-4)
    return make_cases("merge_keeps_outputs", probe_merge, verify)


def merge_twice_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, dtype):
        equal(out["W_twice"], tensor(out["merged"]["W"], "merged weight"),
              "merging a merged layer changed the weight: it must change nothing")
    return make_cases("merge_twice", probe_merge, verify)


def unmerge_restores_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, dtype, merge_first):
        if out["flag"] is not False:
            raise Failure("unmerge() must set self.merged = False")
        close(out["W"], W0, "weight after merge + unmerge", atol=1e-5)
        close(out["out"], tensor(out["before"], "output"), "output after merge + unmerge", atol=1e-4)
    return make_cases("unmerge_restores", probe_unmerge, verify, merge_first=True)


def unmerge_unmerged_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, dtype, merge_first):
        equal(out["W"], W0, "unmerging a layer that is not merged changed the weight: it must change nothing")
    return make_cases("unmerge_unmerged", probe_unmerge, verify, merge_first=False)


def half_precision_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, dtype):
        W = tensor(out["merged"]["W"], "merged weight")
        if W.dtype != DTYPES[dtype]:
            raise Failure(f"merge changed the weight's dtype from {dtype} to {str(W.dtype).split('.')[-1]}")
        equal(W, merged_weight(W0, A, B, r, alpha, DTYPES[dtype]),
              "in half precision, form W0 + (alpha/r) B A in float32 and round once to the weight's dtype")
    return make_cases("half_precision", probe_merge, verify, dtypes=("float16", "bfloat16"))


CHECKS = [
    Check("merge folds (alpha/r) B A into W0 and keeps the outputs", 3, merge_keeps_outputs_cases),
    Check("merging a merged layer changes nothing", 1, merge_twice_cases),
    Check("unmerge restores W0 and the outputs", 2, unmerge_restores_cases),
    Check("unmerging an unmerged layer changes nothing", 1, unmerge_unmerged_cases),
    Check("half precision: the sum is formed in float32 and rounded once", 2, half_precision_cases),
]
