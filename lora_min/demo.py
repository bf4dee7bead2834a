"""The demo's base model, by name: GPT-2's tokenizer, vocabulary and layout, 4 thin layers, random weights.

`python train.py --demo` fine-tunes LoRA on this base so that the whole pipeline runs on any CPU
(in about 40 s of CPU time) without downloading GPT-2. Its weights are a fixed function of DEMO_SEED, the same bits
on every CPU (tests/test_demo.py pins them), so an adapter trained on it names its base "demo" as
a real one names "gpt2", and every command that takes a base (python -m lora_min.evaluate,
python -m lora_min.adapters ...) rebuilds it from that name. `load_base` is where the name is understood.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from lora_min.model import GPT, GPTConfig, LoRAConfig, is_lora_param

DEMO = "demo"
DEMO_CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=128)
DEMO_SEED = 3  # any seed makes a valid demo; with this one its adapter decodes to words, not empty lines


def demo_model(lora: LoRAConfig | None = None) -> GPT:
    """The demo base (with untrained LoRA, if `lora` is given): not a language model, a pipeline check."""
    model = GPT(DEMO_CONFIG, lora)  # LayerNorms 1, biases 0; LoRA initialised from the global RNG
    generator = torch.Generator().manual_seed(DEMO_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a fixed order; the tied lm_head comes once, as wte
            if param.dim() == 2 and not is_lora_param(name):
                # Uniform with GPT-2's standard deviation, 0.02. torch.rand turns the generator's
                # integers into floats exactly, so every CPU gets the same bits; torch.randn's
                # log/sin/cos differ between vectorised (AVX2, ...) and plain kernels.
                bound = 0.02 * math.sqrt(3)
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
    return model


def load_base(name_or_path: str | Path, lora: LoRAConfig | None = None) -> GPT:
    """GPT.from_pretrained (a GPT-2 name or a checkpoint path), or the demo base for the name 'demo'."""
    if str(name_or_path) == DEMO:
        return demo_model(lora)
    return GPT.from_pretrained(name_or_path, lora=lora)
