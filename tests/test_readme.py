"""The README's Python snippet prints what the README says it prints."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from lora_min.model import GPT, GPTConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_snippet_prints_what_the_readme_shows(monkeypatch):
    text = README.read_text(encoding="utf-8")
    code, shown = re.search(r"```python\n((?:(?!```).)*?)```\n\nprints\n\n```text\n(.*?)```", text, re.S).groups()

    def offline_gpt2(name, lora=None):  # GPT-2's shape with random weights: what is printed does not depend on them
        return GPT(GPTConfig.from_name(name), lora)

    monkeypatch.setattr(GPT, "from_pretrained", staticmethod(offline_gpt2))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():
        exec(compile(code, str(README), "exec"), {})
    assert printed.getvalue() == shown
