"""Write lora_min/gpt2.tiktoken, GPT-2's BPE ranks, from OpenAI's two original files.

Run: python data/make_gpt2_tiktoken.py [FOLDER] [--out PATH]

GPT-2's tokenizer was released as `encoder.json` (token -> id) and `vocab.bpe` (the
merges in priority order). tiktoken turns them into one table of byte-level tokens
and their ranks; this script writes that table in tiktoken's own `.tiktoken` format
(one `base64(token) rank` line per token, as `tiktoken.load.dump_tiktoken_bpe` writes
it), which lora_min/tokenizer.py loads without any network access.

FOLDER holds the two files, named `encoder.json` and `vocab.bpe` or under the names
tiktoken gives its cache entries (the sha1 of their download URL). Without FOLDER the
script reads TIKTOKEN_CACHE_DIR, and failing that downloads the files from
openaipublic. Their sha256 must match the ones tiktoken pins, and the output must match
GPT2_TIKTOKEN_SHA256 in lora_min/tokenizer.py, so re-running this reproduces the
committed file byte for byte.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from tiktoken.load import data_gym_to_mergeable_bpe_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_min.download import download_file  # noqa: E402
from lora_min.fileio import atomic_write_bytes  # noqa: E402
from lora_min.tokenizer import GPT2_TIKTOKEN, GPT2_TIKTOKEN_SHA256  # noqa: E402

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
SOURCE_SHA256 = {  # as pinned in tiktoken_ext/openai_public.py
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def find_source(folder: Path, name: str) -> Path:
    """`folder/name`, or the file tiktoken cached the download of `name` as."""
    for candidate in (folder / name, folder / hashlib.sha1((BASE_URL + name).encode()).hexdigest()):
        if candidate.is_file():
            return candidate
    sys.exit(f"make_gpt2_tiktoken: no {name} in {folder} (neither as {name} nor as tiktoken's cache entry)")


def tiktoken_lines(vocab_bpe: Path, encoder_json: Path) -> bytes:
    """The .tiktoken text: tiktoken's own conversion (it checks the two files agree), sorted by rank."""
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local paths as they are, cache nothing
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                            SOURCE_SHA256["vocab.bpe"], SOURCE_SHA256["encoder.json"])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank
                    for token, rank in sorted(ranks.items(), key=lambda item: item[1]))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Write GPT-2's BPE ranks as a .tiktoken file.")
    parser.add_argument("folder", nargs="?", default=os.environ.get("TIKTOKEN_CACHE_DIR"),
                        help="folder with encoder.json and vocab.bpe (default: $TIKTOKEN_CACHE_DIR, "
                             "else download them from openaipublic)")
    parser.add_argument("--out", type=Path, default=GPT2_TIKTOKEN, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as download_dir:
        folder = Path(args.folder or download_dir)
        if args.folder is None:
            for name, sha256 in SOURCE_SHA256.items():
                download_file(BASE_URL + name, folder / name, sha256=sha256)
        text = tiktoken_lines(find_source(folder, "vocab.bpe"), find_source(folder, "encoder.json"))
    atomic_write_bytes(args.out, lambda f: f.write(text))  # a reader never sees half a file
    sha256 = hashlib.sha256(text).hexdigest()
    print(f"wrote {args.out} ({len(text):,} bytes, sha256 {sha256})")
    if sha256 != GPT2_TIKTOKEN_SHA256:
        sys.exit(f"make_gpt2_tiktoken: sha256 differs from GPT2_TIKTOKEN_SHA256 in lora_min/tokenizer.py "
                 f"({GPT2_TIKTOKEN_SHA256}); update it only if the source files changed on purpose")


if __name__ == "__main__":
    main(sys.argv[1:])
