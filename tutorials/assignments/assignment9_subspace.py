"""Assignment 9: subspace similarity between two adapters (Hu et al., 2021, §7.2, Eq. 4).

Do a rank-8 and a rank-64 adapter learn the same directions? Take the right-singular vectors
of each A (A = U S V^T; the rows of V^T, strongest first): U1 from A1 (r1, d) and U2 from
A2 (r2, d). With U1^i the top i of them and U2^j the top j,

    phi(A1, A2, i, j) = || (U1^i)^T U2^j ||_F^2 / min(i, j)        (the paper's Eq. 4)

is 1 when one top subspace lies inside the other and 0 when they are orthogonal. Tutorial
chapter 7 (tutorials/07_rank_deficiency.md) computes it for adapters trained on the toy:
try it yourself before you read that section.

Fill in the function marked YOUR CODE HERE (replace the `raise NotImplementedError` line).
Check your work with

    python grade.py assignment9 assignment9_subspace.py
"""
import torch


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi(A1, A2, i, j) for i = 1..r1 and j = 1..r2, as an (r1, r2) tensor: entry [i - 1, j - 1].

    A1: (r1, d), A2: (r2, d), r1 and r2 at most d. torch.linalg.svd gives the singular vectors.
    """
    raise NotImplementedError  # YOUR CODE HERE
