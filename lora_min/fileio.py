"""Writing files atomically: readers (and a run resumed after a kill) never see half a file.

The bytes go to a temporary file in the same folder, which is then renamed over the target
(`os.replace` is atomic within one file system). If writing fails, the temporary file is removed
and the target is left as it was. The file gets the mode open() would give it (0o666 less the
umask), not mkstemp's private 0o600, and an error while writing names the target.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> Path:
    """Call write(file) on a new binary file beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
    # O_EXCL: a name no one else holds. Mode 0o666 less the umask, like any new file (mkstemp's
    # files are private to their owner, which an adapter meant for sharing should not be).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:  # e.g. ENOSPC: say which file could not be written
        if err.errno is not None and err.filename is None:  # an OS error, not one of ours with its own message
            err.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful os.replace
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8 (newlines as given, on every platform), atomically."""
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask (read by setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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
