"""Files that are either whole or absent: every report, export and checkpoint file goes through here.

The content is written to a temporary file in the destination's folder (same filesystem, so the
rename cannot copy), flushed and fsynced, then renamed onto its name with ``os.replace`` (atomic on
POSIX), and the folder is fsynced so the rename survives a power loss. A run interrupted at any
instant leaves the previous file, or none, under the final name; never a half-written one.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a report or export gets the usual mode.
_FILE_MODE = 0o666 & ~_read_umask()


def fsync_dir(folder: PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Create or replace ``path`` with what ``write(temporary_path)`` writes, atomically and durably."""
    path = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        with open(tmp, "rb") as f:  # fsync acts on the file, whichever descriptor asks
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))
