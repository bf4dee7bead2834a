"""Checks of assignment 9: the subspace similarity phi (paper Eq. 4). Reference: Eq. 4 term by term."""
from __future__ import annotations

import torch

from grading_common import Case, Check, Failure, close, label, randn, rng, tensor

TITLE = "subspace similarity between adapters"


# -----------------------------------------------------------------------------
# Probe: run in the child, on the submission


def probe_phi(student, A1, A2):
    return student.subspace_similarity(A1, A2)


# -----------------------------------------------------------------------------
# Cases and verdicts


def reference(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Eq. 4 as written, one (i, j) at a time, in float64."""
    U1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh
    U2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh
    phi = torch.empty(len(U1), len(U2), dtype=torch.float64)
    for i in range(1, len(U1) + 1):
        for j in range(1, len(U2) + 1):
            phi[i - 1, j - 1] = torch.linalg.matrix_norm(U1[:i] @ U2[:j].T) ** 2 / min(i, j)
    return phi


def pairs(name: str, n: int = 12):
    random = rng(name)
    for _ in range(n):
        d = random.randint(4, 24)
        yield random.randint(1, min(d, 8)), random.randint(1, min(d, 8)), d, random.randrange(2**31)


def phi_cases(name: str, make, verify) -> list[Case]:
    cases = []
    for r1, r2, d, seed in pairs(name):
        A1, A2 = make(r1, r2, d, seed)
        cases.append(Case(label(r1=len(A1), r2=len(A2), d=d, seed=seed), probe_phi, dict(A1=A1, A2=A2),
                          lambda got, A1=A1, A2=A2: verify(got, A1, A2)))
    return sorted(cases, key=lambda case: case.inputs["A1"].numel() + case.inputs["A2"].numel())


def random_pair(r1, r2, d, seed):
    return randn(seed, r1, d), randn(seed + 1, r2, d)


def shape_cases() -> list[Case]:
    def verify(got, A1, A2):
        got = tensor(got, "phi")
        if got.shape != (len(A1), len(A2)):
            raise Failure(f"phi has shape {tuple(got.shape)}, expected (r1, r2) = {(len(A1), len(A2))}")
        if not (torch.isfinite(got).all() and (got >= -1e-5).all() and (got <= 1 + 1e-5).all()):
            raise Failure(f"phi must lie in [0, 1]; got values from {got.min().item():.3g} to {got.max().item():.3g}")
    return phi_cases("shape", random_pair, verify)


def same_cases() -> list[Case]:
    def verify(got, A1, A2):
        close(got, torch.ones(len(A1), len(A2)), "phi(A, A, i, j), which is 1 for every i and j", atol=1e-4)
    return phi_cases("same", lambda r1, r2, d, seed: (randn(seed, r1, d),) * 2, verify)


def orthogonal_cases() -> list[Case]:
    def make(r1, r2, d, seed):
        r1, r2 = max(1, min(r1, d // 2)), max(1, min(r2, d - min(r1, d // 2)))
        Q = torch.linalg.qr(randn(seed, d, d)).Q.T  # orthonormal rows: split into two orthogonal row spaces
        return randn(seed + 1, r1, r1) @ Q[:r1], randn(seed + 2, r2, r2) @ Q[r1:r1 + r2]

    def verify(got, A1, A2):
        close(got, torch.zeros(len(A1), len(A2)), "phi of adapters with orthogonal row spaces (0 everywhere)", atol=1e-4)
    return phi_cases("orthogonal", make, verify)


def diagonal_cases() -> list[Case]:
    def verify(got, A1, A2):
        got, expected = tensor(got, "phi"), reference(A1, A2)
        if got.shape != expected.shape:
            raise Failure(f"phi has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        n = min(len(A1), len(A2))
        close(got.diagonal()[:n], expected.diagonal()[:n].float(), "phi(A1, A2, i, i)", atol=1e-4)
    return phi_cases("diagonal", random_pair, verify)


def everywhere_cases() -> list[Case]:
    def verify(got, A1, A2):
        close(got, reference(A1, A2).float(), "phi(A1, A2, i, j) for every i, j (divide by min(i, j))", atol=1e-4)
    return phi_cases("everywhere", random_pair, verify)


CHECKS = [
    Check("phi is an (r1, r2) matrix of values in [0, 1]", 1, shape_cases),
    Check("an adapter against itself: phi = 1", 1, same_cases),
    Check("orthogonal row spaces: phi = 0", 1, orthogonal_cases),
    Check("Eq. 4 for i == j: || (U1^i)^T U2^i ||_F^2 / i", 2, diagonal_cases),
    Check("Eq. 4 for every i and j, divided by min(i, j)", 2, everywhere_cases),
]
