"""The autograder for the course assignments in tutorials/assignments/.

    python -m lora_min.grade assignment1 path/to/student.py
    python -m lora_min.grade --list

An assignment is a list of checks, each worth some points. A check is a property-based test
(hypothesis): it runs the student's code on many random inputs and compares it with lora-min's
own implementation (the oracle: `lora_min.model.LoRA`, `count_trainable`, `masked_lm_loss`,
PyTorch's attention) or with a brute-force answer, and earns its points only if every example
passes. Examples are derandomised, so a file always gets the same score. The grader prints one
line per check, the reason for each failure (with the falsifying example), and the total.

Exit status: 0 for full marks, 1 for anything less, 2 for bad usage (unknown assignment,
missing file). Course platforms that grade by exit status (GitHub Classroom) can use it as is.
Needs hypothesis (a test dependency of lora-min: `pip install hypothesis`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import re
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    sys.exit("lora_min.grade needs hypothesis: pip install hypothesis")

from lora_min.data import masked_lm_loss
from lora_min.model import GPT, GPTConfig, LoRA, LoRAConfig, count_trainable

STARTER_DIR = Path(__file__).resolve().parents[1] / "tutorials" / "assignments"
TIME_LIMIT_S = 60  # per check: a student's infinite loop must not hang the grader
# Shrinking turns a failing input into the smallest one that still fails, which makes the
# feedback readable but costs seconds per failing check; the test suite turns it off.
SHRINK_FAILURES = True


@dataclass
class Check:
    name: str  # what the check establishes, printed next to its score
    points: int
    run: Callable[[ModuleType], None]  # raises (AssertionError or any error) on failure


@dataclass
class Assignment:
    title: str
    starter: str  # the student file in tutorials/assignments/
    checks: list[Check]

    @property
    def total(self) -> int:
        return sum(check.points for check in self.checks)


@dataclass
class CheckResult:
    check: Check
    passed: bool
    reason: str = ""


@dataclass
class Score:
    assignment: str
    results: list[CheckResult] = field(default_factory=list)
    load_error: str = ""

    @property
    def points(self) -> int:
        return sum(r.check.points for r in self.results if r.passed)

    @property
    def total(self) -> int:
        return ASSIGNMENTS[self.assignment].total


def prop(*strategies, max_examples: int = 25):
    """@given with grading settings: derandomised (same score every run), no deadline."""
    phases = tuple(Phase) if SHRINK_FAILURES else (Phase.explicit, Phase.reuse, Phase.generate)

    def decorate(test):
        return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                        phases=phases, suppress_health_check=list(HealthCheck))(given(*strategies)(test))
    return decorate


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SEEDS = st.integers(0, 2**31 - 1)


def close(got: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol), (
        f"{what}: largest difference {(got.float() - expected.float()).abs().max().item():.3g}")


# -----------------------------------------------------------------------------
# Assignment 1: the LoRA layer (init and forward)


@contextlib.contextmanager
def no_init(student: ModuleType):
    """Build LoRALinear without the student's reset_parameters, to grade forward on its own."""
    with mock.patch.object(student.LoRALinear, "reset_parameters", lambda self: None):
        yield


def lora_layer(student: ModuleType, n_in: int, n_out: int, r: int, alpha: float, seed: int,
               init: bool = True, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias)
    if init:
        return student.LoRALinear(base, r, alpha)
    with no_init(student):
        layer = student.LoRALinear(base, r, alpha)
    with torch.no_grad():  # as if trained
        layer.A.copy_(randn(seed + 1, r, n_in))
        layer.B.copy_(randn(seed + 2, n_out, r) * 0.1)
    return layer


def oracle_output(layer: nn.Module, x: torch.Tensor, r: int, alpha: float) -> torch.Tensor:
    """lora_min.model.LoRA with the student's A and B, added to the base layer."""
    update = LoRA(layer.base.in_features, layer.base.out_features, LoRAConfig(r=r, alpha=alpha, dropout=0.0))
    with torch.no_grad():
        update.A.copy_(layer.A)
        update.B.copy_(layer.B)
    return layer.base(x) + update(x)


LAYERS = st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(1, 6),
                   st.floats(0.5, 64), SEEDS)  # n_in, n_out, r, alpha, seed
LEADING = st.lists(st.integers(1, 4), min_size=1, max_size=3)  # batch dimensions of x


def check_init_is_base(student: ModuleType) -> None:
    @prop(LAYERS, LEADING)
    def test(layer_args, leading):
        n_in, n_out, r, alpha, seed = layer_args
        layer = lora_layer(student, n_in, n_out, r, alpha, seed)
        assert torch.count_nonzero(layer.B) == 0, "B must start at zero (then B A = 0)"
        x = randn(seed, *leading, n_in)
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base(x)), "a fresh layer must equal the base layer exactly"
    test()


def check_init_lets_gradients_flow(student: ModuleType) -> None:
    @prop(LAYERS)
    def test(layer_args):
        n_in, n_out, r, alpha, seed = layer_args
        layer = lora_layer(student, n_in, n_out, r, alpha, seed)
        assert torch.isfinite(layer.A).all(), "A must be finite"
        assert torch.count_nonzero(layer.A) > 0, "A must not be zero: B would get no gradient and never move"
        layer(randn(seed, 3, n_in)).pow(2).sum().backward()
        assert layer.B.grad is not None and torch.count_nonzero(layer.B.grad) > 0, "B must get a gradient at step 0"
        assert layer.base.weight.grad is None, "W0 must stay frozen"
    test()


def check_forward_formula(student: ModuleType) -> None:
    @prop(LAYERS, LEADING, st.booleans())
    def test(layer_args, leading, bias):
        n_in, n_out, r, alpha, seed = layer_args
        layer = lora_layer(student, n_in, n_out, r, alpha, seed, init=False, bias=bias)
        x = randn(seed + 3, *leading, n_in)
        with torch.no_grad():
            close(layer(x), oracle_output(layer, x, r, alpha), "forward vs W0 x + b + (alpha/r) B A x")
    test()


def check_forward_gradients(student: ModuleType) -> None:
    @prop(LAYERS, LEADING)
    def test(layer_args, leading):
        n_in, n_out, r, alpha, seed = layer_args
        layer = lora_layer(student, n_in, n_out, r, alpha, seed, init=False)
        x = randn(seed + 3, *leading, n_in)
        upstream = randn(seed + 4, *leading, n_out)
        (layer(x) * upstream).sum().backward()
        A, B = layer.A.detach().clone().requires_grad_(), layer.B.detach().clone().requires_grad_()
        ((x @ A.T @ B.T) * (alpha / r) * upstream).sum().backward()
        close(layer.A.grad, A.grad, "gradient of A", atol=1e-4)
        close(layer.B.grad, B.grad, "gradient of B", atol=1e-4)
    test()


def check_forward_never_forms_BA(student: ModuleType) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    @prop(st.integers(1, 4), SEEDS, max_examples=5)
    def test(r, seed):
        n = 256  # with x of 2 rows, forming the (n, n) matrix B A costs far more than x A^T B^T
        layer = lora_layer(student, n, n, r, 8.0, seed, init=False, bias=False)
        x = randn(seed, 2, n)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            layer(x)
        base_flops = 2 * 2 * n * n
        lora_flops = 2 * 2 * r * (n + n)
        assert counter.get_total_flops() <= base_flops + 4 * lora_flops, (
            f"forward did {counter.get_total_flops():,} flops; x A^T B^T needs {lora_flops:,} on top of the "
            f"base layer's {base_flops:,}: do not form the (out, in) matrix B A")
    test()


# -----------------------------------------------------------------------------
# Assignment 2: merging


def trained_layer(student: ModuleType, n_in: int, n_out: int, r: int, alpha: float, seed: int,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    layer = student.LoRALinear(nn.Linear(n_in, n_out), r, alpha)
    with torch.no_grad():
        layer.B.copy_(randn(seed + 2, n_out, r) * 0.1)
    return layer.to(dtype)


def delta(layer: nn.Module, r: int, alpha: float) -> torch.Tensor:
    return (alpha / r) * (layer.B.detach().float() @ layer.A.detach().float())


def check_merge_keeps_outputs(student: ModuleType) -> None:
    @prop(LAYERS, LEADING)
    def test(layer_args, leading):
        n_in, n_out, r, alpha, seed = layer_args
        layer = trained_layer(student, n_in, n_out, r, alpha, seed)
        x = randn(seed + 3, *leading, n_in)
        w0 = layer.base.weight.detach().clone()
        with torch.no_grad():
            before = layer(x)
            layer.merge()
            assert layer.merged, "merge() must set self.merged"
            close(layer.base.weight, w0 + delta(layer, r, alpha), "merged weight vs W0 + (alpha/r) B A")
            close(layer(x), before, "output after merging", atol=1e-4)
    test()


def check_merge_twice(student: ModuleType) -> None:
    @prop(LAYERS)
    def test(layer_args):
        n_in, n_out, r, alpha, seed = layer_args
        layer = trained_layer(student, n_in, n_out, r, alpha, seed)
        layer.merge()
        once = layer.base.weight.detach().clone()
        layer.merge()
        assert torch.equal(layer.base.weight, once), "merging a merged layer must change nothing"
    test()


def check_unmerge_restores(student: ModuleType) -> None:
    @prop(LAYERS, LEADING)
    def test(layer_args, leading):
        n_in, n_out, r, alpha, seed = layer_args
        layer = trained_layer(student, n_in, n_out, r, alpha, seed)
        x = randn(seed + 3, *leading, n_in)
        w0 = layer.base.weight.detach().clone()
        with torch.no_grad():
            before = layer(x)
            layer.merge()
            layer.unmerge()
            assert not layer.merged, "unmerge() must clear self.merged"
            close(layer.base.weight, w0, "weight after merge + unmerge", atol=1e-5)
            close(layer(x), before, "output after merge + unmerge", atol=1e-4)
    test()


def check_unmerge_unmerged(student: ModuleType) -> None:
    @prop(LAYERS)
    def test(layer_args):
        n_in, n_out, r, alpha, seed = layer_args
        layer = trained_layer(student, n_in, n_out, r, alpha, seed)
        w0 = layer.base.weight.detach().clone()
        layer.unmerge()
        assert torch.equal(layer.base.weight, w0), "unmerging a layer that is not merged must change nothing"
    test()


def check_merge_half_precision(student: ModuleType) -> None:
    @prop(LAYERS, st.sampled_from([torch.float16, torch.bfloat16]))
    def test(layer_args, dtype):
        n_in, n_out, r, alpha, seed = layer_args
        layer = trained_layer(student, n_in, n_out, r, alpha, seed, dtype)
        w0 = layer.base.weight.detach().clone()
        layer.merge()
        assert layer.base.weight.dtype == dtype, f"merge changed the weight's dtype to {layer.base.weight.dtype}"
        expected = (w0.float() + delta(layer, r, alpha)).to(dtype)  # one rounding, as lora_min does
        assert torch.equal(layer.base.weight, expected), (
            "in half precision, form W0 + (alpha/r) B A in float32 and round once to the weight's dtype")
    test()


# -----------------------------------------------------------------------------
# Assignment 3: counting trainable parameters


@st.composite
def gpt_configs(draw):
    n_head = draw(st.integers(1, 3))
    config = GPTConfig(n_layer=draw(st.integers(1, 3)), n_head=n_head, n_embd=n_head * draw(st.sampled_from([4, 8])),
                       vocab_size=draw(st.integers(5, 50)), block_size=draw(st.integers(4, 16)))
    targets = tuple(draw(st.lists(st.sampled_from("qkvo"), min_size=1, max_size=4, unique=True)))
    return config, LoRAConfig(r=draw(st.integers(1, 4)), dropout=0.0, targets=targets)


def check_count_trainable(student: ModuleType) -> None:
    @prop(gpt_configs(), st.booleans(), st.booleans())
    def test(configs, with_lora, freeze_some):
        config, lora = configs
        model = GPT(config, lora if with_lora else None)
        if freeze_some:  # e.g. also train the LayerNorms, or freeze the embeddings
            for name, p in model.named_parameters():
                p.requires_grad = (".ln_" in name) != p.requires_grad
        got = student.count_trainable(model)
        assert got == count_trainable(model), f"count_trainable gave {got}, expected {count_trainable(model)}"
    test()


def check_count_shared_once(student: ModuleType) -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # one Linear used twice: 12 parameters
    assert student.count_trainable(model) == 12, "a parameter used twice must be counted once"
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, vocab_size=10, block_size=4))
    expected = count_trainable(model)  # wte and lm_head are one tensor
    assert student.count_trainable(model) == expected, "GPT-2 ties lm_head to wte: count that tensor once"


def check_lora_formula(student: ModuleType) -> None:
    @prop(gpt_configs())
    def test(configs):
        config, lora = configs
        got = student.lora_parameter_count(config.n_layer, config.n_embd, lora.r, lora.targets)
        expected = count_trainable(GPT(config, lora))
        assert got == expected, f"lora_parameter_count{(config.n_layer, config.n_embd, lora.r, lora.targets)} = {got}, expected {expected}"
    test()


def check_gpt2_formula(student: ModuleType) -> None:
    @prop(gpt_configs())
    def test(configs):
        config, _ = configs
        got = student.gpt2_parameter_count(config.n_layer, config.n_embd, config.vocab_size, config.block_size)
        expected = sum(p.numel() for p in GPT(config).parameters())
        assert got == expected, f"gpt2_parameter_count for {config} = {got}, expected {expected}"
    test()
    got = student.gpt2_parameter_count(12, 768)
    assert got == 124_439_808, f"gpt2_parameter_count(12, 768) = {got:,}; GPT-2 small has 124,439,808"


# -----------------------------------------------------------------------------
# Assignment 4: the masked, label-smoothed loss


@dataclass
class LossCase:
    """Random loss inputs, described by a few numbers (so a failing example reads well)."""
    B: int
    T: int
    V: int
    keep: float  # the share of positions in the mask (at least one always is)
    seed: int
    large: bool = False  # logits of size ~1000

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        logits = torch.randn(self.B, self.T, self.V, generator=g) * (1000.0 if self.large else 3.0)
        targets = torch.randint(0, self.V, (self.B, self.T), generator=g)
        mask = torch.rand(self.B, self.T, generator=g) < self.keep
        mask[self.seed % self.B, self.seed % self.T] = True
        return logits, targets, mask


def loss_inputs(large: bool = False):
    return st.builds(LossCase, st.integers(1, 4), st.integers(1, 8), st.integers(2, 30), st.floats(0.2, 1.0),
                     SEEDS, st.just(large))


def check_loss_plain(student: ModuleType) -> None:
    @prop(loss_inputs())
    def test(inputs):
        logits, targets, mask = inputs.tensors()
        close(student.masked_lm_loss(logits, targets, mask), masked_lm_loss(logits, targets, mask),
              "loss without label smoothing", atol=1e-5)
    test()


def check_loss_smoothed(student: ModuleType) -> None:
    @prop(loss_inputs(), st.floats(0.0, 0.5))
    def test(inputs, eps):
        logits, targets, mask = inputs.tensors()
        close(student.masked_lm_loss(logits, targets, mask, eps), masked_lm_loss(logits, targets, mask, eps),
              f"loss with label_smoothing={eps}", atol=1e-5)
    test()


def check_loss_ignores_unmasked(student: ModuleType) -> None:
    @prop(loss_inputs(), st.floats(0.0, 0.5))
    def test(inputs, eps):
        logits, targets, mask = inputs.tensors()
        logits = logits.clone().requires_grad_()
        loss = student.masked_lm_loss(logits, targets, mask, eps)
        loss.backward()
        assert torch.all(logits.grad[~mask] == 0), "positions outside the mask must get no gradient"
        changed = logits.detach().clone()
        changed[~mask] = 100.0  # whatever the prompt and padding positions hold
        other_targets = torch.where(mask, targets, 0)
        close(student.masked_lm_loss(changed, other_targets, mask, eps), loss.detach(),
              "loss after changing positions outside the mask")
    test()


def check_loss_averages_tokens(student: ModuleType) -> None:
    # Row 0 has one token in the loss with NLL log(4), row 1 three tokens with NLL ~0: the mean
    # over tokens is log(4) / 4, the mean of per-row means would be log(4) / 2.
    logits = torch.zeros(2, 3, 4)
    logits[1, :, 0] = 50.0
    targets = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    got = float(student.masked_lm_loss(logits, targets, mask))
    assert abs(got - math.log(4) / 4) < 1e-4, (
        f"got {got:.4f}, expected {math.log(4) / 4:.4f}: average over all tokens in the mask, not per sequence")


def check_loss_from_log_probs(student: ModuleType) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("write the loss from log-probabilities (log_softmax), not with "
                             "F.cross_entropy / F.nll_loss / nn.CrossEntropyLoss")

    @prop(loss_inputs(), st.floats(0.0, 0.5), max_examples=10)
    def test(inputs, eps):
        logits, targets, mask = inputs.tensors()
        with mock.patch.object(F, "cross_entropy", forbidden), mock.patch.object(F, "nll_loss", forbidden):
            got = student.masked_lm_loss(logits, targets, mask, eps)
        close(got, masked_lm_loss(logits, targets, mask, eps), "loss", atol=1e-5)
    test()


def check_loss_stable(student: ModuleType) -> None:
    @prop(loss_inputs(large=True), st.floats(0.0, 0.5), max_examples=10)
    def test(inputs, eps):
        logits, targets, mask = inputs.tensors()
        got = student.masked_lm_loss(logits, targets, mask, eps)
        assert torch.isfinite(got), f"loss is {got.item()} for logits of size ~1000: use log_softmax, not log(softmax)"
        close(got, masked_lm_loss(logits, targets, mask, eps), "loss with large logits", atol=1e-2, rtol=1e-4)
    test()


# -----------------------------------------------------------------------------
# Assignment 5: one beam search step


@dataclass
class BeamCase:
    n_beams: int
    V: int
    beam_size: int
    coarse: bool  # log-probabilities rounded to halves, so that ties happen
    seed: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed)
        log_probs = torch.log_softmax(torch.randn(self.n_beams, self.V, generator=g) * 2, dim=-1)
        if self.coarse:
            log_probs = (log_probs * 2).round() / 2
        return log_probs, -torch.rand(self.n_beams, generator=g) * 5, self.beam_size


@st.composite
def beam_inputs(draw):
    n_beams, V = draw(st.integers(1, 5)), draw(st.integers(2, 12))
    return BeamCase(n_beams, V, draw(st.integers(1, min(6, n_beams * V))), draw(st.booleans()), draw(SEEDS))


def run_beam_step(student: ModuleType, log_probs, scores, beam_size):
    out = student.beam_step(log_probs.clone(), scores.clone(), beam_size)
    assert isinstance(out, tuple) and len(out) == 3, "beam_step must return (scores, beam_index, token)"
    new_scores, beam_index, token = out
    for name, t in (("scores", new_scores), ("beam_index", beam_index), ("token", token)):
        assert isinstance(t, torch.Tensor) and t.shape == (beam_size,), f"{name} must be a ({beam_size},) tensor"
    assert not beam_index.is_floating_point() and not token.is_floating_point(), "indices must be integer tensors"
    return new_scores, beam_index, token


def check_beam_best(student: ModuleType) -> None:
    @prop(beam_inputs())
    def test(inputs):
        log_probs, scores, beam_size = inputs.tensors()
        new_scores, _, _ = run_beam_step(student, log_probs, scores, beam_size)
        every_candidate = (scores[:, None] + log_probs).flatten()  # brute force
        best = every_candidate.sort(descending=True).values[:beam_size]
        close(new_scores, best, "the kept scores vs the best of all (beam, token) candidates", atol=1e-6)
    test()


def check_beam_consistent(student: ModuleType) -> None:
    @prop(beam_inputs())
    def test(inputs):
        log_probs, scores, beam_size = inputs.tensors()
        new_scores, beam_index, token = run_beam_step(student, log_probs, scores, beam_size)
        close(new_scores, scores[beam_index] + log_probs[beam_index, token],
              "scores vs beam_scores[beam_index] + log_probs[beam_index, token]", atol=1e-6)
        pairs = set(zip(beam_index.tolist(), token.tolist()))
        assert len(pairs) == beam_size, "each (beam, token) pair may be kept once"
    test()


def check_beam_sorted(student: ModuleType) -> None:
    @prop(beam_inputs())
    def test(inputs):
        new_scores, _, _ = run_beam_step(student, *inputs.tensors())
        assert torch.all(new_scores[:-1] >= new_scores[1:]), "return the kept candidates best first"
    test()


def check_beam_first_step(student: ModuleType) -> None:
    @prop(st.integers(2, 5), st.integers(5, 12), SEEDS)
    def test(beam_size, V, seed):
        # At the first step all beams hold the same prompt; giving all but one the score -inf
        # makes beam search expand that one only (no duplicate hypotheses).
        row = torch.log_softmax(randn(seed, V), dim=-1)
        log_probs = row.expand(beam_size, V).clone()
        scores = torch.full((beam_size,), float("-inf"))
        scores[0] = 0.0
        _, beam_index, token = run_beam_step(student, log_probs, scores, beam_size)
        assert torch.all(beam_index == 0), "candidates from beams with score -inf must never be kept"
        assert len(set(token.tolist())) == beam_size, "the first step must keep distinct tokens"
    test()


def check_beam_size_one_is_greedy(student: ModuleType) -> None:
    @prop(st.integers(2, 30), SEEDS)
    def test(V, seed):
        log_probs = torch.log_softmax(randn(seed, 1, V), dim=-1)
        _, beam_index, token = run_beam_step(student, log_probs, torch.zeros(1), 1)
        assert beam_index.item() == 0 and token.item() == log_probs[0].argmax().item(), "beam size 1 must be greedy"
    test()


# -----------------------------------------------------------------------------
# Assignment 6: attention with a KV cache


@dataclass
class AttentionCase:
    """T queries (the last T of S positions), S keys and values, (B, H, ., D) each."""
    B: int
    H: int
    T: int
    S: int
    D: int
    seed: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (randn(self.seed, self.B, self.H, self.T, self.D), randn(self.seed + 1, self.B, self.H, self.S, self.D),
                randn(self.seed + 2, self.B, self.H, self.S, self.D))


@st.composite
def attention_inputs(draw, all_positions: bool = False):
    S = draw(st.integers(1, 12))
    T = S if all_positions else draw(st.integers(1, S))
    return AttentionCase(draw(st.integers(1, 2)), draw(st.integers(1, 3)), T, S, draw(st.sampled_from([1, 4, 8])),
                         draw(SEEDS))


def reference_attention(q, k, v):
    """PyTorch's attention with the mask `causal_attention` must apply: queries are the last T."""
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def check_attention_full(student: ModuleType) -> None:
    @prop(attention_inputs(all_positions=True))
    def test(inputs):
        q, k, v = inputs.tensors()
        close(student.causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True),
              "causal attention, T == S", atol=1e-5)
    test()


def check_attention_offset(student: ModuleType) -> None:
    @prop(attention_inputs())
    def test(inputs):
        q, k, v = inputs.tensors()
        close(student.causal_attention(q, k, v), reference_attention(q, k, v),
              f"attention of the last {q.shape[2]} of {k.shape[2]} positions", atol=1e-5)
    test()


def check_cache_append(student: ModuleType) -> None:
    @prop(st.lists(st.integers(1, 4), min_size=1, max_size=4), SEEDS)
    def test(chunks, seed):
        cache = student.KVCache()
        ks, vs = [], []
        for i, n in enumerate(chunks):
            k, v = randn(seed + i, 2, 3, n, 4), randn(seed + 100 + i, 2, 3, n, 4)
            ks.append(k)
            vs.append(v)
            all_k, all_v = cache.append(k, v)
            assert torch.equal(all_k, torch.cat(ks, dim=2)), "append must return every key so far, in order"
            assert torch.equal(all_v, torch.cat(vs, dim=2)), "append must return every value so far, in order"
    test()


def check_incremental_decoding(student: ModuleType) -> None:
    @prop(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.integers(1, 3), SEEDS)
    def test(chunks, H, seed):
        S = sum(chunks)
        q, k, v = (randn(seed + i, 1, H, S, 8) for i in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # all at once
        cache, outputs, start = student.KVCache(), [], 0
        for n in chunks:  # a prompt of chunks[0] tokens, then the next chunks as they come
            part = slice(start, start + n)
            all_k, all_v = cache.append(k[:, :, part], v[:, :, part])
            outputs.append(student.causal_attention(q[:, :, part], all_k, all_v))
            start += n
        close(torch.cat(outputs, dim=2), expected, f"cached attention fed in chunks {chunks}", atol=1e-5)
    test()


def check_attention_stable(student: ModuleType) -> None:
    @prop(attention_inputs(all_positions=True), max_examples=10)
    def test(inputs):
        q, k, v = inputs.tensors()
        q = q * 300  # scores of size ~1e4: exp overflows without subtracting the max
        got = student.causal_attention(q, k, v)
        assert torch.isfinite(got).all(), "attention is not finite for large scores: subtract the row max (softmax does)"
        close(got, reference_attention(q, k, v), "attention with large scores", atol=1e-4)
    test()


# -----------------------------------------------------------------------------
# The assignments

ASSIGNMENTS: dict[str, Assignment] = {
    "assignment1": Assignment("the LoRA layer", "assignment1_lora_layer.py", [
        Check("B starts at zero: a fresh layer is exactly the base layer", 2, check_init_is_base),
        Check("A starts random and small, so B gets a gradient; W0 stays frozen", 1, check_init_lets_gradients_flow),
        Check("forward computes W0 x + b + (alpha/r) B A x", 3, check_forward_formula),
        Check("gradients of A and B are right", 2, check_forward_gradients),
        Check("forward never forms the (out, in) matrix B A", 1, check_forward_never_forms_BA),
    ]),
    "assignment2": Assignment("merging and unmerging", "assignment2_merging.py", [
        Check("merge folds (alpha/r) B A into W0 and keeps the outputs", 3, check_merge_keeps_outputs),
        Check("merging a merged layer changes nothing", 1, check_merge_twice),
        Check("unmerge restores W0 and the outputs", 2, check_unmerge_restores),
        Check("unmerging an unmerged layer changes nothing", 1, check_unmerge_unmerged),
        Check("half precision: the sum is formed in float32 and rounded once", 2, check_merge_half_precision),
    ]),
    "assignment3": Assignment("counting trainable parameters", "assignment3_parameter_count.py", [
        Check("count_trainable agrees with lora_min on GPTs with and without LoRA", 3, check_count_trainable),
        Check("count_trainable counts a shared (tied) parameter once", 1, check_count_shared_once),
        Check("lora_parameter_count matches the parameters LoRA adds", 2, check_lora_formula),
        Check("gpt2_parameter_count matches GPT-2 of any size (124,439,808 for gpt2)", 2, check_gpt2_formula),
    ]),
    "assignment4": Assignment("the masked, label-smoothed loss", "assignment4_masked_loss.py", [
        Check("without smoothing: mean cross-entropy over the masked tokens", 2, check_loss_plain),
        Check("with label smoothing: (1 - eps) NLL + eps * mean of -log p", 3, check_loss_smoothed),
        Check("positions outside the mask have no effect and no gradient", 2, check_loss_ignores_unmasked),
        Check("the mean is over tokens, not over sequences", 1, check_loss_averages_tokens),
        Check("written from log-probabilities, not F.cross_entropy", 1, check_loss_from_log_probs),
        Check("numerically stable for large logits", 1, check_loss_stable),
    ]),
    "assignment5": Assignment("one beam search step", "assignment5_beam_step.py", [
        Check("keeps the beam_size best (beam, token) candidates", 3, check_beam_best),
        Check("scores, beam_index and token agree, no pair twice", 2, check_beam_consistent),
        Check("best first", 1, check_beam_sorted),
        Check("first step: beams scored -inf are never expanded", 1, check_beam_first_step),
        Check("beam size 1 is greedy decoding", 1, check_beam_size_one_is_greedy),
    ]),
    "assignment6": Assignment("attention with a KV cache", "assignment6_kv_cache.py", [
        Check("causal attention matches PyTorch's (T == S)", 2, check_attention_full),
        Check("the last T of S positions: the causal mask is offset", 2, check_attention_offset),
        Check("KVCache.append returns all keys and values so far", 1, check_cache_append),
        Check("decoding chunk by chunk with the cache equals attention over everything", 3, check_incremental_decoding),
        Check("numerically stable for large scores", 1, check_attention_stable),
    ]),
}


# -----------------------------------------------------------------------------
# Running


def load_student(path: Path, assignment: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"student_{assignment}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError after `seconds` (where the OS has SIGALRM and we are the main thread)."""
    import threading
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.alarm(1)  # hypothesis replays a failing example: interrupt that too, and so on
        raise TimeoutError(f"took longer than {seconds} s (an endless loop?)")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def failure_reason(err: BaseException) -> str:
    """One or two lines: what went wrong, and hypothesis's failing example if there is one."""
    if isinstance(err, NotImplementedError):
        return "not implemented yet (raise NotImplementedError)"
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    if not isinstance(err, AssertionError):  # a crash: say where, in the student's file if possible
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "lora_min" not in f.filename]
        if frames:
            text += f" (at {Path(frames[-1].filename).name}, line {frames[-1].lineno})"
    for note in getattr(err, "__notes__", []):
        if note.startswith(("Falsifying example", "Failing test case")):  # hypothesis, old and new
            arguments = " ".join(line.split("  #")[0].strip() for line in note.splitlines()[1:-1])
            arguments = re.sub(r"([(\[]) | ([)\]])|,(?=\s*[)\]])", r"\1\2", arguments).strip().rstrip(",")
            text += f"\n        failing example: {arguments[:300]}"
            break
    return text


def grade(assignment: str, path: str | Path) -> Score:
    """Run every check of `assignment` on the student file at `path`."""
    path = Path(path)
    score = Score(assignment)
    try:
        student = load_student(path, assignment)
    except Exception as err:  # a syntax error or a crash at import: nothing can be graded
        score.load_error = f"{type(err).__name__}: {err}"
        score.results = [CheckResult(check, False, "the file did not import") for check in ASSIGNMENTS[assignment].checks]
        return score
    for check in ASSIGNMENTS[assignment].checks:
        try:
            with time_limit(TIME_LIMIT_S), torch.random.fork_rng():
                check.run(student)
            score.results.append(CheckResult(check, True))
        except Exception as err:  # any failure of the student's code costs this check only
            score.results.append(CheckResult(check, False, failure_reason(err)))
    return score


def report(score: Score, path: str | Path, out: TextIO) -> None:
    assignment = ASSIGNMENTS[score.assignment]
    print(f"{score.assignment}: {assignment.title} ({path})", file=out)
    if score.load_error:
        print(f"  could not import the file: {score.load_error}", file=out)
    width = len(str(max(check.points for check in assignment.checks)))
    for result in score.results:
        points = result.check.points if result.passed else 0
        print(f"  [{points:>{width}}/{result.check.points}] {result.check.name}", file=out)
        if result.reason:
            print(f"        {result.reason}", file=out)
    print(f"score: {score.points}/{score.total}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_min.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", nargs="?", help=f"one of: {', '.join(ASSIGNMENTS)}")
    parser.add_argument("student_file", nargs="?", help="the student's .py file")
    parser.add_argument("--list", action="store_true", help="list the assignments and their starter files")
    args = parser.parse_args(argv)
    if args.list:
        for name, a in ASSIGNMENTS.items():
            print(f"{name}  {a.title:34} {a.total:2} points  starter: {STARTER_DIR / a.starter}")
        return 0
    if args.assignment not in ASSIGNMENTS or args.student_file is None:
        parser.print_usage(sys.stderr)
        print(f"error: give an assignment ({', '.join(ASSIGNMENTS)}) and a student file", file=sys.stderr)
        return 2
    if not Path(args.student_file).is_file():
        print(f"error: {args.student_file}: no such file", file=sys.stderr)
        return 2
    score = grade(args.assignment, args.student_file)
    report(score, args.student_file, sys.stdout)
    return 0 if score.points == score.total else 1


if __name__ == "__main__":
    sys.exit(main())
