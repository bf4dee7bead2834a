"""Fetch one file from a URL (https://, http:// or file://) onto disk, safely.

Used for the GPT-2 weights (Hugging Face hub) and the E2E NLG dataset zip. Only the
standard library is needed: `urllib` streams the body in chunks, a one-line progress
display goes to stderr, and the bytes land in a temporary file beside `dest` that is
renamed into place (`os.replace`, atomic) only once it is complete and, when a
sha256 is given, verified. A failed or interrupted download leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from lora_min.fileio import atomic_write_bytes, folder_for
from lora_min.runlog import format_bytes, show_progress

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: small enough for a lively progress line


class DownloadError(OSError):
    """A file could not be fetched, arrived incomplete, or failed its sha256 check."""


def _progress_line(desc: str, done: int, total: int | None, started: float) -> str:
    """`desc: 45% 246.6 MB / 548.1 MB  31.2 MB/s`"""
    rate = done / max(time.monotonic() - started, 1e-6)
    amount = f"{done / total:4.0%} {format_bytes(done)} / {format_bytes(total)}" if total else format_bytes(done)
    return f"{desc}: {amount}  {format_bytes(rate)}/s"


def download_file(url: str, dest: str | Path, *, sha256: str | None = None, timeout: float = 10.0,
                  desc: str | None = None, hint: str = "") -> Path:
    """Download `url` to `dest` (always, even if `dest` exists) and return `dest` as a Path.

    `timeout` (seconds) bounds the connection and every single read, so an offline
    machine or a stalled server fails within seconds rather than hanging. `hint` is
    appended to every error message; callers use it to say how to get the file by hand.
    Raises DownloadError on any network failure, a truncated body or a sha256 mismatch.
    """
    dest = Path(dest)
    desc = desc or dest.name
    suffix = f" {hint}" if hint else ""

    def fetch(out: BinaryIO) -> None:
        digest, done, shown, started = hashlib.sha256(), 0, 0, time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                last_shown = 0.0
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if done != total and time.monotonic() - last_shown > 0.2:  # at most 5 redraws a second
                        show_progress(sys.stderr, _progress_line(desc, done, total, started), done, total, shown)
                        shown, last_shown = done, time.monotonic()
        # URLError (DNS, refused, HTTP 404...) and socket timeouts are OSErrors;
        # http.client raises HTTPException subclasses for broken responses.
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(f"could not download {url} to {dest}: {err}.{suffix}") from err
        show_progress(sys.stderr, _progress_line(desc, done, total, started), done, done, shown)  # the last line
        if total is not None and done != total:
            raise DownloadError(f"download of {url} to {dest} is truncated: got {done} of "
                                f"{total} bytes (connection closed early).{suffix}")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise DownloadError(f"sha256 mismatch for {dest} (from {url}): expected {sha256.lower()}, "
                                f"got {digest.hexdigest()}.{suffix}")

    # A failed or interrupted download leaves nothing behind: no temporary file, no new empty folders.
    with folder_for(dest.parent):
        atomic_write_bytes(dest, fetch, suffix=".part")
    return dest
