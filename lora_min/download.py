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
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lora_min.fileio import new_file_mode

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: small enough for a lively progress line


class DownloadError(OSError):
    """A file could not be fetched, arrived incomplete, or failed its sha256 check."""


def _human(n_bytes: float) -> str:
    """Bytes as a short human-readable string, e.g. 548.1 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def _show_progress(desc: str, done: int, total: int | None, started: float, end: str = "") -> None:
    """Rewrite one progress line on stderr: `desc: 45% 246.6 MB / 548.1 MB  31.2 MB/s`."""
    rate = done / max(time.monotonic() - started, 1e-6)
    amount = f"{done / total:4.0%} {_human(done)} / {_human(total)}" if total else _human(done)
    sys.stderr.write(f"\r{desc}: {amount}  {_human(rate)}/s" + end)
    sys.stderr.flush()


@contextmanager
def folder_for(folder: Path) -> Iterator[Path]:
    """Create `folder` (and missing parents) for what the block writes there; if the block fails,
    remove the folders it created again (those still empty), so a failed step leaves none behind."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty (something else wrote there meanwhile): keep it
                break
        raise


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
    with folder_for(dest.parent):  # a failed download leaves no new empty folders behind
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.fchmod(fd, new_file_mode())  # mkstemp's 0o600 would make the download private
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            done, started = 0, time.monotonic()
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        length = response.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                        last_shown = 0.0
                        while chunk := response.read(CHUNK_BYTES):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if time.monotonic() - last_shown > 0.2:  # redraw at most 5 times a second
                                _show_progress(desc, done, total, started)
                                last_shown = time.monotonic()
                # URLError (DNS, refused, HTTP 404...) and socket timeouts are OSErrors;
                # http.client raises HTTPException subclasses for broken responses.
                except (OSError, http.client.HTTPException) as err:
                    raise DownloadError(f"could not download {url} to {dest}: {err}.{suffix}") from err
            _show_progress(desc, done, total, started, end="\n")
            if total is not None and done != total:
                raise DownloadError(f"download of {url} to {dest} is truncated: got {done} of "
                                    f"{total} bytes (connection closed early).{suffix}")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise DownloadError(f"sha256 mismatch for {dest} (from {url}): expected {sha256.lower()}, "
                                    f"got {digest.hexdigest()}.{suffix}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)  # no-op after a successful os.replace
    return dest
