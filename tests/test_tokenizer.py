"""Tests for lora_min/tokenizer.py: the shipped GPT-2 BPE is tiktoken's gpt2, and needs no network."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from lora_min.data import DEMO_DIR
from lora_min.tokenizer import EOT, GPT2_TIKTOKEN, get_tokenizer, load_ranks

REPO = Path(__file__).resolve().parents[1]

# Contractions, digits, punctuation runs, every kind of whitespace run, non-Latin scripts,
# emoji (multi-byte, split across tokens), and the special token's text.
VARIED_TEXT = [
    "", " ", "  ", "\n", "\n\n\n", "\t x", "a  b   c    d", "trailing   ", "   leading",
    "I'm sure they'll say it's the café's 3rd 'best' — we've 1,234.56 reasons.",
    "don't DON'T Don'T 's 'S 'll 'LL", "x=1;y+=2**3//4 # comment\r\n\tindent",
    "£30 £ 30 20-25 5 out of 5 1/5", "naïve façade Ærø smörgåsbord",
    "Ελληνικά русский 中文 日本語 한국어 العربية", "🍕🍕 👩‍👩‍👧 ✓ \u200b zero\u200bwidth",
    "<|endoftext|>", "a<|endoftext|>b", "\u00a0nbsp\u2003em space",
]


def e2e_sentences(csv_file: Path) -> list[str]:
    """Every MR and reference of an E2E CSV file."""
    with open(csv_file, newline="", encoding="utf-8") as f:
        return [text for row in csv.DictReader(f) for text in (row["mr"], row["ref"])]


@pytest.fixture(scope="module")
def tiktoken_gpt2(shared_dir: Path) -> tiktoken.Encoding:
    """tiktoken's own gpt2 Encoding, built from OpenAI's two files in ../shared/tiktoken-cache."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(shared_dir / "tiktoken-cache")
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def shared_dir() -> Path:  # module-scoped twin of conftest's fixture, for the module-scoped one above
    shared = REPO.parent / "shared"
    if not (shared / "tiktoken-cache").is_dir():
        pytest.skip("../shared/tiktoken-cache is not beside the checkout")
    return shared


def test_same_vocabulary_as_tiktoken_gpt2(tiktoken_gpt2):
    ours = get_tokenizer()
    assert ours is get_tokenizer()
    assert (ours.name, ours.n_vocab, ours.eot_token, ours.special_tokens_set) == \
        ("gpt2", 50257, EOT, {"<|endoftext|>"}) == \
        (tiktoken_gpt2.name, tiktoken_gpt2.n_vocab, tiktoken_gpt2.eot_token, tiktoken_gpt2.special_tokens_set)
    assert all(ours.decode_single_token_bytes(i) == tiktoken_gpt2.decode_single_token_bytes(i)
               for i in range(ours.n_vocab))


@pytest.mark.parametrize("source", ["varied", "e2e"])
def test_encodes_and_decodes_as_tiktoken_gpt2(tiktoken_gpt2, e2e_dir, source):
    ours = get_tokenizer()
    texts = VARIED_TEXT if source == "varied" else (e2e_sentences(DEMO_DIR / "devset.csv")
                                                    + e2e_sentences(e2e_dir / "devset.csv"))
    for text in texts:
        ids = ours.encode_ordinary(text)
        assert ids == tiktoken_gpt2.encode_ordinary(text), text
        assert ours.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all"), text
        assert ours.decode(ids) == tiktoken_gpt2.decode(ids) == text


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_any_text_encodes_as_tiktoken_gpt2(tiktoken_gpt2, text):
    ids = get_tokenizer().encode_ordinary(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert get_tokenizer().decode(ids) == text


# What a machine without internet access does: every socket call raises, and no tiktoken
# cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, or the default one in the temp folder) exists.
OFFLINE_PRELUDE = """
import socket
def no_network(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = no_network
socket.create_connection = socket.getaddrinfo = no_network
"""


def run_offline(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))  # tiktoken's default cache lives in TMPDIR
    return subprocess.run([sys.executable, "-c", OFFLINE_PRELUDE + code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_tokenizer_works_with_the_network_blocked(tmp_path):
    text = "name : Blue Heron | Type : pub<|endoftext|> Hi."
    done = run_offline("from lora_min.data import get_tokenizer\n"
                       f"ids = get_tokenizer().encode({text!r}, allowed_special='all')\n"
                       "print(ids, get_tokenizer().decode(ids))", tmp_path)
    assert done.returncode == 0, done.stderr
    ids = get_tokenizer().encode(text, allowed_special="all")
    assert EOT in ids and done.stdout == f"{ids} {text}\n"
    # The block is real: tiktoken's own gpt2, which downloads its files, fails under it.
    blocked = run_offline("import tiktoken; tiktoken.get_encoding('gpt2')", tmp_path)
    assert blocked.returncode != 0 and "network blocked by the test" in blocked.stderr


def test_damaged_file_is_refused(tmp_path):
    damaged = tmp_path / "gpt2.tiktoken"
    damaged.write_bytes(GPT2_TIKTOKEN.read_bytes().replace(b" 50255\n", b" 50254\n"))
    with pytest.raises(ValueError, match=f"{damaged}: sha256 is .*reinstall lora-min"):
        load_ranks(damaged)


def test_make_script_reproduces_the_shipped_file(shared_dir, tmp_path):
    out = tmp_path / "gpt2.tiktoken"
    done = subprocess.run([sys.executable, str(REPO / "data" / "make_gpt2_tiktoken.py"),
                           str(shared_dir / "tiktoken-cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == GPT2_TIKTOKEN.read_bytes()


def test_shipped_file_is_package_data():
    """pyproject.toml installs the ranks and their license with the package (checked as text: no
    TOML reader in Python 3.10's standard library)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?:^\[|\Z)", pyproject, re.M | re.S)
    assert section and re.search(r'^lora_min = \[.*"gpt2\.tiktoken", "gpt2\.tiktoken\.LICENSE"', section[1], re.M)
    assert (GPT2_TIKTOKEN.parent / "gpt2.tiktoken.LICENSE").is_file()
