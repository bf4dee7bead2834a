"""Checks of assignment 5: one beam search step. Reference: brute force over every candidate."""
from __future__ import annotations

import torch

from grading_common import Case, Check, Failure, close, label, randn, rng, tensor

TITLE = "one beam search step"


# -----------------------------------------------------------------------------
# Probe: run in the child, on the submission


def probe_beam(student, log_probs, scores, beam_size):
    return list(student.beam_step(log_probs.clone(), scores.clone(), beam_size))


# -----------------------------------------------------------------------------
# Cases and verdicts


def unpack(out, beam_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(out, list) or len(out) != 3:
        raise Failure("beam_step must return (scores, beam_index, token)")
    for name, t in zip(("scores", "beam_index", "token"), out):
        if tensor(t, name).shape != (beam_size,):
            raise Failure(f"{name} must have shape ({beam_size},), not {tuple(t.shape)}")
    if out[1].is_floating_point() or out[2].is_floating_point():
        raise Failure("beam_index and token must be integer tensors")
    return out[0], out[1].long(), out[2].long()


def beam_cases(name: str, verify, n: int = 16) -> list[Case]:
    random, cases = rng(name), []
    for _ in range(n):
        n_beams, V, coarse, seed = random.randint(1, 5), random.randint(2, 12), random.random() < 0.5, random.randrange(2**31)
        beam_size = random.randint(1, min(6, n_beams * V))
        g = torch.Generator().manual_seed(seed)
        log_probs = torch.log_softmax(torch.randn(n_beams, V, generator=g) * 2, dim=-1)
        if coarse:  # rounded to halves, so that ties happen
            log_probs = (log_probs * 2).round() / 2
        inputs = dict(log_probs=log_probs, scores=-torch.rand(n_beams, generator=g) * 5, beam_size=beam_size)
        cases.append(Case(label(n_beams=n_beams, V=V, beam_size=beam_size, ties=coarse, seed=seed), probe_beam, inputs,
                          lambda out, inputs=inputs: verify(out, **inputs)))
    return sorted(cases, key=lambda case: case.inputs["log_probs"].numel())  # the smallest failing case is shown


def best_cases() -> list[Case]:
    def verify(out, log_probs, scores, beam_size):
        new_scores, _, _ = unpack(out, beam_size)
        best = (scores[:, None] + log_probs).flatten().sort(descending=True).values[:beam_size]
        close(new_scores.sort(descending=True).values, best,
              "the kept scores vs the best of all (beam, token) candidates", atol=1e-6)
    return beam_cases("best", verify)


def consistent_cases() -> list[Case]:
    def verify(out, log_probs, scores, beam_size):
        new_scores, beam_index, token = unpack(out, beam_size)
        n_beams, V = log_probs.shape
        if not ((0 <= beam_index) & (beam_index < n_beams) & (0 <= token) & (token < V)).all():
            raise Failure("beam_index or token out of range")
        close(new_scores, scores[beam_index] + log_probs[beam_index, token],
              "scores vs beam_scores[beam_index] + log_probs[beam_index, token]", atol=1e-6)
        if len(set(zip(beam_index.tolist(), token.tolist()))) != beam_size:
            raise Failure("each (beam, token) pair may be kept once")
    return beam_cases("consistent", verify)


def sorted_cases() -> list[Case]:
    def verify(out, log_probs, scores, beam_size):
        new_scores, _, _ = unpack(out, beam_size)
        if not torch.all(new_scores[:-1] >= new_scores[1:]):
            raise Failure("return the kept candidates best first")
    return beam_cases("sorted", verify)


def first_step_cases() -> list[Case]:
    random, cases = rng("first_step"), []
    for _ in range(10):
        beam_size, V, seed = random.randint(2, 5), random.randint(5, 12), random.randrange(2**31)
        # At the first step all beams hold the same prompt; giving all but one the score -inf
        # makes beam search expand that one only (no duplicate hypotheses).
        log_probs = torch.log_softmax(randn(seed, V), dim=-1).expand(beam_size, V).clone()
        scores = torch.full((beam_size,), float("-inf"))
        scores[0] = 0.0

        def verify(out, beam_size=beam_size):
            _, beam_index, token = unpack(out, beam_size)
            if not torch.all(beam_index == 0):
                raise Failure("candidates from beams with score -inf must never be kept")
            if len(set(token.tolist())) != beam_size:
                raise Failure("the first step must keep distinct tokens")
        cases.append(Case(label(beam_size=beam_size, V=V, seed=seed, beam_scores=f"[0, -inf x {beam_size - 1}]"),
                          probe_beam, dict(log_probs=log_probs, scores=scores, beam_size=beam_size), verify))
    return cases


def greedy_cases() -> list[Case]:
    random, cases = rng("greedy"), []
    for _ in range(10):
        V, seed = random.randint(2, 30), random.randrange(2**31)
        log_probs = torch.log_softmax(randn(seed, 1, V), dim=-1)

        def verify(out, best=int(log_probs[0].argmax())):
            _, beam_index, token = unpack(out, 1)
            if beam_index.item() != 0 or token.item() != best:
                raise Failure(f"beam size 1 must be greedy: token {best}, got {token.item()}")
        cases.append(Case(label(V=V, seed=seed, beam_size=1), probe_beam,
                          dict(log_probs=log_probs, scores=torch.zeros(1), beam_size=1), verify))
    return cases


CHECKS = [
    Check("keeps the beam_size best (beam, token) candidates", 3, best_cases),
    Check("scores, beam_index and token agree, no pair twice", 2, consistent_cases),
    Check("best first", 1, sorted_cases),
    Check("first step: beams scored -inf are never expanded", 1, first_step_cases),
    Check("beam size 1 is greedy decoding", 1, greedy_cases),
]
