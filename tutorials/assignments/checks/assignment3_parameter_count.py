"""Checks of assignment 3: counting parameters. Reference: lora_min.model.GPT and count_trainable."""
from __future__ import annotations

import torch.nn as nn

from grading_common import Case, Check, Failure, label, rng
from lora_min.model import GPT, GPTConfig, LoRAConfig, count_trainable

TITLE = "counting trainable parameters"


# -----------------------------------------------------------------------------
# Probes: run in the child, on the submission


def build(config: dict, lora: dict | None, flip_layer_norms: bool) -> GPT:
    model = GPT(GPTConfig(**config), LoRAConfig(**lora) if lora else None)
    if flip_layer_norms:  # e.g. also train the LayerNorms, or freeze the embeddings
        for name, p in model.named_parameters():
            p.requires_grad = (".ln_" in name) != p.requires_grad
    return model


def probe_count(student, config, lora, flip_layer_norms):
    return student.count_trainable(build(config, lora, flip_layer_norms))


def probe_count_shared(student):
    shared = nn.Linear(3, 3)
    tiny = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, vocab_size=10, block_size=4))
    return {"sequential": student.count_trainable(nn.Sequential(shared, nn.ReLU(), shared)),
            "gpt": student.count_trainable(tiny)}


def probe_lora_formula(student, n_layer, n_embd, r, targets):
    return student.lora_parameter_count(n_layer, n_embd, r, tuple(targets))


def probe_gpt2_formula(student, n_layer, n_embd, vocab_size, block_size):
    return student.gpt2_parameter_count(n_layer, n_embd, vocab_size, block_size)


# -----------------------------------------------------------------------------
# Cases and verdicts


def configs(name: str, n: int = 14):
    random = rng(name)
    for _ in range(n):
        n_head = random.randint(1, 3)
        config = dict(n_layer=random.randint(1, 3), n_head=n_head, n_embd=n_head * random.choice([4, 8]),
                      vocab_size=random.randint(5, 50), block_size=random.randint(4, 16))
        lora = dict(r=random.randint(1, 4), dropout=0.0, targets=random.sample("qkvo", random.randint(1, 4)))
        yield config, lora, random.random() < 0.5


def expect_int(got, expected: int, what: str) -> None:
    if isinstance(got, bool) or not isinstance(got, int) or got != expected:
        raise Failure(f"{what} gave {got}, expected {expected}")


def count_cases() -> list[Case]:
    cases = []
    for config, lora, flip in configs("count_trainable"):
        for with_lora in (False, True):
            inputs = dict(config=config, lora=lora if with_lora else None, flip_layer_norms=flip)
            expected = count_trainable(build(**inputs))
            cases.append(Case(label(**config, lora=inputs["lora"], layer_norms_flipped=flip), probe_count, inputs,
                              lambda got, expected=expected: expect_int(got, expected, "count_trainable")))
    return cases


def count_shared_cases() -> list[Case]:
    def verify(out):
        if out["sequential"] != 12:
            raise Failure(f"a Linear(3, 3) used twice has 12 parameters, counted {out['sequential']}: count it once")
        expected = count_trainable(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, vocab_size=10, block_size=4)))
        if out["gpt"] != expected:
            raise Failure(f"GPT-2 ties lm_head to wte: count that tensor once ({out['gpt']}, expected {expected})")
    return [Case("nn.Sequential(shared, ReLU, shared), and a 1-layer GPT", probe_count_shared, {}, verify)]


def lora_formula_cases() -> list[Case]:
    cases = []
    for config, lora, _ in configs("lora_formula"):
        inputs = dict(n_layer=config["n_layer"], n_embd=config["n_embd"], r=lora["r"], targets=lora["targets"])
        expected = count_trainable(GPT(GPTConfig(**config), LoRAConfig(**lora)))
        cases.append(Case(label(**inputs), probe_lora_formula, inputs,
                          lambda got, expected=expected: expect_int(got, expected, "lora_parameter_count")))
    return cases


def gpt2_formula_cases() -> list[Case]:
    cases = [Case(label(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024), probe_gpt2_formula,
                  dict(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024),
                  lambda got: expect_int(got, 124_439_808, "gpt2_parameter_count (GPT-2 small has 124,439,808)"))]
    for config, _, _ in configs("gpt2_formula"):
        inputs = {k: config[k] for k in ("n_layer", "n_embd", "vocab_size", "block_size")}
        expected = sum(p.numel() for p in GPT(GPTConfig(**config)).parameters())
        cases.append(Case(label(**inputs), probe_gpt2_formula, inputs,
                          lambda got, expected=expected: expect_int(got, expected, "gpt2_parameter_count")))
    return cases


CHECKS = [
    Check("count_trainable agrees with lora_min on GPTs with and without LoRA", 3, count_cases),
    Check("count_trainable counts a shared (tied) parameter once", 1, count_shared_cases),
    Check("lora_parameter_count matches the parameters LoRA adds", 2, lora_formula_cases),
    Check("gpt2_parameter_count matches GPT-2 of any size (124,439,808 for gpt2)", 2, gpt2_formula_cases),
]
