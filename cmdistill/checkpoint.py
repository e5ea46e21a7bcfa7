"""Atomic checkpoints through accelerate's ``save_state``: written to a temporary folder, flushed, then
renamed; the last ``keep`` are kept; the resolved recipe is stored inside each one."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

CKPT_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read."""


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(arg: str, output_dir: Path) -> Path:
    """``latest`` -> the newest complete checkpoint of ``output_dir``; otherwise a checkpoint folder."""
    if arg == "latest":
        ckpts = list_checkpoints(output_dir / "checkpoints")
        if not ckpts:
            raise CheckpointError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}")
        return ckpts[-1]
    p = Path(arg)
    if not p.is_dir():
        raise CheckpointError(f"--resume: checkpoint folder {arg!r} does not exist")
    return p


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, recipe_yaml: str, keep: int) -> Path | None:
    """``accelerator.save_state`` into ``ckpt_dir/.tmp-step_N``, fsync, rename to ``step_N``; prune old ones."""
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
