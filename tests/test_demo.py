"""lora_min/demo.py: the demo base is rebuilt from its name, bit for bit, by every adapter command."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_min.metrics
from lora_min import adapters, evaluate
from lora_min.adapters import model_from_adapter, read_adapter, save_adapter
from lora_min.demo import DEMO_CONFIG, demo_model, load_base
from lora_min.model import GPT, LoRAConfig, is_lora_param

# sha256 over the demo base's tensors (name, then bytes, in name order). Pinned so that a change
# of torch or of this code that alters the demo base, and so orphans every demo adapter, shows.
DEMO_BASE_SHA256 = "7b58b502e4303e74d7b7be9f00538d26a03b3015c8ebc24eba769aef329ffb67"
TOKENS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])


def base_fingerprint(model: GPT) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not is_lora_param(name):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_demo_base_is_the_same_bits_whatever_the_seed_and_lora():
    torch.manual_seed(0)
    plain = demo_model()
    torch.manual_seed(1)
    with_lora = demo_model(LoRAConfig(r=2, targets=("q", "k", "v", "o")))
    assert plain.config == with_lora.config == DEMO_CONFIG
    assert base_fingerprint(plain) == base_fingerprint(with_lora) == DEMO_BASE_SHA256
    assert base_fingerprint(load_base("demo")) == DEMO_BASE_SHA256
    assert plain.wte.weight.std().item() == pytest.approx(0.02, rel=0.01)  # GPT-2's initial scale


def test_demo_base_does_not_depend_on_the_cpus_vector_instructions():
    """ATEN_CPU_CAPABILITY=default runs torch's plain C++ kernels, as on a CPU without AVX2."""
    code = "from tests.test_demo import base_fingerprint; from lora_min.demo import demo_model; " \
           "print(base_fingerprint(demo_model()))"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == DEMO_BASE_SHA256


@pytest.fixture
def demo_adapter(tmp_path):
    """An adapter on the demo base, with a non-zero update, saved as train.py --demo saves it."""
    torch.manual_seed(0)
    model = demo_model(LoRAConfig(r=2, alpha=4, targets=("q", "v"))).eval()
    with torch.no_grad():
        for _, _, update in model.lora_updates():
            update.B.normal_()
    save_adapter(model, tmp_path / "adapter.safetensors", base_model="demo")
    return model, tmp_path / "adapter.safetensors"


def test_adapter_commands_rebuild_the_demo_base(demo_adapter, tmp_path, capsys, monkeypatch):
    model, path = demo_adapter
    with torch.no_grad():
        expected = model(TOKENS)
        assert torch.equal(model_from_adapter(path).eval()(TOKENS), expected)

        adapters.main(["export-merged", str(path), str(tmp_path / "merged")])
        assert torch.allclose(GPT.from_pretrained(tmp_path / "merged").eval()(TOKENS), expected, atol=1e-5)

    adapters.main(["export-peft", str(path), str(tmp_path / "peft")])
    adapters.main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back.safetensors")])
    back, metadata = read_adapter(tmp_path / "back.safetensors")
    assert metadata["base_model"] == "demo"
    assert all(torch.equal(back[k], v) for k, v in read_adapter(path)[0].items())

    monkeypatch.setattr(lora_min.metrics, "meteor", lambda hyps, refs: (None, "not run in this test"))
    capsys.readouterr()
    assert evaluate.main(["--adapter", str(path), "--data-dir", "demo", "--limit", "2", "--beam-size", "2",
                          "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "note: the model (demo: 4 layers, 128 wide) is not the paper's GPT-2 M" in printed
    assert (tmp_path / "eval" / "scores.json").is_file()
