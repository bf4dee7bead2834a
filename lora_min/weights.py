"""Reading and writing checkpoints: a small safetensors reader/writer and GPT-2 hub download.

The safetensors layout (https://github.com/huggingface/safetensors, "Format"):
    8 bytes  N, the header length (unsigned little-endian 64-bit integer)
    N bytes  a UTF-8 JSON object, starting with "{", maybe padded with spaces: {"name":
             {"dtype": "F32", "shape": [768, 2304], "data_offsets": [begin, end]}, ...,
             "__metadata__": {"key": "value"}}  (metadata optional, strings only)
    rest     the byte buffer: each tensor's little-endian, C-order bytes at its offsets
             (counted from the buffer's start); the tensors tile it exactly, without holes.
The reader reads each tensor straight from the file into its own memory (one copy, no
memory map: a map would crash the process with SIGBUS if the file were rewritten while in use).
Like the official library it assumes a little-endian host.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch

from lora_min.download import download_file
from lora_min.fileio import atomic_write_bytes
from lora_min.model import CONV1D_WEIGHTS, GPT2_SIZES, GPTConfig

# safetensors dtype names <-> torch dtypes (the subset GPT-2 checkpoints and LoRA need).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

HUB_URL = "https://huggingface.co"
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",                # 124M parameters
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",    # 774M
    "gpt2-xl": "openai-community/gpt2-xl",          # 1558M
}


def _is_count(value: object) -> bool:
    """A JSON value usable as a size or offset: a non-negative int (JSON true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: Path) -> tuple[dict, int, int]:
    """Parse the JSON header of `path`; return it, the byte buffer's file offset and length."""
    file_size = path.stat().st_size
    if file_size < 8:
        raise ValueError(f"{path}: not a safetensors file: {file_size} bytes is shorter than the "
                         "8-byte header length field")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        # Check before reading: a corrupt length (say 2**60) must not make us allocate it.
        if header_len > file_size - 8:
            raise ValueError(f"{path}: header length {header_len} is larger than the {file_size - 8} "
                             "bytes after the length field (truncated or not a safetensors file)")
        header_bytes = f.read(header_len)
    if not header_bytes.startswith(b"{"):
        raise ValueError(f"{path}: header is not a JSON object (it must start with '{{')")
    try:  # valid JSON that starts with "{" is an object, so `header` is a dict
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON, a 10,000-digit integer
        raise ValueError(f"{path}: header is not valid UTF-8 JSON: {err}") from None
    return header, 8 + header_len, file_size - 8 - header_len


def _check_entry(path: Path, name: str, entry: object, buffer_len: int) -> tuple[int, int]:
    """Validate one tensor's header entry against the buffer; return its (begin, end) offsets."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if not begin <= end <= buffer_len:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] lie outside the "
                         f"{buffer_len}-byte data buffer")
    n_bytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != n_bytes:
        raise ValueError(f"{where}: shape {shape} of {dtype} needs {n_bytes} bytes but data_offsets "
                         f"[{begin}, {end}] hold {end - begin}")
    return begin, end


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .safetensors file into (tensors, metadata); ValueError names any malformation.

    The tensors are in memory, independent of the file: it may change or vanish afterwards.
    """
    path = Path(path)
    header, buffer_start, buffer_len = _read_header(path)
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: __metadata__ must be a JSON object of strings, got {metadata!r}")
    spans = {name: _check_entry(path, name, entry, buffer_len) for name, entry in header.items()}

    # The tensors must tile the buffer exactly: sorted by offset, each starts where the
    # previous ended (no overlap, no hole) and the last ends at the end of the file.
    position, previous = 0, "the start of the buffer"
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin != position:
            problem = "overlaps" if begin < position else f"leaves a {begin - position}-byte gap after"
            raise ValueError(f"{path}: tensor {name!r} at [{begin}, {end}] {problem} {previous}")
        position, previous = end, f"tensor {name!r}"
    if position != buffer_len:
        raise ValueError(f"{path}: {buffer_len - position} unused bytes after the last tensor")

    tensors = {}
    with open(path, "rb") as f:
        for name, (begin, end) in spans.items():
            dtype, shape = DTYPES[header[name]["dtype"]], header[name]["shape"]
            try:
                tensor = torch.empty(shape, dtype=dtype)
            except (RuntimeError, TypeError):  # e.g. shape [0, 2**70]
                raise ValueError(f"{path}: tensor {name!r}: shape {shape} is too large") from None
            f.seek(buffer_start + begin)
            if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: the file shrank while tensor {name!r} was being read")
            tensors[name] = tensor
    return tensors, metadata


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device, any strides) and string `metadata` to `path`, atomically."""
    path = Path(path)
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map str to str, got {metadata!r}")

    # Widest dtypes first: with an 8-byte aligned buffer start, every tensor is then
    # aligned to its element size (the official writer does the same).
    names = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        n_bytes = tensor.numel() * tensor.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the buffer starts 8-byte aligned

    def write(f: BinaryIO) -> None:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in names:  # one tensor at a time: only one CPU copy alive at once
            raw = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(raw.numpy().data)

    atomic_write_bytes(path, write)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a .safetensors or .bin/.pt file, or from a folder holding
    model.safetensors (preferred) or pytorch_model.bin. Warns if a tensor holds NaN or inf."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: found neither model.safetensors nor pytorch_model.bin "
                                    "in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)[0]
    elif path.suffix in (".bin", ".pt", ".pth"):
        state = _torch_load_state_dict(path)
    else:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r} (use .safetensors, .bin or .pt)")
    warn_if_not_finite(state, str(path))
    return state


def torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> object:
    """torch.load what torch.save wrote, refusing what could run code or inflate without bound;
    ValueError names the file."""
    # torch.save stores zip entries uncompressed; torch.load would inflate a compressed one
    # (a zip bomb: 2 MB on disk, gigabytes in memory) before any other check could run.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
                    raise ValueError(f"{path}: zip entry {entry.filename!r} is compressed, which torch.save never "
                                     "does; refused (it could inflate to any size)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)  # no pickled code runs
    except pickle.UnpicklingError as err:  # torch's message is a page; keep the line that says why
        why = next((line for line in str(err).splitlines() if "unsupported" in line.lower()),
                   "not a pickle torch reads")
        raise ValueError(f"{path}: holds something other than tensors, refused by torch.load("
                         f"weights_only=True): {why.strip()}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: {str(err).splitlines()[0]}") from None


def _torch_load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch_load a file that must hold a flat dict name -> tensor."""
    state = torch_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor; "
                             "expected a state dict of tensors (name -> tensor)")
    return state


def warn_if_not_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Warn, naming the first such tensor, if any tensor holds NaN or inf: every output would too."""
    # A sum is NaN or inf when any element is (one fast pass); only then look element by element,
    # as a float32 sum of finite values can overflow too.
    bad = [name for name, t in tensors.items() if t.is_floating_point() and t.numel()
           and not torch.isfinite(t.sum(dtype=torch.float32)) and not torch.isfinite(t).all()]
    if bad:
        warnings.warn(f"{source}: {len(bad)} tensor(s) hold NaN or inf values, first {bad[0]!r}; "
                      "a model using them computes NaN", stacklevel=3)


HUB_FILES = ("config.json", "model.safetensors")  # what resolve_checkpoint fetches for a GPT-2 name


def hub_cache_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where GPT-2 `name`'s files are kept: <cache_dir, else $LORA_MIN_CACHE, else ~/.cache/lora_min>/<name>."""
    return Path(cache_dir or os.environ.get("LORA_MIN_CACHE") or "~/.cache/lora_min").expanduser() / name


def files_to_download(name: str) -> str:
    """A sentence naming GPT-2 `name`'s files that are not in the cache yet, and where they come from
    ("" if all are there, or if `name` is no GPT-2 name): so that an offline user learns it all at once."""
    folder = hub_cache_folder(name) if name in HUB_NAMES else None
    missing = [filename for filename in HUB_FILES if folder and not (folder / filename).is_file()]
    return (f"Still to download for {name}: {' and '.join(missing)} from {HUB_URL}/{HUB_NAMES[name]}/resolve/main/ "
            f"into {folder}/." if missing else "")


def resolve_checkpoint(name_or_path: str, cache_dir: str | Path | None = None) -> Path:
    """Turn a path or a GPT-2 name into a local checkpoint path, downloading if needed.

    An existing file or folder is returned as-is. A name in HUB_NAMES fetches
    model.safetensors and config.json from the Hugging Face hub into
    `<cache>/<name>/` (cache: `cache_dir`, else $LORA_MIN_CACHE, else ~/.cache/lora_min)
    unless already there, and returns the path of model.safetensors.
    """
    if Path(name_or_path).expanduser().exists():
        return Path(name_or_path).expanduser()
    if name_or_path not in HUB_NAMES:
        raise ValueError(f"{name_or_path!r} is not an existing file or folder, nor one of the GPT-2 "
                         f"names {', '.join(HUB_NAMES)}")
    folder = hub_cache_folder(name_or_path, cache_dir)
    hub_folder = f"{HUB_URL}/{HUB_NAMES[name_or_path]}/resolve/main"
    hint = (f"Offline? Download {hub_folder}/config.json and {hub_folder}/model.safetensors by hand (browser, "
            f"curl) into {folder}/ (the cache folder: $LORA_MIN_CACHE, else ~/.cache/lora_min), or into any "
            "folder and give that folder instead of the name (train.py --model PATH, GPT.from_pretrained(PATH)).")
    for filename in HUB_FILES:
        if not (folder / filename).is_file():
            download_file(f"{hub_folder}/{filename}", folder / filename, desc=f"{name_or_path} {filename}", hint=hint)
    return folder / "model.safetensors"


# -----------------------------------------------------------------------------
# An official GPT-2 checkpoint, checked against our model (GPT.from_pretrained, load_base_weights)


def is_ignored_key(key: str) -> bool:
    """Keys of official checkpoints that hold no weights of ours: the tied LM head and the
    causal-mask buffers that older transformers versions saved."""
    return key.endswith(("lm_head.weight", ".attn.bias", ".attn.masked_bias"))


def config_for_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> GPTConfig:
    """The configuration from a config.json beside the weights, else from the tensor shapes."""
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if config_file.is_file():
        try:
            hf = json.loads(config_file.read_text())
            return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                             vocab_size=hf["vocab_size"], block_size=hf["n_positions"])
        except KeyError as err:
            raise KeyError(f"{config_file}: missing key {err} of a GPT-2 config") from None
        except (ValueError, TypeError) as err:  # not JSON (or not an object), or a bad value
            raise ValueError(f"{config_file}: not a valid GPT-2 config: {err}") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    for key in ("wte.weight", "wpe.weight"):
        if key not in state:
            raise KeyError(f"{path}: no {key!r}; is this a GPT-2 checkpoint?")
    vocab_size, n_embd = state["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in state if k.startswith("h.")})
    # The shapes do not tell the number of heads; every official size uses 64-dimensional heads.
    how = f"put the model's config.json (with n_head) beside it, at {config_file}"
    if n_embd % 64:
        raise ValueError(f"{path}: no config.json, and n_embd={n_embd} is not a multiple of the usual "
                         f"head size 64, so the number of heads is unknown; {how}")
    if n_embd not in {size["n_embd"] for size in GPT2_SIZES.values()}:
        warnings.warn(f"{path}: no config.json; assuming 64-dimensional heads, so n_head = {n_embd // 64} "
                      f"for n_embd={n_embd}. If that is wrong, {how}", stacklevel=3)
    return GPTConfig(n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd,
                     vocab_size=vocab_size, block_size=state["wpe.weight"].shape[0])


def checked_base_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str,
                       config: GPTConfig) -> dict[str, torch.Tensor]:
    """An official GPT-2 state dict under our key names ('transformer.' dropped, the tied LM head
    and old mask buffers left out), once its keys are exactly those of `own` (the model's base
    weights) and every shape fits, Conv1D weights (stored (in, out)) transposed.
    Raises KeyError or ValueError naming `source`."""
    state = {k.removeprefix("transformer."): v for k, v in state.items() if not is_ignored_key(k)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(
            f"{source}: does not match GPT-2 {config}: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        shape = value.shape[::-1] if key.endswith(CONV1D_WEIGHTS) else value.shape
        if shape != own[key].shape:
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(shape)} (after transposing "
                f"Conv1D weights), the model expects {tuple(own[key].shape)}"
            )
    return state
