"""GPT-2's tokenizer, built from a file shipped with this package: no network, ever.

GPT-2 (Radford et al., 2019, Section 2.2) reads byte-level BPE: 50,000 merges over the
256 byte values, plus <|endoftext|>, 50,257 tokens in all. tiktoken implements it; its
`get_encoding("gpt2")` downloads OpenAI's two original files on first use. We ship the
same ranks instead, in tiktoken's `.tiktoken` format (`gpt2.tiktoken`, made from those
files by data/make_gpt2_tiktoken.py; license in gpt2.tiktoken.LICENSE), and build the
tiktoken Encoding from it, so a fresh machine without internet access tokenizes too.
"""
from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

GPT2_TIKTOKEN = Path(__file__).with_name("gpt2.tiktoken")
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>, the one special token
# What padded positions hold, in training batches and in decoding's left-padded prompts: never
# attended to and never a target, so any id would do; 0 is in every vocabulary, a toy model's too.
PAD_ID = 0
# How GPT-2 splits text into pieces before BPE: the pattern of GPT-2's encoder.py (tiktoken
# 0.14 writes the same split with possessive quantifiers, a speed-up).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path: Path = GPT2_TIKTOKEN, sha256: str = GPT2_TIKTOKEN_SHA256) -> dict[bytes, int]:
    """The BPE ranks (token bytes -> id) from a `.tiktoken` file, after checking its sha256."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 is {hashlib.sha256(data).hexdigest()}, expected {sha256}; "
                         "the file is damaged, reinstall lora-min or run data/make_gpt2_tiktoken.py")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE as a tiktoken Encoding, identical to tiktoken.get_encoding("gpt2")."""
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)
