"""Atomic, verifiable checkpoints through accelerate's ``save_state``.

A checkpoint is a folder ``checkpoints/step_N`` holding

* accelerate's own files: the student (``model.safetensors``; a LoRA student's adapters alone,
  :func:`save_trainable_only`), the optimiser (``optimizer.bin``) and the
  Python / NumPy / torch RNG states (``random_states_<rank>.pkl``); accelerate reads its ``.bin``/``.pkl``
  files with ``torch.load(weights_only=True)``;
* cmdistill's own files, never pickles: the other networks (target, evaluation EMA) as
  ``<name>.safetensors``, every generator state a run draws from as ``rng_state_<rank>.safetensors``, and
  the counters (step, LR schedule, ...) as ``train_state.json``;
* the run's resolved ``recipe.yaml`` and a ``manifest.json`` with the size and SHA-256 of every file.

It is written into ``checkpoints/.tmp-step_N``, every file and the folder are fsync'ed, then the folder is
renamed to ``step_N`` (atomic) and the parent folder fsync'ed: a kill at any moment leaves either the complete
new checkpoint or none, and the previous ones untouched. The last ``keep`` are kept. Before resuming, the
manifest is checked, so a truncated or corrupt checkpoint is refused with one line instead of being half-loaded.

Nothing here uses accelerate's ``register_for_checkpointing``: it reloads with ``weights_only=False``
(arbitrary pickles).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..files import fsync_dir, fsync_file, make_readable, sha256_file

CKPT_RE = re.compile(r"^step_(\d+)$")
FORMAT = 1
MANIFEST = "manifest.json"
STATE_FILE = "train_state.json"
# written by accelerate's save_state for a single-model, single-optimiser, non-sharded run
ACCELERATE_FILES = ("model.safetensors", "optimizer.bin")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read."""


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ``.tmp-*`` folders of interrupted saves are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(arg: str, output_dir: Path) -> Path:
    """``latest`` -> the newest checkpoint of ``output_dir``; a run folder -> its newest; else a checkpoint folder."""
    output_dir = Path(output_dir)
    if arg == "latest":
        ckpts = list_checkpoints(output_dir / "checkpoints")
        if not ckpts:
            raise CheckpointError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}")
        return ckpts[-1]
    p = Path(os.path.expanduser(arg))
    if not p.is_dir():
        raise CheckpointError(f"--resume: checkpoint folder {arg!r} does not exist")
    if not (p / MANIFEST).exists() and (p / "checkpoints").is_dir():
        ckpts = list_checkpoints(p / "checkpoints")
        if not ckpts:
            raise CheckpointError(f"--resume: no checkpoint in {p / 'checkpoints'}")
        return ckpts[-1]
    return p


# --------------------------------------------------------------------------- integrity


def _write_manifest(folder: Path, step: int) -> None:
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"format": FORMAT, "step": step, "files": files}
    with open(folder / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: Path, modules: tuple[str, ...] = (), num_processes: int = 1) -> dict:
    """Check that ``path`` is a complete cmdistill checkpoint whose files match its manifest; return the manifest.

    Raises :class:`CheckpointError` (one line) for a missing, truncated, corrupt or foreign checkpoint.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{where} is incomplete or not a cmdistill checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where} is corrupt: unreadable {MANIFEST} ({type(e).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {manifest.get('format')!r}; this cmdistill reads format {FORMAT}")
    required = list(ACCELERATE_FILES) + [STATE_FILE] + [f"{m}.safetensors" for m in modules]
    required += [f"rng_state_{r}.safetensors" for r in range(num_processes)]
    for name in required:
        if name not in files:
            raise CheckpointError(f"{where} lacks {name} (made by another program or for another setup?)")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{where} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{where} is corrupt or truncated: {name} has {size} bytes, expected {meta['bytes']}")
        if sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{where} is corrupt: {name} does not match its checksum")
    return manifest


# --------------------------------------------------------------------------- save / load


def _remove_tree(p: Path) -> None:
    """Rename out of the ``step_N`` namespace first, so a kill during removal never leaves a half checkpoint."""
    trash = p.with_name(f".del-{p.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(ckpt_dir: Path) -> None:
    """Remove leftovers (``.tmp-*``, ``.del-*``) of saves or prunes interrupted by a kill."""
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, recipe_yaml: str, keep: int,
                    modules: dict | None = None, counters: dict | None = None,
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the run at ``step`` into ``ckpt_dir/step_N`` atomically; prune to the last ``keep``.

    ``modules``: extra networks saved as ``<name>.safetensors`` (main process); ``counters``: JSON-able
    state (main process); ``rng``: this process's generator states (every process).
    """
    from safetensors.torch import save_file, save_model

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if rng is not None:
        save_file({k: v.contiguous() for k, v in rng.items()},
                  str(tmp / f"rng_state_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in (modules or {}).items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, "step": step, **(counters or {})}, indent=1))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        make_readable(tmp)  # safetensors writes 0600; every file of a run is 0644 (umask permitting)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        _write_manifest(tmp, step)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (resumed from an older checkpoint): the old copy goes
            _remove_tree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            _remove_tree(old)
        fsync_dir(ckpt_dir)
    accelerator.wait_for_everyone()
    return final


def save_trainable_only(accelerator, model: torch.nn.Module) -> None:
    """Make accelerate's checkpoints of ``model`` (prepared by ``accelerator``) hold its trainable tensors alone: for
    a model whose frozen weights are the ones the run loads anyway (a LoRA student: adapters on the teacher's own
    network), so a checkpoint is the adapters, not the base (1.7 GB for SD 1.5 in fp16). Its ``model.safetensors``
    keeps accelerate's name; resuming loads it onto the base the run has built, refusing a file that lacks one of the
    trainable tensors. Through accelerate's state pre-hooks (a hook that loads a model removes it from
    the list accelerate loads)."""
    from accelerate.utils import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    names = {n for n, p in model.named_parameters() if p.requires_grad}

    def save(models, weights, output_dir):
        for i, m in enumerate(models):
            if m is model:
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load(models, input_dir):
        for i, m in enumerate(models):
            if m is model:
                state = load_file(str(Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"))
                if not names <= set(state):  # an older checkpoint holds the base too: its frozen tensors are skipped
                    raise CheckpointError(f"checkpoint {input_dir} lacks {len(names - set(state))} of this run's "
                                          f"{len(names)} trainable tensors (another run's?)")
                m.load_state_dict({k: state[k] for k in names}, strict=False)
                models.pop(i)
                return

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_checkpoint(accelerator, path: Path, modules: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what :func:`save_checkpoint` wrote; return ``(counters, this process's rng tensors)``.

    Only safe loaders run: safetensors, JSON, and (inside accelerate) ``torch.load(weights_only=True)``.
    """
    from safetensors.torch import load_file, load_model

    path = Path(path)
    try:
        accelerator.load_state(str(path))
        for name, module in (modules or {}).items():
            load_model(module, str(path / f"{name}.safetensors"), strict=True, device=str(accelerator.device))
        counters = json.loads((path / STATE_FILE).read_text())
        rng = load_file(str(path / f"rng_state_{accelerator.process_index}.safetensors"))
    except CheckpointError:
        raise
    except Exception as e:  # a checkpoint that passed the manifest but does not fit this run
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"cannot restore checkpoint {path}: {type(e).__name__}: {msg}") from e
    return counters, rng
