"""Adapters as files: save, load, hot-swap, mix in one batch, and trade with Hugging Face.

The point of LoRA is that one frozen base model serves many tasks, each a file of a few hundred
kilobytes swapped in RAM (Hu et al., 2021, §1 and §4.2). This module makes that concrete:

  1. Adapter files  - `save_adapter` / `load_adapter`: the A and B tensors plus metadata in one
                      safetensors file, checked against the model they are loaded into.
  2. Hot swap       - `add_adapter`, `set_adapter`, `disable_adapters`: many adapters resident;
                      switching points each attention layer at another adapter's LoRA modules.
  3. Mixed batches  - `mixed_adapters`: every batch row its own adapter in one forward pass,
                      gathering per-row A and B as S-LoRA/Punica do.
  4. Command line   - python -m lora_min.adapters info | export-peft | import-peft | export-merged
                      (the Hugging Face conversions themselves are in lora_min/hf_interop.py)

Nothing here touches the base weights except merging (which GPT.merge_lora does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from lora_min.decode import EOS_IDS, greedy
from lora_min.demo import DEMO, DEMO_CONFIG, load_base
from lora_min.hf_interop import export_merged, export_peft, import_peft, read_peft_config
from lora_min.model import (
    GPT,
    GPT2_SIZES,
    LORA_TARGETS,
    GPTConfig,
    LoRA,
    LoRAConfig,
    lora_state_dict,
)
from lora_min.weights import (
    DTYPE_NAMES,
    HUB_NAMES,
    read_safetensors,
    warn_if_not_finite,
    write_safetensors,
)

FORMAT = "lora-min adapter"
FORMAT_VERSION = "1"
METADATA_KEYS = ("base_model", "base_config", "base_config_sha256", "lora_r", "lora_alpha", "lora_dropout",
                 "lora_targets")  # what write_adapter records and readers rely on

# -----------------------------------------------------------------------------
# 1. Adapter files
#
# An adapter file is a safetensors file holding exactly lora_state_dict(model), keys like
# "h.0.attn.lora.q.A", and string metadata: which base it belongs to (name, architecture and a
# hash of it), the LoRAConfig, the dtype, and a sha256 over everything else in the file.
# The safetensors reader already rejects truncated or malformed files; the checksum also
# catches edited values (a flipped bit, a changed alpha). It guards against accidents, not
# attackers: whoever edits the file can recompute it.


def base_architecture(config: GPTConfig) -> dict[str, int]:
    """The GPTConfig fields that decide the shapes of the weights (dropout does not)."""
    return {k: v for k, v in asdict(config).items() if k != "dropout"}


def base_config_hash(config: GPTConfig) -> str:
    return hashlib.sha256(json.dumps(base_architecture(config), sort_keys=True).encode()).hexdigest()[:16]


def adapter_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of the metadata (but this checksum) and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    fields = {k: v for k, v in metadata.items() if k != "checksum_sha256"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{DTYPE_NAMES[tensor.dtype]}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_adapter(path: str | Path, tensors: dict[str, torch.Tensor], lora: LoRAConfig, base: GPTConfig,
                  base_model: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Write LoRA `tensors` with their metadata to `path` (atomically)."""
    dtypes = {t.dtype for t in tensors.values()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": str(base_model),
        "base_config": json.dumps(base_architecture(base), sort_keys=True),
        "base_config_sha256": base_config_hash(base),
        "lora_r": str(lora.r),
        "lora_alpha": repr(float(lora.alpha)),
        "lora_dropout": repr(float(lora.dropout)),
        "lora_targets": ",".join(lora.targets),
        "dtype": ",".join(sorted(str(d).removeprefix("torch.") for d in dtypes)),
    }
    for key, value in (extra_metadata or {}).items():
        if key in metadata or key == "checksum_sha256":
            raise ValueError(f"extra_metadata key {key!r} is reserved by the adapter format")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"extra_metadata must map str to str, got {key!r}: {value!r}")
        metadata[key] = value
    metadata["checksum_sha256"] = adapter_checksum(tensors, metadata)
    write_safetensors(path, tensors, metadata)


def save_adapter(model: GPT, path: str | Path, *, base_model: str = "gpt2",
                 extra_metadata: dict[str, str] | None = None) -> None:
    """Save the model's (active) LoRA tensors and what they fit to `path`, atomically.

    base_model: what lora_min.demo.load_base should load to use this adapter ('gpt2', 'demo' or a path).
    extra_metadata: more strings to keep in the file (training step, loss, ...).
    """
    if model.lora_config is None:
        raise ValueError("this model has no LoRA: build it with GPT(config, lora=LoRAConfig(...))")
    write_adapter(path, lora_state_dict(model), model.lora_config, model.config, base_model, extra_metadata)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file, after checking its format and checksum."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lora-min adapter (metadata 'format' is {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {metadata.get('format_version')!r}; this lora-min "
                         f"reads version {FORMAT_VERSION}")
    if metadata.get("checksum_sha256") != adapter_checksum(tensors, metadata):
        raise ValueError(f"{path}: contents do not match the checksum_sha256 in its metadata "
                         "(the file was corrupted or edited)")
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{path}: adapter metadata lacks {', '.join(missing)}")
    lora_config_from_metadata(metadata, str(path))  # a valid checksum can still cover bad values
    _architecture_from_metadata(metadata, str(path))
    warn_if_not_finite(tensors, str(path))
    return tensors, metadata


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an adapter file (fully checked, like read_adapter)."""
    return read_adapter(path)[1]


def lora_config_from_metadata(metadata: dict[str, str], source: str = "adapter") -> LoRAConfig:
    """The LoRAConfig an adapter was trained with: build GPT(..., lora=this) to load it."""
    try:
        return LoRAConfig(r=int(metadata["lora_r"]), alpha=float(metadata["lora_alpha"]),
                          dropout=float(metadata["lora_dropout"]),
                          targets=tuple(metadata["lora_targets"].split(",")))
    except KeyError as err:
        raise ValueError(f"{source}: adapter metadata has no {err} key") from None
    except ValueError as err:  # int("four"), or a value LoRAConfig refuses
        raise ValueError(f"{source}: bad LoRA settings in the adapter metadata: {err}") from None


def _architecture_from_metadata(metadata: dict[str, str], source: str) -> dict:
    """The base architecture an adapter's metadata records (base_architecture's dict)."""
    try:
        architecture = json.loads(metadata["base_config"])
    except ValueError as err:
        raise ValueError(f"{source}: adapter metadata 'base_config' is not JSON: {err}") from None
    if not isinstance(architecture, dict):
        raise ValueError(f"{source}: adapter metadata 'base_config' is not a JSON object: {architecture!r}")
    return architecture


def model_from_adapter(path: str | Path, base: str | Path | None = None) -> GPT:
    """The base model the adapter names (or `base`: a GPT-2 name, 'demo' or a path), with the adapter loaded."""
    metadata = read_adapter_metadata(path)
    model = load_base(base or metadata["base_model"], lora=lora_config_from_metadata(metadata))
    load_adapter(model, path)
    return model


def check_base(model: GPT, metadata: dict[str, str], source: str) -> None:
    """Refuse an adapter trained on a base of another architecture, naming what differs."""
    theirs, ours = _architecture_from_metadata(metadata, source), base_architecture(model.config)
    if theirs != ours:
        diffs = ", ".join(f"{k} {theirs.get(k)} (adapter) vs {ours.get(k)} (model)"
                          for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k))
        raise ValueError(f"{source}: adapter was trained on another base ({metadata['base_model']}, config hash "
                         f"{metadata['base_config_sha256']} vs {base_config_hash(model.config)}): {diffs}")


def expected_lora_shapes(config: GPTConfig, lora: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """The key -> shape of every LoRA tensor a model with these configurations has."""
    shapes = {}
    for i in range(config.n_layer):
        for t in lora.targets:
            shapes[f"h.{i}.attn.lora.{t}.A"] = (lora.r, config.n_embd)
            shapes[f"h.{i}.attn.lora.{t}.B"] = (config.n_embd, lora.r)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], config: GPTConfig, lora: LoRAConfig, source: str) -> None:
    expected = expected_lora_shapes(config, lora)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: LoRA tensors do not match r={lora.r}, targets={lora.targets}: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")


@torch.no_grad()
def load_adapter(model: GPT, path: str | Path) -> dict[str, str]:
    """Copy an adapter file's A and B into the model's (active) LoRA; return the file's metadata.

    The model must have the same base architecture and the same LoRA rank, alpha and targets
    (lora_config_from_metadata(metadata) builds the matching LoRAConfig); anything else fails
    with a message naming the mismatch.
    """
    tensors, metadata = read_adapter(path)
    check_base(model, metadata, str(path))
    theirs, ours = lora_config_from_metadata(metadata), model.lora_config
    if ours is None:
        raise ValueError(f"{path}: the model has no LoRA; build it with lora={theirs}")
    for field in ("targets", "r", "alpha"):  # dropout only matters in training; any is fine
        if getattr(theirs, field) != getattr(ours, field):
            raise ValueError(f"{path}: adapter has {field}={getattr(theirs, field)!r} but the model's LoRA has "
                             f"{field}={getattr(ours, field)!r}")
    _refuse_if_merged(model, f"load {path}")
    check_tensors(tensors, model.config, theirs, str(path))
    own = lora_state_dict(model)
    for key, value in tensors.items():
        own[key].copy_(value)
    return metadata


# -----------------------------------------------------------------------------
# 2. Hot swap
#
# Each attention layer finds its LoRA updates in `attn.lora`, a ModuleDict target -> LoRA.
# A resident adapter is one such ModuleDict per layer, and switching adapters rebinds
# `attn.lora` to another adapter's ModuleDict: no tensor is copied, the base weights are never
# touched, and adapters may differ in rank, alpha and targets. Resident adapters live in
# `model.resident_adapters` (a plain dict, so they are not parameters of the model).


@dataclass
class Adapter:
    config: LoRAConfig
    layers: nn.ModuleList  # layers[i] is bound to model.h[i].attn.lora while this adapter is active


def new_lora_modules(model: GPT, tensors: dict[str, torch.Tensor], config: LoRAConfig) -> nn.ModuleList:
    """One ModuleDict of LoRA modules per layer, holding copies of `tensors`."""
    n_embd, device, dtype = model.config.n_embd, model.wte.weight.device, model.wte.weight.dtype
    layers = nn.ModuleList()
    for i in range(model.config.n_layer):
        with torch.device("meta"):  # no random init: the values come from `tensors`
            layer = nn.ModuleDict({t: LoRA(n_embd, n_embd, config) for t in config.targets})
        layer = layer.to_empty(device=device).to(dtype)
        with torch.no_grad():
            for t, update in layer.items():
                update.A.copy_(tensors[f"h.{i}.attn.lora.{t}.A"])
                update.B.copy_(tensors[f"h.{i}.attn.lora.{t}.B"])
        layers.append(layer)
    return layers


def add_adapter(model: GPT, name: str, source: str | Path | dict[str, torch.Tensor],
                config: LoRAConfig | None = None) -> None:
    """Make an adapter resident under `name`: from an adapter file, or from LoRA tensors
    (lora_state_dict keys) with their `config` (default: the model's LoRAConfig).
    It follows the model's device and dtype; set_adapter activates it."""
    if name in model.resident_adapters:
        raise ValueError(f"an adapter named {name!r} is already resident; remove_adapter it first")
    if isinstance(source, dict):
        tensors, config, where = source, config or model.lora_config, f"adapter {name!r}"
        if config is None:
            raise ValueError(f"adapter {name!r}: pass the LoRAConfig its tensors were made with")
    else:
        tensors, metadata = read_adapter(source)
        config, where = lora_config_from_metadata(metadata), str(source)
        check_base(model, metadata, where)
    check_tensors(tensors, model.config, config, where)
    model.resident_adapters[name] = Adapter(config, new_lora_modules(model, tensors, config))


def remove_adapter(model: GPT, name: str) -> None:
    if model.active_adapter == name:
        raise ValueError(f"adapter {name!r} is active; set_adapter another one first")
    del model.resident_adapters[_known(model, name)]


def _known(model: GPT, name: str) -> str:
    if name not in model.resident_adapters:
        raise KeyError(f"no resident adapter {name!r}; resident: {sorted(model.resident_adapters)}")
    return name


def _resident_like_model(model: GPT, name: str) -> Adapter:
    """Resident adapter `name`, on the model's device and dtype and in its train/eval mode:
    model.to(...) and model.eval() reached only the adapter that was active at the time."""
    adapter = model.resident_adapters[_known(model, name)]
    weight, first = model.wte.weight, adapter.layers[0][adapter.config.targets[0]]
    if (first.A.device, first.A.dtype) != (weight.device, weight.dtype):
        adapter.layers.to(weight.device, weight.dtype)
    if first.training != model.training:  # the layers always change mode together
        adapter.layers.train(model.training)
    return adapter


def _refuse_if_merged(model: GPT, action: str) -> None:
    if any(update.merged for _, _, update in model.lora_updates()):
        raise ValueError(f"cannot {action} while the active LoRA is merged into the weights; "
                         "call model.unmerge_lora() first")


def set_adapter(model: GPT, name: str) -> None:
    """Make resident adapter `name` the one every forward pass uses. Costs one attribute
    assignment per layer (tens of microseconds), whatever the adapter's size.

    For serving at zero extra cost, merge it afterwards (model.merge_lora()) and unmerge
    (model.unmerge_lora(), exact up to float rounding) before switching again.
    """
    adapter = _resident_like_model(model, name)
    _refuse_if_merged(model, f"switch to adapter {name!r}")
    for block, layer in zip(model.h, adapter.layers):
        block.attn.lora = layer
    model.lora_config = adapter.config
    model.active_adapter = name


@contextmanager
def _lora_bound(model: GPT, layers: Sequence[nn.ModuleDict]) -> Iterator[None]:
    """Bind `layers[i]` as model.h[i].attn.lora for the duration, then restore."""
    saved = [block.attn.lora for block in model.h]
    for block, layer in zip(model.h, layers):
        block.attn.lora = layer
    try:
        yield
    finally:
        for block, layer in zip(model.h, saved):
            block.attn.lora = layer


@contextmanager
def disable_adapters(model: GPT) -> Iterator[None]:
    """Run the plain base model inside the block: each layer sees no LoRA updates at all."""
    _refuse_if_merged(model, "disable adapters")
    no_updates = nn.ModuleDict()  # one empty dict serves every layer
    with _lora_bound(model, [no_updates] * len(model.h)):
        yield


# -----------------------------------------------------------------------------
# 3. Mixed-adapter batches
#
# Serving many adapters at once (S-LoRA, Sheng et al., 2023; Punica, Chen et al., 2023): the
# base model's matmuls are shared by the whole batch, and each row adds its own adapter's
# B A x. Punica's BGMV kernel gathers each row's A and B by an index; here the gather is
# tensor indexing and the products are two batched matmuls.


class PerRowLoRA(nn.Module):
    """The LoRA updates of several adapters for one projection; batch row i uses updates[i].

    The distinct updates are stacked once, ranks zero-padded to the largest (zero rows of A and
    zero columns of B add exactly nothing), behind slot 0: the zero update, for rows without one.
    """

    merged = False  # read by CausalSelfAttention.adapt; a per-row update is never in W0

    def __init__(self, updates: Sequence[LoRA | None]):
        super().__init__()
        distinct = list({id(u): u for u in updates if u is not None}.values())
        slot_of = {id(u): slot for slot, u in enumerate(distinct, start=1)}
        r = max(u.A.size(0) for u in distinct)
        (_, n_in), (n_out, _) = distinct[0].A.shape, distinct[0].B.shape
        like = distinct[0].A
        A = like.new_zeros(len(distinct) + 1, r, n_in)
        B = like.new_zeros(len(distinct) + 1, n_out, r)
        scale = like.new_zeros(len(distinct) + 1)
        with torch.no_grad():
            for slot, u in enumerate(distinct, start=1):
                A[slot, : u.A.size(0)], B[slot, :, : u.B.size(1)], scale[slot] = u.A, u.B, u.scale
        rows = torch.tensor([slot_of.get(id(u), 0) for u in updates], device=like.device)
        # Buffers (so .to() moves them) that state_dict leaves out: they are copies, not weights.
        self.register_buffer("A", A, persistent=False)  # (n_slots, r, in)
        self.register_buffer("B", B, persistent=False)  # (n_slots, out, r)
        self.register_buffer("scale", scale, persistent=False)  # (n_slots,)
        self.register_buffer("rows", rows, persistent=False)  # (batch,) slot of each row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, T, in) -> (batch, T, out); mixed_adapters checks that batch == len(rows)
        A, B, scale = self.A[self.rows], self.B[self.rows], self.scale[self.rows]  # gather per row
        return (x @ A.mT @ B.mT) * scale[:, None, None]  # (batch, T, r) -> (batch, T, out)

    def delta_weight(self) -> torch.Tensor:
        raise ValueError("a mixed-adapter batch cannot be merged into the weights")


@contextmanager
def mixed_adapters(model: GPT, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses resident adapter names[i] (None: no adapter).

    Works with a KVCache (the rows are the cache's rows) as long as nothing drops or reorders
    rows; greedy_mixed decodes with it. Inference only: no LoRA dropout.
    """
    if not names:
        raise ValueError("mixed_adapters needs one adapter name (or None) per batch row; got no names")
    _refuse_if_merged(model, "mix adapters")
    adapters = [_resident_like_model(model, n) if n is not None else None for n in names]
    layers = []
    for i in range(model.config.n_layer):
        per_target = {t: [a.layers[i][t] if a is not None and t in a.config.targets else None for a in adapters]
                      for t in LORA_TARGETS}
        layers.append(nn.ModuleDict({t: PerRowLoRA(updates) for t, updates in per_target.items()
                                     if any(u is not None for u in updates)}))
    def check_rows(_: GPT, args: tuple, kwargs: dict) -> None:  # also when no row has an adapter
        rows = (args[0] if args else kwargs["idx"]).size(0)
        if rows != len(names):
            raise ValueError(f"mixed_adapters was given {len(names)} adapter names but the batch has {rows} "
                             "rows (decoding that drops or reorders rows needs greedy_mixed)")

    hook = model.register_forward_pre_hook(check_rows, with_kwargs=True)
    try:
        with _lora_bound(model, layers):
            yield
    finally:
        hook.remove()


def greedy_mixed(model: GPT, prompts: Sequence[Sequence[int]], names: Sequence[str | None],
                 max_new_tokens: int, eos_ids: Sequence[int] = EOS_IDS) -> list[list[int]]:
    """lora_min.decode.greedy with prompt i decoded under adapter names[i], all in one batch.

    greedy drops rows as they finish, which would misalign rows and adapters, so every row runs
    max_new_tokens steps (eos_ids=()) and is cut at its first EOS afterwards: a row's tokens
    before its EOS do not depend on whether it or other rows keep going.
    """
    if len(prompts) != len(names):
        raise ValueError(f"{len(prompts)} prompts but {len(names)} adapter names")
    eos = set(eos_ids)
    with mixed_adapters(model, names):
        tokens = greedy(model, prompts, max_new_tokens, eos_ids=(), batch_size=len(prompts))
    cut = [next((j for j, t in enumerate(row) if t in eos), len(row)) for row in tokens]
    return [row[:end] for row, end in zip(tokens, cut)]


# -----------------------------------------------------------------------------
# 4. Command line


def _base_config(name_or_path: str) -> GPTConfig:
    if name_or_path in GPT2_SIZES:
        return GPTConfig.from_name(name_or_path)
    return DEMO_CONFIG if name_or_path == DEMO else GPT.from_pretrained(name_or_path).config


def info(path: str | Path) -> str:
    """A human-readable summary of an adapter file."""
    tensors, metadata = read_adapter(path)
    n_params = sum(t.numel() for t in tensors.values())
    lines = [f"{path}: {Path(path).stat().st_size:,} bytes, {len(tensors)} tensors, {n_params:,} parameters, "
             "checksum OK"]
    lines += [f"  {key}: {value}" for key, value in sorted(metadata.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_min.adapters", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    adapter_help = "adapter file written by train.py or save_adapter (.safetensors)"
    p = commands.add_parser("info", help="show an adapter file's metadata (and check it)")
    p.add_argument("adapter", help=adapter_help)
    p = commands.add_parser("export-peft", help="adapter file -> PEFT adapter folder")
    p.add_argument("adapter", help=adapter_help)
    p.add_argument("out_dir", help="folder to write adapter_config.json and adapter_model.safetensors to")
    p = commands.add_parser("import-peft", help="PEFT adapter folder -> adapter file")
    p.add_argument("peft_dir", help="folder with a PEFT adapter's adapter_config.json and adapter_model.safetensors")
    p.add_argument("out_file", help="adapter file to write (.safetensors)")
    p.add_argument("--base", help="base model: gpt2, gpt2-medium, ..., demo, or a path "
                                  "(default: adapter_config.json's)")
    p = commands.add_parser("export-merged", help="adapter file + base -> Hugging Face GPT-2 checkpoint folder")
    p.add_argument("adapter", help=adapter_help)
    p.add_argument("out_dir", help="folder to write config.json and model.safetensors to")
    p.add_argument("--base", help="base model: gpt2, gpt2-medium, ..., demo, or a path "
                                  "(default: the one the adapter names)")
    args = parser.parse_args(argv)
    try:
        run_command(args)
    except (OSError, ValueError, KeyError) as err:  # a missing or malformed file or base, a failed download
        parser.exit(2, f"{parser.prog} {args.command}: error: {err.args[0] if isinstance(err, KeyError) else err}\n")


def run_command(args: argparse.Namespace) -> None:
    if args.command == "info":
        print(info(args.adapter))
    elif args.command == "export-peft":
        tensors, metadata = read_adapter(args.adapter)
        export_peft(args.out_dir, tensors, lora_config_from_metadata(metadata), base_model=metadata["base_model"])
        print(f"wrote {args.out_dir}/adapter_config.json and adapter_model.safetensors")
    elif args.command == "import-peft":
        base = args.base or read_peft_config(args.peft_dir).get("base_model_name_or_path")
        if not base:
            raise SystemExit("adapter_config.json names no base model; pass --base")
        base = {hub: name for name, hub in HUB_NAMES.items()}.get(base, base)
        base_config = _base_config(base)
        tensors, lora = import_peft(args.peft_dir, base_config)
        write_adapter(args.out_file, tensors, lora, base_config, base)
        print(f"wrote {args.out_file}: r={lora.r}, alpha={lora.alpha:g}, targets={','.join(lora.targets)}")
    elif args.command == "export-merged":
        export_merged(model_from_adapter(args.adapter, args.base), args.out_dir)
        print(f"wrote {args.out_dir}/config.json and model.safetensors")


if __name__ == "__main__":
    main()
