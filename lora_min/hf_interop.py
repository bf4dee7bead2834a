"""Trading adapters and merged models with the Hugging Face ecosystem (transformers + PEFT).

  export_peft / import_peft   our adapter tensors <-> PEFT's LoRA format for GPT2LMHeadModel
  export_merged               a plain transformers GPT-2 checkpoint with the update folded in

Adapter files of our own (save, load, swap, mix) live in lora_min/adapters.py; its command line
(python -m lora_min.adapters export-peft | import-peft | export-merged) calls these functions.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from lora_min.fileio import atomic_write_text
from lora_min.model import (
    CONV1D_WEIGHTS,
    GPT,
    LORA_TARGETS,
    GPTConfig,
    LoRAConfig,
    is_lora_param,
)
from lora_min.tokenizer import EOT
from lora_min.weights import HUB_NAMES, load_checkpoint, write_safetensors

#
# transformers' GPT-2 keeps q, k, v in one Conv1D `attn.c_attn` (in -> 3 * n_embd, rows of the
# output [q | k | v]) and PEFT puts one LoRA on the whole module: lora_A (r, in), lora_B (3C, r),
# update lora_B @ lora_A * alpha / r added to its (out, in) weight, i.e. one A shared by q, k, v.
# (PEFT's fan_in_fan_out=True for Conv1D only transposes when merging; lora_A/B have the same
# (r, in) / (out, r) layout as ours.)
#
# Ours -> PEFT, exactly: stack the A's of the adapted q/k/v targets, A' = [A_q; A_v] (2r x C),
# and place each B in its own columns and in its target's rows, B' = [[B_q, 0], [0, 0], [0, B_v]]
# (3C x 2r). Then B' A' = [B_q A_q; 0; B_v A_v]: q and v updated, k untouched. PEFT's rank for
# c_attn is k * r (k adapted targets among q, k, v), and alpha' = k * alpha keeps alpha'/r' = alpha/r.
# PEFT -> ours, exactly: q, k and v each get a copy of A and their slice of B.

PEFT_PREFIX = "base_model.model.transformer."
PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj)"
                      r"\.lora_(A|B)\.weight")


def export_peft(folder: str | Path, tensors: dict[str, torch.Tensor], lora: LoRAConfig, *,
                base_model: str = "gpt2") -> None:
    """Write LoRA tensors (lora_state_dict keys) as a PEFT adapter: adapter_config.json and
    adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained(GPT2LMHeadModel, folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qkv = [t for t in "qkv" if t in lora.targets]
    n_layer = 1 + max(int(k.split(".")[1]) for k in tensors)
    peft_tensors = {}
    for i in range(n_layer):
        lora_of = {t: (tensors[f"h.{i}.attn.lora.{t}.A"], tensors[f"h.{i}.attn.lora.{t}.B"]) for t in lora.targets}
        if qkv:
            n_embd, r = lora_of[qkv[0]][1].shape
            A = torch.cat([lora_of[t][0] for t in qkv])  # (k r, C)
            B = A.new_zeros(3 * n_embd, len(qkv) * r)  # (3C, k r), block per target
            for j, t in enumerate(qkv):
                row = "qkv".index(t) * n_embd
                B[row : row + n_embd, j * r : (j + 1) * r] = lora_of[t][1]
            peft_tensors[f"{PEFT_PREFIX}h.{i}.attn.c_attn.lora_A.weight"] = A
            peft_tensors[f"{PEFT_PREFIX}h.{i}.attn.c_attn.lora_B.weight"] = B
        if "o" in lora.targets:
            peft_tensors[f"{PEFT_PREFIX}h.{i}.attn.c_proj.lora_A.weight"] = lora_of["o"][0]
            peft_tensors[f"{PEFT_PREFIX}h.{i}.attn.c_proj.lora_B.weight"] = lora_of["o"][1]
    modules = (["attn.c_attn"] if qkv else []) + (["attn.c_proj"] if "o" in lora.targets else [])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": HUB_NAMES.get(base_model, base_model),
        # "attn.c_proj" rather than "c_proj": PEFT matches by suffix and mlp.c_proj must stay untouched.
        "target_modules": modules,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "rank_pattern": {"attn.c_attn": len(qkv) * lora.r} if qkv else {},
        "alpha_pattern": {"attn.c_attn": len(qkv) * lora.alpha} if qkv else {},
        "lora_dropout": lora.dropout,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out); PEFT would set it anyway
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_safetensors(folder / "adapter_model.safetensors", {k: v.contiguous() for k, v in peft_tensors.items()},
                      {"format": "pt"})
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def _peft_scaling(config: dict, module: str, rank: int, source: str) -> float:
    """PEFT's alpha / r (or alpha / sqrt(r) with rsLoRA) for `module`, patterns included."""
    def pattern_value(patterns: dict, default):
        for key, value in (patterns or {}).items():  # PEFT's get_pattern_key: first match wins
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern_value(config.get("rank_pattern"), config.get("r", 8))  # 8: PEFT's default
    if r != rank:
        raise ValueError(f"{source}: {module} has rank {rank} but adapter_config.json says r={r}")
    alpha = pattern_value(config.get("alpha_pattern"), config.get("lora_alpha", 8))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{source}: lora_alpha for {module} is {alpha!r}, not a positive number")
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_peft_config(folder: str | Path) -> dict:
    """adapter_config.json of a PEFT adapter folder, as a dict; errors name the file."""
    config_file = Path(folder) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json; is this a PEFT adapter folder?")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON
        raise ValueError(f"{config_file}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    return config


def _adapted_layers(config: dict, n_layer: int) -> set[int] | None:
    """The layers PEFT put LoRA in, as adapter_config.json says (None: a regex or exclusion decided)."""
    if isinstance(config.get("target_modules"), str) or config.get("exclude_modules"):
        return None
    layers = config.get("layers_to_transform")
    if layers is None:  # target_modules names modules, matched in every layer
        return set(range(n_layer))
    return {layers} if isinstance(layers, int) else set(layers)


def _check_peft_config(config: dict, source: str) -> None:
    unsupported = {
        "peft_type": (config.get("peft_type") != "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
        "use_dora": (bool(config.get("use_dora")), "DoRA (use_dora=true)"),
        "bias": (config.get("bias", "none") != "none", f"trained biases (bias={config.get('bias')!r})"),
        "lora_bias": (bool(config.get("lora_bias")), "a bias on lora_B (lora_bias=true)"),
        "modules_to_save": (bool(config.get("modules_to_save")),
                            f"fully trained modules (modules_to_save={config.get('modules_to_save')})"),
    }
    for key, (bad, what) in unsupported.items():
        if bad:
            raise ValueError(f"{source}: {key}: lora-min cannot express {what}")


def import_peft(folder: str | Path, base: GPTConfig) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """Read a PEFT LoRA adapter for GPT-2 `base` as (lora_state_dict tensors, LoRAConfig).

    Expressible: LoRA on attn.c_attn (becomes q, k, v, each with a copy of A and its slice of B)
    and attn.c_proj (becomes o), any ranks, alphas and layers. Rank components whose B column is
    zero add nothing and are dropped (so a target never updated disappears); then every update
    is zero-padded to the largest rank left, and per-module scalings are folded into B.
    Anything else (mlp.c_fc, mlp.c_proj, embeddings, DoRA, biases) fails, naming it.
    """
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    config = read_peft_config(folder)
    _check_peft_config(config, str(config_file))
    found = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{folder}: found neither adapter_model.safetensors nor adapter_model.bin")
    state = load_checkpoint(found[0])

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, module) -> {"A": .., "B": ..}
    for key, value in state.items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            what = next((m for m in ("mlp.c_fc", "mlp.c_proj", "wte", "wpe", "lm_head") if m in key), "this tensor")
            raise ValueError(f"{found[0]}: {key!r}: lora-min cannot express LoRA on {what}; it adapts only "
                             "attention (attn.c_attn as q, k, v and attn.c_proj as o)")
        layer, module, which = int(match[1]), match[2], match[3]
        if layer >= base.n_layer:
            raise ValueError(f"{found[0]}: {key!r}: layer {layer}, but the base has {base.n_layer} layers")
        pairs.setdefault((layer, module), {})[which] = value

    expected = _adapted_layers(config, base.n_layer)
    for module in sorted({module for _, module in pairs}):
        layers = sorted(layer for layer, m in pairs if m == module)
        if expected is not None and set(layers) != expected:
            raise ValueError(f"{found[0]}: {module} has LoRA tensors for layers {layers}, but {config_file.name} "
                             f"says layers {sorted(expected)} of this {base.n_layer}-layer base: the adapter "
                             "was made for another base")

    C = base.n_embd
    updates: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}  # (layer, target) -> A, B, scale
    for (layer, module), ab in sorted(pairs.items()):
        if ab.keys() != {"A", "B"}:
            raise ValueError(f"{found[0]}: h.{layer}.{module} has lora_{''.join(ab)} but not both A and B")
        A, B = ab["A"], ab["B"]
        out = 3 * C if module == "attn.c_attn" else C
        if A.shape != (A.size(0), C) or B.shape != (out, A.size(0)):
            raise ValueError(f"{found[0]}: h.{layer}.{module}: lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)} do not fit n_embd={C}")
        scale = _peft_scaling(config, f"transformer.h.{layer}.{module}", A.size(0), str(config_file))
        targets = "qkv" if module == "attn.c_attn" else "o"
        for j, t in enumerate(targets):
            B_t = B[j * C : (j + 1) * C]
            used = B_t.ne(0).any(dim=0)  # rank components that change anything
            if used.any():
                updates[(layer, t)] = (A[used], B_t[:, used], scale)

    targets = tuple(t for t in LORA_TARGETS if any(t == target for _, target in updates))
    if not targets:
        raise ValueError(f"{folder}: every lora_B is zero: this adapter changes nothing")
    r = max(A.size(0) for A, _, _ in updates.values())
    scale = next(iter(updates.values()))[2]
    dtype = next(iter(state.values())).dtype
    tensors = {}
    for layer in range(base.n_layer):
        for t in targets:
            A = torch.zeros(r, C, dtype=dtype)
            B = torch.zeros(C, r, dtype=dtype)
            if (layer, t) in updates:
                A_t, B_t, scale_t = updates[(layer, t)]
                A[: A_t.size(0)] = A_t
                B[:, : B_t.size(1)] = B_t if scale_t == scale else B_t * (scale_t / scale)
            tensors[f"h.{layer}.attn.lora.{t}.A"], tensors[f"h.{layer}.attn.lora.{t}.B"] = A, B
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"{config_file}: lora_dropout is {dropout!r}, not a number in [0, 1)")
    return tensors, LoRAConfig(r=r, alpha=scale * r, dropout=float(dropout), targets=targets)


@torch.no_grad()
def merged_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The base weights with the active LoRA folded in (summed in float32), the model untouched.
    Weights without an update are the model's own tensors, not copies."""
    state = {k: v for k, v in model.state_dict().items()
             if not is_lora_param(k) and k != "lm_head.weight"}  # lm_head is tied to wte
    for i, block in enumerate(model.h):
        attn = block.attn

        def merged(target: str) -> torch.Tensor:  # W0 + scale * B A, or W0 when not adapted (or merged already)
            weight, update = attn.base_weight(target), attn.lora[target] if target in attn.lora else None
            if update is None or update.merged:
                return weight
            return (weight.float() + update.delta_weight()).to(weight.dtype)

        if any(t in attn.lora for t in "qkv"):
            state[f"h.{i}.attn.c_attn.weight"] = torch.cat([merged(t) for t in "qkv"])  # rows [q | k | v]
        if "o" in attn.lora:
            state[f"h.{i}.attn.c_proj.weight"] = merged("o")
    return state


def export_merged(model: GPT, folder: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the model with its LoRA folded in as a Hugging Face GPT-2 checkpoint (config.json +
    model.safetensors in the official layout) for transformers.GPT2LMHeadModel.from_pretrained.
    `metadata` goes into the safetensors header beside {"format": "pt"}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(model)
    # Back to the official layout: Conv1D weights are stored (in, out).
    state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in state.items()}  # written contiguous
    c = model.config
    eos = EOT if c.vocab_size == 50257 else None  # <|endoftext|> in GPT-2's own vocabulary
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": 0.02, "bos_token_id": eos, "eos_token_id": eos,
        "tie_word_embeddings": True,
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }
    write_safetensors(folder / "model.safetensors", state, {"format": "pt", **(metadata or {})})
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
