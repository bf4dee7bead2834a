"""Checks of assignment 8: a mixed-adapter batch. Reference: lora_min.model.LoRA, row by row."""
from __future__ import annotations

import torch

from grading_common import Case, Check, Failure, close, label, randn, rng, tensor
from lora_min.model import LoRA, LoRAConfig

TITLE = "a mixed batch, one adapter per row"


# -----------------------------------------------------------------------------
# Probe: run in the child, on the submission


def probe_mixed(student, x, W0, b, A, B, scale, adapter):
    return student.mixed_lora(x, W0, b, A, B, scale, adapter)


# -----------------------------------------------------------------------------
# Cases and verdicts


def reference(x, W0, b, A, B, scale, adapter) -> torch.Tensor:
    """Each row through the base layer and, unless its adapter is -1, lora_min's LoRA with that adapter."""
    rows = []
    for n, k in enumerate(adapter.tolist()):
        h = x[n] @ W0.T + b
        if k >= 0:
            r = A.shape[1]
            update = LoRA(W0.shape[1], W0.shape[0], LoRAConfig(r=r, alpha=float(scale[k]) * r, dropout=0.0))
            with torch.no_grad():
                update.A.copy_(A[k])
                update.B.copy_(B[k])
                h = h + update(x[n])
        rows.append(h)
    return torch.stack(rows)


def mixed_cases(name: str, what: str, K: tuple[int, int], same_scale: bool, rows, n: int = 12,
                big: bool = False) -> list[Case]:
    """rows(random, N, K) -> the adapter of each row."""
    random, cases = rng(name), []
    for _ in range(n):
        N, T, n_in, n_out = random.randint(1, 5), random.randint(1, 4), random.randint(1, 12), random.randint(1, 12)
        n_adapters, r, seed = random.randint(*K), random.randint(1, 4), random.randrange(2**31)
        scale = torch.full((n_adapters,), 2.0) if same_scale else torch.tensor(
            [random.choice([0.5, 2.0, 4.0, 16.0]) for _ in range(n_adapters)])
        adapter = torch.tensor(rows(random, N, n_adapters))
        inputs = dict(x=randn(seed, N, T, n_in), W0=randn(seed + 1, n_out, n_in), b=randn(seed + 2, n_out),
                      A=randn(seed + 3, n_adapters, r, n_in), B=randn(seed + 4, n_adapters, n_out, r) * 0.1,
                      scale=scale, adapter=adapter)
        if big:  # x tiny, A and B huge: any B[k] A[k] overflows float32, x A^T B^T does not
            inputs.update(x=inputs["x"] * 1e-30, A=inputs["A"] * 1e20, B=inputs["B"] * 1e21)

        def verify(got, inputs=inputs):
            if big:  # only the overflow is judged here: the formula has its own checks
                got = tensor(got, "output")
                if got.shape != inputs["x"].shape[:2] + (inputs["W0"].shape[0],):
                    raise Failure(f"output of shape {tuple(got.shape)}")
                if not torch.isfinite(got).all():
                    raise Failure("the output overflowed where x A^T B^T does not: it formed B[k] A[k]; "
                                  "multiply x by A[k]^T first")
                if not got.abs().max() > 1:
                    raise Failure("the output ignored the LoRA update (x A^T B^T is ~1e11 here)")
                return
            close(got, reference(**inputs), what)
        cases.append(Case(label(N=N, T=T, n_in=n_in, n_out=n_out, r=r, scale=scale.tolist(), adapter=adapter.tolist(),
                                seed=seed), probe_mixed, inputs, verify))
    return sorted(cases, key=lambda case: case.inputs["x"].numel() * case.inputs["W0"].numel())


def one_adapter_cases() -> list[Case]:
    return mixed_cases("one_adapter", "every row under the one adapter", (1, 1), False,
                       lambda random, N, K: [0] * N)


def mixed_rows_cases() -> list[Case]:
    return mixed_cases("mixed_rows", "each row under its own adapter", (2, 4), True,
                       lambda random, N, K: [random.randrange(K) for _ in range(N)])


def own_scale_cases() -> list[Case]:
    return mixed_cases("own_scale", "rows under an adapter with its own scale", (2, 4), False,
                       lambda random, N, K: [K - 1] * N)


def no_adapter_cases() -> list[Case]:
    return mixed_cases("no_adapter", "rows with adapter -1 (base layer only) among others", (1, 3), True,
                       lambda random, N, K: [-1] + [random.randrange(-1, K) for _ in range(N - 1)])


def never_forms_BA_cases() -> list[Case]:
    return mixed_cases("never_forms_BA", "the output with large A and B", (1, 1), False,
                       lambda random, N, K: [0] * N, n=6, big=True)


CHECKS = [
    Check("one adapter for every row: W0 x + b + scale B A x", 2, one_adapter_cases),
    Check("a mixed batch: each row under its own adapter", 3, mixed_rows_cases),
    Check("each adapter is scaled by its own alpha / r", 1, own_scale_cases),
    Check("rows with adapter -1 get the base layer only", 1, no_adapter_cases),
    Check("never forms the (out, in) matrix B[k] A[k]", 1, never_forms_BA_cases),
]
