"""Writing files atomically: readers (and a run resumed after a kill) never see half a file.

The bytes go to a temporary file in the same folder, which is then renamed over the target
(`os.replace` is atomic within one file system). If writing fails, the temporary file is removed
and the target is left as it was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> Path:
    """Call write(file) on a temporary binary file beside `path`, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # no-op after a successful os.replace
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8 (newlines as given, on every platform), atomically."""
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
