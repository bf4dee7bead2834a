"""The safetensors reader/writer against the official library, malformed files, checkpoints
and the GPT-2 hub download (served from 127.0.0.1)."""
import http.server
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_min import weights
from lora_min.download import DownloadError
from lora_min.weights import (DTYPES, load_checkpoint, read_safetensors, resolve_checkpoint,
                              write_safetensors)


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    """A tensor of `dtype` with varied values (negative, fractional, extreme where possible)."""
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


ALL = {f"t_{name}": sample(dtype) for name, dtype in DTYPES.items()}
ALL |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "odd_i8": torch.arange(7, dtype=torch.int8)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------- round trips

def test_own_writer_official_reader(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", ALL)
    assert_same(load_file(tmp_path / "a.safetensors"), ALL)


def test_official_writer_own_reader(tmp_path):
    save_file(ALL, tmp_path / "b.safetensors", metadata={"format": "pt"})
    tensors, metadata = read_safetensors(tmp_path / "b.safetensors")
    assert_same(tensors, ALL)
    assert metadata == {"format": "pt"}


def test_metadata_round_trip_both_ways(tmp_path):
    meta = {"format": "pt", "lora_r": "4", "note": "ünïcode \"quoted\""}
    write_safetensors(tmp_path / "m.safetensors", {"x": torch.ones(2)}, meta)
    assert read_safetensors(tmp_path / "m.safetensors")[1] == meta
    from safetensors import safe_open
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == meta


def test_writer_handles_views_grad_and_layout(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"transposed": base.t(), "strided": base[:, ::2], "param": torch.nn.Parameter(base.clone())}
    write_safetensors(tmp_path / "v.safetensors", tensors)
    loaded, metadata = read_safetensors(tmp_path / "v.safetensors")
    assert_same(loaded, {k: v.detach().contiguous() for k, v in tensors.items()}) and metadata == {}
    raw = (tmp_path / "v.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert header_len % 8 == 0 and raw[8:9] == b"{"  # data starts 8-byte aligned


def test_loaded_tensors_are_writable_without_touching_file(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.zeros(4)})
    before = path.read_bytes()
    tensor = read_safetensors(path)[0]["w"]
    tensor += 1
    assert path.read_bytes() == before and torch.equal(tensor, torch.ones(4))


def test_writer_is_atomic_and_rejects_bad_input(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="unsupported dtype"):
        write_safetensors(path, {"c": torch.ones(1, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="metadata"):
        write_safetensors(path, {"a": torch.ones(1)}, {"n": 4})
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(path, {"__metadata__": torch.ones(1)})
    assert torch.equal(read_safetensors(path)[0]["a"], torch.ones(1))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp files


def test_tensors_survive_the_file_being_rewritten_in_place(tmp_path):
    """Tensors must not be views of a memory map: truncating a mapped file kills the process
    with SIGBUS on the next read of a page. Run in a child so that death fails the test."""
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.arange(100_000, dtype=torch.float64)})
    script = ("import sys, torch; from lora_min.weights import read_safetensors\n"
              "w = read_safetensors(sys.argv[1])[0]['w']\n"
              "open(sys.argv[1], 'wb').close()  # rewritten in place: truncated to 0 bytes\n"
              "print(w.sum().item())")
    child = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert float(child.stdout) == sum(range(100_000))


def test_unaligned_file_from_another_writer(tmp_path):
    """A valid file whose F32 tensor starts at an odd address is read (and copied) correctly."""
    header = json.dumps({"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}).encode()
    path = tmp_path / "u.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + struct.pack("<2f", 1.5, -2.0))
    tensors, _ = read_safetensors(path)
    assert tensors["b"].tolist() == [7] and tensors["f"].tolist() == [1.5, -2.0]


# ----------------------------------------------------------------------------- malformed files

def raw_file(header: object, data: bytes = b"", header_len: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if header_len is None else header_len) + body + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "short": (b"\x01\x02\x03", "shorter than the 8-byte"),
    "huge_header_len": (raw_file({}, header_len=2**60), "header length 1152921504606846976 is larger"),
    "max_header_len": (raw_file({}, header_len=2**64 - 1), "is larger"),
    "not_json": (raw_file(b"{not json}"), "not valid UTF-8 JSON"),
    "not_utf8": (raw_file(b'{"\xff": 1}'), "not valid UTF-8 JSON"),
    "not_object": (raw_file(b"[1, 2]"), "must start with '{'"),
    "entry_not_object": (raw_file({"a": 3}), "entry is not a JSON object"),
    "unknown_dtype": (raw_file({"a": entry(dtype="F13")}, bytes(8)), "unknown dtype 'F13'"),
    "bad_shape": (raw_file({"a": entry(shape=(-2,))}, bytes(8)), "shape \\[-2\\] is not a list"),
    "bad_offsets": (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8)),
                    "not a pair"),
    "size_mismatch": (raw_file({"a": entry(shape=(3,))}, bytes(8)), "needs 12 bytes but data_offsets"),
    "outside_data": (raw_file({"a": entry(offsets=(4, 12))}, bytes(8)), "outside the 8-byte data buffer"),
    "overlap": (raw_file({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12)), "overlaps tensor 'a'"),
    "gap": (raw_file({"a": entry(), "b": entry(offsets=(12, 20))}, bytes(20)), "4-byte gap after tensor 'a'"),
    "gap_at_start": (raw_file({"a": entry(offsets=(4, 12))}, bytes(12)), "gap after the start"),
    "trailing_bytes": (raw_file({"a": entry()}, bytes(10)), "2 unused bytes after the last tensor"),
    "bad_metadata": (raw_file({"__metadata__": {"n": 1}}), "__metadata__ must be"),
    "empty_too_large": (raw_file({"a": entry(shape=(0, 2**70), offsets=(0, 0))}), "too large"),
    # Python's json refuses integers over 4,300 digits with a plain ValueError, not a JSONDecodeError.
    "huge_integer": (raw_file(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], "data_offsets": [0, 8]}}',
                              bytes(8)), "not valid UTF-8 JSON"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file_raises_value_error(tmp_path, case):
    content, problem = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_huge_header_length_fails_fast_without_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw_file({"a": entry()}, bytes(8), header_len=2**60))
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(ValueError, match="header length"):
        read_safetensors(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.monotonic() - started < 1 and peak < 1_000_000


VALID = raw_file({"__metadata__": {"k": "v"}, "a": entry("F32", (2, 2), (0, 16)),
                  "b": entry("BF16", (3,), (16, 22)), "c": entry("BOOL", (2,), (22, 24))},
                 bytes(range(24)))


@given(mutations=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(VALID))),
       header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_corruption_returns_or_raises_value_error(tmp_path, mutations, cut, header_len):
    content = bytearray(VALID)
    for position, value in mutations:
        content[position] = value
    if header_len is not None:
        content[:8] = struct.pack("<Q", header_len)
    content = bytes(content[:cut])
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"  # fresh file: never truncate a mapped one
    path.write_bytes(content)
    tracemalloc.start()
    try:
        tensors, metadata = read_safetensors(path)
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    except ValueError as err:
        assert str(path) in str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1_000_000


# ----------------------------------------------------------------------------- load_checkpoint

STATE = {"wte.weight": torch.randn(5, 3), "h.0.ln_1.bias": torch.randn(3)}


def test_load_checkpoint_safetensors_bin_and_folders(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", STATE)
    torch.save({k: v + 1 for k, v in STATE.items()}, tmp_path / "pytorch_model.bin")
    torch.save(STATE, tmp_path / "ckpt.pt")
    assert_same(load_checkpoint(tmp_path / "model.safetensors"), STATE)
    assert_same(load_checkpoint(tmp_path / "ckpt.pt"), STATE)
    assert_same(load_checkpoint(str(tmp_path)), STATE)  # folder: model.safetensors preferred
    (tmp_path / "model.safetensors").unlink()
    assert_same(load_checkpoint(tmp_path), {k: v + 1 for k, v in STATE.items()})  # then the .bin


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors nor pytorch_model.bin"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type '.npz'"):
        load_checkpoint(tmp_path / "w.npz")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_checkpoint(tmp_path / "list.pt")


@pytest.mark.parametrize("content, problem", [
    ({"w": torch.ones(2), "step": 3}, "'step' holds a int, not a tensor"),
    ({"model": {"w": torch.ones(2)}}, "'model' holds a dict, not a tensor"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("garbage", "holds something other than tensors"),
])
def test_load_checkpoint_names_the_file_of_a_bad_bin(tmp_path, content, problem):
    path = tmp_path / "pytorch_model.bin"
    if content == "truncated":
        torch.save(STATE, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=problem) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_checkpoint_refuses_compressed_zip_entries(tmp_path):
    """A zip bomb: a small DEFLATE-compressed .bin that torch.load would inflate in memory.
    torch.save never compresses, so a compressed entry is refused before torch.load runs."""
    plain, bomb = tmp_path / "plain.bin", tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1_000_000)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    assert bomb.stat().st_size < 100_000  # 4 MB of zeros in a few kB
    with pytest.raises(ValueError, match="zip entry '[^']*' is compressed") as info:
        load_checkpoint(bomb)
    assert str(bomb) in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_load_checkpoint_warns_about_nan_weights(tmp_path, suffix):
    state = {"wte.weight": torch.ones(3, 2), "h.0.ln_1.bias": torch.tensor([0.0, float("nan")])}
    path = tmp_path / f"model{suffix}"
    write_safetensors(path, state) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.warns(UserWarning, match=r"model\S*: 1 tensor\(s\) hold NaN or inf values, first 'h.0.ln_1.bias'"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- resolve_checkpoint

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local hub on 127.0.0.1 laid out like huggingface.co/<repo>/resolve/main/<file>."""
    root = tmp_path / "hub"
    repo = root / "openai-community" / "gpt2" / "resolve" / "main"
    repo.mkdir(parents=True)
    write_safetensors(repo / "model.safetensors", STATE)
    (repo / "config.json").write_text('{"n_layer": 12}')
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(weights, "HUB_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.delenv("LORA_MIN_CACHE", raising=False)
    yield root
    httpd.shutdown()
    httpd.server_close()


def test_resolve_existing_path_is_returned_as_is(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", STATE)
    assert resolve_checkpoint(str(tmp_path / "m.safetensors")) == tmp_path / "m.safetensors"
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_resolve_unknown_name(tmp_path):
    with pytest.raises(ValueError) as info:
        resolve_checkpoint("gpt3", cache_dir=tmp_path)
    message = str(info.value)
    assert "'gpt3' is not an existing file or folder" in message
    assert all(name in message for name in weights.HUB_NAMES)


def test_resolve_downloads_once_into_cache(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_MIN_CACHE", str(tmp_path / "env-cache"))
    path = resolve_checkpoint("gpt2")
    assert path == tmp_path / "env-cache" / "gpt2" / "model.safetensors"
    assert_same(load_checkpoint(path), STATE)
    assert (path.parent / "config.json").read_text() == '{"n_layer": 12}'
    assert "gpt2 model.safetensors: 100%" in capsys.readouterr().err
    # A second call finds both files and does not download (the hub is gone now).
    monkeypatch.setattr(weights, "HUB_URL", f"http://127.0.0.1:{closed_port()}")
    assert resolve_checkpoint("gpt2") == path
    # cache_dir beats the environment variable.
    with pytest.raises(DownloadError):
        resolve_checkpoint("gpt2", cache_dir=tmp_path / "arg-cache")


def test_resolve_default_cache_is_under_home(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = resolve_checkpoint("gpt2")
    assert path == tmp_path / "home" / ".cache" / "lora_min" / "gpt2" / "model.safetensors"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolve_offline_fails_fast_with_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "HUB_URL", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        resolve_checkpoint("gpt2-xl", cache_dir=tmp_path)
    assert time.monotonic() - started < 5
    message = str(info.value)
    hub = "openai-community/gpt2-xl/resolve/main/"
    assert f"{hub}config.json and " in message and f"{hub}model.safetensors" in message  # every file needed
    assert f"into {tmp_path / 'gpt2-xl'}/ (the cache folder: $LORA_MIN_CACHE, else ~/.cache/lora_min)" in message
    assert "train.py --model PATH" in message
    assert not (tmp_path / "gpt2-xl").exists()  # nothing half-written, not even an empty folder


def test_files_to_download_names_only_what_the_cache_lacks(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_MIN_CACHE", str(tmp_path))
    assert weights.files_to_download("gpt2-medium") == (
        "Still to download for gpt2-medium: config.json and model.safetensors from "
        f"https://huggingface.co/openai-community/gpt2-medium/resolve/main/ into {tmp_path / 'gpt2-medium'}/.")
    (tmp_path / "gpt2-medium").mkdir()
    (tmp_path / "gpt2-medium" / "config.json").write_text("{}")
    assert "for gpt2-medium: model.safetensors from" in weights.files_to_download("gpt2-medium")
    (tmp_path / "gpt2-medium" / "model.safetensors").write_bytes(b"")
    assert weights.files_to_download("gpt2-medium") == ""
    assert weights.files_to_download(str(tmp_path)) == weights.files_to_download("demo") == ""  # not hub names
