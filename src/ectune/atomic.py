"""Files that appear whole or not at all: write a temporary beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    if os.name == "nt" and Path(path).is_dir():    # Windows cannot open a folder; its renames are durable anyway
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write, kept as `.NAME.PID.tmp` beside `path` and renamed to `path` (after
    fsync of the file and then of its folder) when the block ends without error; removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0o666 less the process umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)                  # no /proc: read the umask by setting it (and put it back)
    os.umask(mask)
    return 0o666 & ~mask


def make_readable(path: str | Path) -> None:
    """Give a file written through a private temporary (mode 0600) the usual mode of new files."""
    os.chmod(path, file_mode())
