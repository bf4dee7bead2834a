"""Checks of assignment 7: LoRA against full fine-tuning. Reference: lora_min's GPT, trained here."""
from __future__ import annotations

import torch

from grading_common import Case, Check, Failure, close, label, rng
from lora_min.data import masked_lm_loss
from lora_min.model import GPT, GPTConfig, LoRAConfig, is_lora_param

TITLE = "adapting: LoRA vs full fine-tuning"
ALLOWED_IMPORTS = frozenset({"lora_min.data.masked_lm_loss", "lora_min.model.GPT"})  # what the starter imports


# -----------------------------------------------------------------------------
# Probes: run in the child, on the submission


def warm_up() -> None:
    """Run by the child before the submission: torch's first optimizer imports torch._dynamo
    (seconds on a busy machine), which must not count against the first case's time limit."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def build(config: dict, lora: dict | None, seed: int) -> GPT:
    """The "pretrained" model: the same weights wherever it is built with the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT(GPTConfig(**config), LoRAConfig(**lora) if lora else None)


def probe_trainable(student, config, lora, seed, method):
    model = build(config, lora, seed)
    returned = student.trainable_parameters(model, method)
    names = {id(p): name for name, p in model.named_parameters()}
    return {"returned": [names.get(id(p), "<not a parameter of the model>") for p in returned],
            "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()}}


def probe_adapt(student, config, lora, seed, method, input_ids, targets, loss_mask, steps, lr):
    model = build(config, lora, seed)
    params = prepare(model, method)
    losses = student.adapt(model, params, input_ids, targets, loss_mask, steps, lr)
    return {"losses": losses, "state": model.state_dict()}


def prepare(model: GPT, method: str) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad = method == "full" or is_lora_param(name)
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Cases and verdicts


def settings(name: str, n: int):
    random = rng(name)
    for _ in range(n):
        n_head = random.randint(1, 2)
        config = dict(n_layer=random.randint(1, 2), n_head=n_head, n_embd=8 * n_head, vocab_size=11, block_size=12)
        lora = dict(r=random.randint(1, 4), alpha=random.choice([4.0, 16.0]), dropout=0.0,
                    targets=random.sample("qkvo", random.randint(1, 3)))
        yield config, lora, random.randrange(2**31)


def trainable_cases(method: str) -> list[Case]:
    cases = []
    for config, lora, seed in settings(f"trainable_{method}", 4):
        model = build(config, lora, seed)
        expected = [name for name, p in model.named_parameters() if method == "full" or is_lora_param(name)]

        def verify(out, expected=expected):
            if len(out["returned"]) != len(set(out["returned"])):
                raise Failure("a parameter is returned twice (the tied wte / lm_head?): return each once")
            extra = [name for name in out["returned"] if name not in expected]
            missing = [name for name in expected if name not in out["returned"]]
            if extra or missing:
                raise Failure("; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                                        for what, names in (("returned but should not train", extra),
                                                            ("should train but not returned", missing)) if names))
            frozen_wrong = [name for name, flag in out["requires_grad"].items() if flag != (name in expected)]
            if frozen_wrong:
                raise Failure(f"requires_grad is wrong for {frozen_wrong[0]}"
                              f"{f' and {len(frozen_wrong) - 1} more' if len(frozen_wrong) > 1 else ''}")
        cases.append(Case(label(**config, lora=lora, seed=seed), probe_trainable,
                          dict(config=config, lora=lora, seed=seed, method=method), verify))
    return cases


def trainable_full_cases() -> list[Case]:
    return trainable_cases("full")


def trainable_lora_cases() -> list[Case]:
    return trainable_cases("lora")


def reference_run(config, lora, seed, method, input_ids, targets, loss_mask, steps, lr):
    """The run adapt() must do, with AdamW written out (PyTorch's algorithm, weight decay 0)."""
    model = build(config, lora, seed)
    params = prepare(model, method)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    losses = []
    for t in range(1, steps + 1):
        loss = masked_lm_loss(model(input_ids), targets, loss_mask)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, m_p, v_p in zip(params, grads, m, v):
                m_p.mul_(beta1).add_(g, alpha=1 - beta1)
                v_p.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v_p.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
                p.addcdiv_(m_p, denom, value=-lr / (1 - beta1**t))
        losses.append(loss.item())
    return losses, model.state_dict()


def adapt_cases(name: str, method: str, verify) -> list[Case]:
    cases = []
    for config, lora, seed in settings(name, 3):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 11, (4, 13), generator=g)
        loss_mask = torch.zeros(4, 12, dtype=torch.bool)
        loss_mask[:, 6:] = True  # the answer half, as in the toy of chapter 4
        inputs = dict(config=config, lora=lora if method == "lora" else None, seed=seed, method=method,
                      input_ids=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=loss_mask, steps=4, lr=1e-2)
        losses, state = reference_run(**inputs)
        before = build(config, inputs["lora"], seed).state_dict()
        cases.append(Case(label(**config, lora=inputs["lora"], seed=seed, steps=4, lr=1e-2), probe_adapt, inputs,
                          lambda out, losses=losses, state=state, before=before: verify(out, losses, state, before)))
    return cases


def compare_states(got: dict, expected: dict, before: dict, method: str) -> None:
    if not isinstance(got, dict) or sorted(got) != sorted(expected):
        raise Failure("adapt changed which parameters the model has")
    for name, value in expected.items():
        if method == "lora" and not is_lora_param(name) and not torch.equal(got[name], before[name]):
            raise Failure(f"{name} changed: LoRA must leave every pretrained weight untouched")
        if not torch.equal(value, before[name]) and torch.equal(got[name], before[name]):
            raise Failure(f"{name} did not change: train every parameter in params")
        close(got[name], value, f"{name} after adapting, vs the reference run", atol=1e-4)


def lora_adapt_cases() -> list[Case]:
    return adapt_cases("lora_adapt", "lora", lambda out, losses, state, before: compare_states(
        out["state"], state, before, "lora"))


def full_adapt_cases() -> list[Case]:
    return adapt_cases("full_adapt", "full", lambda out, losses, state, before: compare_states(
        out["state"], state, before, "full"))


def losses_cases() -> list[Case]:
    def verify(out, losses, state, before):
        got = out["losses"]
        if not isinstance(got, list) or len(got) != len(losses) or not all(isinstance(x, float) for x in got):
            raise Failure(f"adapt must return a list of {len(losses)} floats (loss.item() at each step)")
        close(torch.tensor(got), torch.tensor(losses), "the losses returned, vs the loss before each step", atol=1e-4)
    return adapt_cases("losses", "lora", verify)


CHECKS = [
    Check("full fine-tuning trains every parameter, each returned once", 2, trainable_full_cases),
    Check("LoRA trains only A and B; every pretrained weight is frozen", 2, trainable_lora_cases),
    Check("adapting with LoRA: AdamW steps of the masked loss, base weights untouched", 3, lora_adapt_cases),
    Check("full fine-tuning: the same steps move every weight", 2, full_adapt_cases),
    Check("adapt returns the loss before each step", 1, losses_cases),
]
