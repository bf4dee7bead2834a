"""Checks of assignment 6: attention with a KV cache. Reference: F.scaled_dot_product_attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from grading_common import Case, Check, Failure, close, equal, label, randn, rng, tensor

TITLE = "attention with a KV cache"


# -----------------------------------------------------------------------------
# Probes: run in the child, on the submission


def probe_attention(student, q, k, v):
    return student.causal_attention(q, k, v)


def probe_append(student, ks, vs):
    cache, returned = student.KVCache(), []
    for k, v in zip(ks, vs):
        returned.append(list(cache.append(k, v)))
    return returned


def probe_incremental(student, q, k, v, chunks):
    """Feed a prompt of chunks[0] positions, then the next chunks as they come."""
    cache, outputs, start = student.KVCache(), [], 0
    for n in chunks:
        part = slice(start, start + n)
        all_k, all_v = cache.append(k[:, :, part], v[:, :, part])
        outputs.append(student.causal_attention(q[:, :, part], all_k, all_v))
        start += n
    return torch.cat(outputs, dim=2)


# -----------------------------------------------------------------------------
# Cases and verdicts


def reference(q, k, v):
    """PyTorch's attention with the mask causal_attention must apply: queries are the last T."""
    T, S = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T))


def attention_cases(name: str, all_positions: bool, what: str, n: int = 16, q_scale: float = 1.0,
                    atol: float = 1e-5) -> list[Case]:
    random, cases = rng(name), []
    for _ in range(n):
        S = random.randint(1, 12)
        T = S if all_positions else random.randint(1, S)
        B, H, D, seed = random.randint(1, 2), random.randint(1, 3), random.choice([1, 4, 8]), random.randrange(2**31)
        q, k, v = randn(seed, B, H, T, D) * q_scale, randn(seed + 1, B, H, S, D), randn(seed + 2, B, H, S, D)

        def verify(got, q=q, k=k, v=v, T=T, S=S):
            if tensor(got, "attention").shape == q.shape and not torch.isfinite(got).all():
                raise Failure("attention is not finite for large scores: subtract the row max (softmax does)")
            close(got, reference(q, k, v), what.format(T=T, S=S), atol=atol)
        cases.append(Case(label(B=B, H=H, T=T, S=S, D=D, seed=seed), probe_attention, dict(q=q, k=k, v=v), verify))
    return sorted(cases, key=lambda case: case.inputs["k"].numel())  # the smallest failing case is shown


def full_cases() -> list[Case]:
    return attention_cases("full", True, "causal attention, T == S == {S}")


def offset_cases() -> list[Case]:
    return attention_cases("offset", False, "attention of the last {T} of {S} positions")


def stable_cases() -> list[Case]:
    cases = attention_cases("stable", True, "attention with large scores", n=10, q_scale=300.0, atol=1e-4)
    for case in cases:
        case.label += ", q ~300 (scores ~1e4)"
    return cases


def append_cases() -> list[Case]:
    random, cases = rng("append"), []
    for _ in range(10):
        chunks, seed = [random.randint(1, 4) for _ in range(random.randint(1, 4))], random.randrange(2**31)
        ks = [randn(seed + i, 2, 3, n, 4) for i, n in enumerate(chunks)]
        vs = [randn(seed + 100 + i, 2, 3, n, 4) for i, n in enumerate(chunks)]

        def verify(out, ks=ks, vs=vs):
            for i in range(len(ks)):
                equal(out[i][0], torch.cat(ks[: i + 1], dim=2), "append must return every key so far, in order")
                equal(out[i][1], torch.cat(vs[: i + 1], dim=2), "append must return every value so far, in order")
        cases.append(Case(label(chunks=chunks, seed=seed), probe_append, dict(ks=ks, vs=vs), verify))
    return cases


def incremental_cases() -> list[Case]:
    random, cases = rng("incremental"), []
    for _ in range(12):
        chunks = [random.randint(1, 4) for _ in range(random.randint(1, 5))]
        H, seed = random.randint(1, 3), random.randrange(2**31)
        q, k, v = (randn(seed + i, 1, H, sum(chunks), 8) for i in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # all at once
        cases.append(Case(label(chunks=chunks, H=H, seed=seed), probe_incremental, dict(q=q, k=k, v=v, chunks=chunks),
                          lambda got, expected=expected, chunks=chunks: close(
                              got, expected, f"cached attention fed in chunks {chunks}", atol=1e-5)))
    return sorted(cases, key=lambda case: case.inputs["q"].numel())


CHECKS = [
    Check("causal attention matches PyTorch's (T == S)", 2, full_cases),
    Check("the last T of S positions: the causal mask is offset", 2, offset_cases),
    Check("KVCache.append returns all keys and values so far", 1, append_cases),
    Check("decoding chunk by chunk with the cache equals attention over everything", 3, incremental_cases),
    Check("numerically stable for large scores", 1, stable_cases),
]
