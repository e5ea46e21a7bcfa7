"""File helpers shared by every layer that writes: SHA-256 of a file, atomic writes of files and folders, and the
permissions of what the package writes (readable by all, like any other file the user creates: safetensors and
accelerate write their weight files with mode 0600)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoint manifests, the trajectory bank)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path to write ``path`` through (with any writer: ``open``, safetensors'
    ``save_file``); when the block ends without an error the file is fsync'ed and renamed over ``path``, so a reader
    (or a kill) sees either the old file or the complete new one. On an error the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(root: str | os.PathLike) -> None:
    """Give every file under ``root`` (or ``root`` itself) mode ``0666 & ~umask`` (0644 with the usual umask)."""
    mode = 0o666 & ~_umask()
    root = Path(root)
    for f in [root] if root.is_file() else root.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (the previous one, if any, is removed only afterwards)."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
