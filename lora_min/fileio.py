"""Writing files atomically: readers (and a run resumed after a kill) never see half a file.

The bytes go to a temporary file in the same folder, which is then renamed over the target
(`os.replace` is atomic within one file system). If writing fails, the temporary file is removed
and the target is left as it was. The file gets the mode open() would give it (0o666 less the
umask), not mkstemp's private 0o600, and an error while writing names the target.
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
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:  # e.g. ENOSPC: say which file could not be written
        if err.filename is None:
            err.filename = str(path)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)  # no-op after a successful os.replace
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8 (newlines as given, on every platform), atomically."""
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask (read by setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
