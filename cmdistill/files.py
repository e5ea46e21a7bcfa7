"""File helpers shared by the layers that write: atomic text writes, atomic folder replacement, and the permissions
of what the package writes (readable by all, like any other file the user creates: safetensors and accelerate
write their weight files with mode 0600)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


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
