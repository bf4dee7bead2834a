"""Checks of assignment 1: the LoRA layer (init and forward). Reference: lora_min.model.LoRA."""
from __future__ import annotations

from unittest import mock

import torch
import torch.nn as nn

from grading_common import Case, Check, Failure, close, label, randn, rng, tensor
from lora_min.model import LoRA, LoRAConfig

TITLE = "the LoRA layer"


# -----------------------------------------------------------------------------
# Probes: run in the child, on the submission


def base_layer(W0: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    base = nn.Linear(W0.shape[1], W0.shape[0], bias=b is not None)
    with torch.no_grad():
        base.weight.copy_(W0)
        if b is not None:
            base.bias.copy_(b)
    return base


def probe_fresh(student, W0, b, r, alpha, x):
    """A fresh layer: its A and B, its output on x, and the gradients of one backward pass."""
    layer = student.LoRALinear(base_layer(W0, b), r, alpha)
    A, B = layer.A.detach().clone(), layer.B.detach().clone()
    with torch.no_grad():
        out = layer(x)
    layer(x).pow(2).sum().backward()
    return {"A": A, "B": B, "out": out, "grad_B": layer.B.grad, "base_has_grad": layer.base.weight.grad is not None}


def probe_forward(student, W0, b, A, B, r, alpha, x, upstream):
    """A layer holding the given A and B (as if trained): output, and gradients of (out * upstream).sum()."""
    with mock.patch.object(student.LoRALinear, "reset_parameters", lambda self: None):  # grade forward alone
        layer = student.LoRALinear(base_layer(W0, b), r, alpha)
    with torch.no_grad():
        layer.A.copy_(A)
        layer.B.copy_(B)
    out = layer(x)
    (out * upstream).sum().backward()
    return {"out": out, "grad_A": layer.A.grad, "grad_B": layer.B.grad}


# -----------------------------------------------------------------------------
# Cases and verdicts: chosen and judged by the grader


def reference(W0, b, A, B, r, alpha) -> tuple[nn.Linear, LoRA]:
    update = LoRA(W0.shape[1], W0.shape[0], LoRAConfig(r=r, alpha=alpha, dropout=0.0))
    with torch.no_grad():
        update.A.copy_(A)
        update.B.copy_(B)
    return base_layer(W0, b), update


def layer_shapes(name: str, n: int = 16):
    """n (n_in, n_out, r, alpha, seed, leading dims of x, bias), the small ones first."""
    random = rng(name)
    yield 1, 1, 1, 1.0, 0, (1,), True
    yield 3, 2, 4, 16.0, 1, (2, 3), False  # r > n_in: still fine
    for _ in range(n - 2):
        yield (random.randint(1, 24), random.randint(1, 24), random.randint(1, 6), round(random.uniform(0.5, 64), 2),
               random.randrange(2**31), tuple(random.randint(1, 4) for _ in range(random.randint(1, 3))),
               random.random() < 0.8)


def shown(n_in, n_out, r, alpha, seed, leading, bias) -> str:
    return label(n_in=n_in, n_out=n_out, r=r, alpha=alpha, seed=seed, x_shape=(*leading, n_in), bias=bias)


def fresh_cases(name: str, verify_fresh) -> list[Case]:
    cases = []
    for n_in, n_out, r, alpha, seed, leading, bias in layer_shapes(name):
        W0, b, x = randn(seed, n_out, n_in), randn(seed + 1, n_out) if bias else None, randn(seed + 2, *leading, n_in)
        cases.append(Case(shown(n_in, n_out, r, alpha, seed, leading, bias), probe_fresh,
                          dict(W0=W0, b=b, r=r, alpha=alpha, x=x),
                          lambda out, W0=W0, b=b, x=x: verify_fresh(out, W0, b, x)))
    return cases


def init_is_base_cases() -> list[Case]:
    def verify(out, W0, b, x):
        if torch.count_nonzero(tensor(out["B"], "B")) != 0:
            raise Failure("B must start at zero (then B A = 0)")
        close(out["out"], nn.functional.linear(x, W0, b), "a fresh layer vs the base layer", atol=1e-6, rtol=0)
    return fresh_cases("init_is_base", verify)


def init_gradients_cases() -> list[Case]:
    def verify(out, W0, b, x):
        A = tensor(out["A"], "A")
        if not torch.isfinite(A).all():
            raise Failure("A must be finite")
        if torch.count_nonzero(A) == 0:
            raise Failure("A must not be zero: B would get no gradient and never move")
        if out["grad_B"] is None or torch.count_nonzero(tensor(out["grad_B"], "B's gradient")) == 0:
            raise Failure("B must get a non-zero gradient at step 0")
        if out["base_has_grad"] is not False:
            raise Failure("W0 got a gradient: it must stay frozen")
    return fresh_cases("init_gradients", verify)


def forward_cases(name: str, verify_forward) -> list[Case]:
    cases = []
    for n_in, n_out, r, alpha, seed, leading, bias in layer_shapes(name):
        inputs = dict(W0=randn(seed, n_out, n_in), b=randn(seed + 1, n_out) if bias else None,
                      A=randn(seed + 3, r, n_in), B=randn(seed + 4, n_out, r) * 0.1, r=r, alpha=alpha,
                      x=randn(seed + 5, *leading, n_in), upstream=randn(seed + 6, *leading, n_out))
        cases.append(Case(shown(n_in, n_out, r, alpha, seed, leading, bias), probe_forward, inputs,
                          lambda out, inputs=inputs: verify_forward(out, **inputs)))
    return cases


def forward_formula_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, upstream):
        base, update = reference(W0, b, A, B, r, alpha)
        with torch.no_grad():
            close(out["out"], base(x) + update(x), "forward vs W0 x + b + (alpha/r) B A x")
    return forward_cases("forward_formula", verify)


def forward_gradient_cases() -> list[Case]:
    def verify(out, W0, b, A, B, r, alpha, x, upstream):
        base, update = reference(W0, b, A, B, r, alpha)
        ((base(x) + update(x)) * upstream).sum().backward()
        close(out["grad_A"], update.A.grad, "gradient of A", atol=1e-4)
        close(out["grad_B"], update.B.grad, "gradient of B", atol=1e-4)
    return forward_cases("forward_gradients", verify)


def never_forms_BA_cases() -> list[Case]:
    # x tiny, A and B huge: x A^T and then (x A^T) B^T are ordinary numbers, but any entry of
    # B A (or A^T B^T) is ~1e40 and overflows float32. Forming B A is what LoRA must avoid:
    # it costs out * in * r multiply-adds, against (out + in) * r per row of x.
    cases = []
    random = rng("never_forms_BA")
    for i in range(6):
        n_in, n_out, r, seed = random.randint(4, 32), random.randint(4, 32), random.randint(1, 4), random.randrange(2**31)
        inputs = dict(W0=randn(seed, n_out, n_in), b=None, A=randn(seed + 1, r, n_in) * 1e20,
                      B=randn(seed + 2, n_out, r) * 1e20, r=r, alpha=8.0, x=randn(seed + 3, 2, n_in) * 1e-30,
                      upstream=torch.zeros(2, n_out))

        def verify(out, W0, b, A, B, r, alpha, x, upstream):
            # Only the overflow is judged here: the formula has its own check.
            got = tensor(out["out"], "forward")
            if got.shape != (2, W0.shape[0]):
                raise Failure(f"forward gave shape {tuple(got.shape)}, expected {(2, W0.shape[0])}")
            if not torch.isfinite(got).all():
                raise Failure("forward overflowed where x A^T B^T does not: it formed the (out, in) matrix B A; "
                              "compute x A^T first, then multiply by B^T")
            if not got.abs().max() > 1:
                raise Failure("forward ignored the LoRA update (x A^T B^T is ~1e10 here)")
        cases.append(Case(label(n_in=n_in, n_out=n_out, r=r, A_and_B="~1e20", x="~1e-30"), probe_forward, inputs,
                          lambda out, inputs=inputs, verify=verify: verify(out, **inputs)))
    return cases


CHECKS = [
    Check("B starts at zero: a fresh layer is exactly the base layer", 2, init_is_base_cases),
    Check("A starts random and small, so B gets a gradient; W0 stays frozen", 1, init_gradients_cases),
    Check("forward computes W0 x + b + (alpha/r) B A x", 3, forward_formula_cases),
    Check("gradients of A and B are right", 2, forward_gradient_cases),
    Check("forward never forms the (out, in) matrix B A", 1, never_forms_BA_cases),
]
