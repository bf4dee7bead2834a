"""What every assignment's checks are made of; used by the grader and by its child process.

A check is worth some points and is a list of cases. A case names a probe (a function of the
checks file, run in the child: it calls the submission on the case's inputs and returns what
the submission computed), the inputs (chosen here, by the grader), and a verdict (run in the
grader, on the returned outputs, against lora_min or a brute-force answer). A check earns its
points when every one of its cases passes.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class Failure(AssertionError):
    """The submission's answer is wrong; the message says how, for the student."""


@dataclass
class Case:
    label: str  # the inputs as a student reads them: "n_in=3, n_out=2, r=1, alpha=8.0, seed=5"
    probe: Callable[..., Any]  # probe(student, **inputs), run in the child
    inputs: dict[str, Any]  # tensors, numbers, strings and lists of them
    verify: Callable[[Any], None]  # verify(outputs), run in the grader; raises Failure


@dataclass
class Check:
    name: str  # what the check establishes, printed next to its score
    points: int
    cases: Callable[[], list[Case]]
    # A rule about how the code is written, checked on its source text here (never in the
    # child); raises Failure. The check still needs its cases to pass.
    source_rule: Callable[[str], None] | None = None


def label(**fields: Any) -> str:
    return ", ".join(f"{name}={value}" for name, value in fields.items())


def rng(check_name: str) -> random.Random:
    """A fixed stream of random choices per check: a file always gets the same cases."""
    return random.Random(check_name)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise Failure(f"{what}: expected a tensor, got {value if isinstance(value, str) else type(value).__name__}")
    return value


def close(got: Any, expected: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """got == expected within tolerance, or a Failure that says where it is NaN, inf or off."""
    got = tensor(got, what)
    if got.shape != expected.shape:
        raise Failure(f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    got, expected = got.double(), expected.double()
    for name, bad in (("NaN", torch.isnan), ("infinite", torch.isinf)):
        wrong = bad(got) & ~bad(expected)
        if wrong.any():
            raise Failure(f"{what}: {name} in {int(wrong.sum())} of {got.numel()} entries, where the answer is "
                          f"finite{' (a mean over nothing, or 0/0?)' if name == 'NaN' else ''}")
    if not torch.allclose(got, expected, atol=atol, rtol=rtol, equal_nan=True):
        difference = (got - expected).nan_to_num(0.0).abs().max().item()
        raise Failure(f"{what}: largest difference {difference:.3g}")


def equal(got: Any, expected: torch.Tensor, what: str) -> None:
    got = tensor(got, what)
    if got.shape != expected.shape or not torch.equal(got.to(expected.dtype), expected):
        raise Failure(what)
