"""The one accelerate training loop, shared by ``cmdistill distill`` and ``cmdistill train-teacher``.

A *task* (:class:`Task`: :class:`~cmdistill.training.distill.Distillation`,
:class:`~cmdistill.training.teacher.TeacherTraining`) builds its networks, data and optimiser and says what one
micro-batch's loss is; this module owns everything around it, once for both:

* **check everything before writing**: recipe, output folder, resume checkpoint (verified against its manifest),
  teacher, data and models are all checked before the output folder is touched (:func:`train`);
* **one output-folder policy**: a folder holding another run is refused unless ``--resume`` or ``--overwrite``
  (:func:`check_output_dir`); the resolved recipe is written once, atomically (:func:`prepare_output_dir`);
* **one checkpoint format and one way to resume**: atomic, verified checkpoints (:mod:`.checkpoint`) holding the
  trained network, optimiser, LR schedule, the task's other networks, the step counters and every RNG the run draws
  from (global CPU/CUDA and the task's own generators), so a run killed at any moment and resumed ends bitwise
  identical to an uninterrupted one on CPU;
* **one non-finite guard** (:class:`NonFiniteGuard`, ``train.on_nonfinite``): a non-finite loss or gradient skips
  the step or stops the run, and non-finite weights are never saved or exported.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..core.rng import rng_state, set_rng_state
from ..core.tensors import skip_sync_checks
from ..files import write_atomic
from ..machine import fingerprint_line, machine_fingerprint
from .checkpoint import (clean_stale, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
                         verify_checkpoint)
from .optim import grad_norm
from .recipe_rules import TRAINING_RULES

RUN_SUBFOLDERS = ("checkpoints", "samples", "logs")
# recipe keys that may change on --resume without a warning (they do not change the numbers)
RESUME_FREE_KEYS = {"train.output_dir", "train.max_steps", "train.log_every", "train.sample_every",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.num_sample_images",
                    "data.num_workers", "data.root", "train.export_dir"}


class RunError(RuntimeError):
    """A run that cannot start (output folder conflicts, bad resume)."""

    exit_code = 2


class NonFiniteError(RunError):
    """A non-finite loss, gradient or weight with ``train.on_nonfinite: stop``: the run stops, nothing is saved."""

    exit_code = 1


class Task(Protocol):
    """What a training task gives the loop (built from the recipe by ``Task(recipe, accelerator)``)."""

    name: str                                # progress-bar label
    CHECKPOINT_MODULES: tuple[str, ...]      # names of ``modules``, checked in a checkpoint before resuming
    OUTPUTS: tuple[str, ...]                 # run subfolders it writes besides RUN_SUBFOLDERS (cleared by --overwrite)
    model: nn.Module                         # the trained network, prepared by accelerate
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    modules: dict[str, nn.Module]            # other networks saved in every checkpoint (target, EMA)
    generators: dict[str, torch.Generator]   # the task's own RNGs, saved in every checkpoint

    dataset: "torch.utils.data.Dataset"      # the training images (and labels); streamed by :func:`start_data`
    batches: object                          # the iterator :func:`start_data` sets, read by ``loss``
    def loss(self, step: int) -> torch.Tensor: ...       # one micro-batch's loss (under autocast and accumulate)
    def after_update(self) -> None: ...                  # after a real optimiser step: target and EMA updates
    def finite_modules(self) -> tuple[nn.Module, ...]: ...  # checked before a checkpoint is written
    def save_samples(self, path: Path) -> None: ...      # a PNG grid (main process)
    def describe(self) -> list[str]: ...                 # what is about to be trained, for the run's header


class TrainState:
    """Counters saved with every checkpoint (the data position is a function of ``step``)."""

    def __init__(self):
        self.step = 0
        self.skipped = 0

    def state_dict(self):
        return {"step": self.step, "skipped": self.skipped}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])
        self.skipped = int(sd.get("skipped", 0))


# --------------------------------------------------------------------------- output folder


def check_output_dir(out: Path, resume: str | None, overwrite: bool, resume_path: Path | None = None,
                     recipe_yaml: str | None = None) -> None:
    """Refuse to mix two runs in one folder unless ``--resume`` or ``--overwrite``. Writes nothing. The hint fits
    the case: a run of the same recipe can be continued (``--resume latest``), one of another recipe cannot."""
    out = Path(out)
    if resume is not None and overwrite:
        raise RunError("--resume and --overwrite cannot be used together (--overwrite deletes the checkpoints)")
    if out.exists() and not out.is_dir():
        raise RunError(f"output folder {out} is a file")
    holds_run = (out / "recipe.yaml").exists()
    if resume is not None:
        if holds_run and resume_path is not None and out.resolve() not in Path(resume_path).resolve().parents:
            raise RunError(f"output folder {out} already holds another run; pass --resume latest to continue it, "
                           "or choose another --output-dir for a run started from an outside checkpoint")
        return
    if holds_run and not overwrite:
        changes = recipe_changes((out / "recipe.yaml").read_text(), recipe_yaml) if recipe_yaml else []
        if changes:
            raise RunError(f"output folder {out} already holds a run of another recipe ({changes[0]}"
                           f"{f' and {len(changes) - 1} more' if len(changes) > 1 else ''}); choose another "
                           "--output-dir, or pass --overwrite to replace that run")
        raise RunError(f"output folder {out} already holds a run; pass --resume latest to continue it "
                       "or --overwrite to replace it")
    if not holds_run and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunError(f"output folder {out} is not empty and holds no cmdistill run; choose another folder "
                       "or pass --overwrite")


def prepare_output_dir(out: Path, recipe_yaml: str, resume: str | None, overwrite: bool,
                       outputs: tuple[str, ...] = ()) -> None:
    """After every check passed: clear a replaced run (``--overwrite``), then write the resolved recipe, once and
    atomically."""
    out = Path(out)
    check_output_dir(out, resume, overwrite)
    if overwrite and resume is None:
        for sub in RUN_SUBFOLDERS + tuple(outputs):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out / "checkpoints")
    write_atomic(out / "recipe.yaml", recipe_yaml)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def recipe_changes(ckpt_recipe_yaml: str, recipe_yaml: str) -> list[str]:
    """``key: old -> new`` for recipe values that differ from the checkpoint's (and change the numbers).
    ``train.max_steps`` is free unless a chosen schedule is scaled to it (:func:`cmdistill.config.run_length_keys`,
    read from the schedule registries): then the change is listed with the schedules it rescales."""
    from ..config import run_length_keys

    try:
        old_tree = yaml.safe_load(ckpt_recipe_yaml) or {}
    except yaml.YAMLError:
        return ["the checkpoint's recipe.yaml is unreadable"]
    old, new_tree = _flatten(old_tree), yaml.safe_load(recipe_yaml)
    new = _flatten(new_tree)
    scaled = sorted({*run_length_keys(old_tree, (TRAINING_RULES,)), *run_length_keys(new_tree, (TRAINING_RULES,))})
    free = set(RESUME_FREE_KEYS) - ({"train.max_steps"} if scaled else set())
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k not in free and not k.startswith(("eval.", "train.on_nonfinite")) and old.get(k) != new.get(k)]
    return [c + (f" (rescales {', '.join(f'{k} ({new.get(k)})' for k in scaled)} for the steps to come)"
                 if c.startswith("train.max_steps:") else "") for c in changes]


# --------------------------------------------------------------------------- processes


def launched_processes() -> int:
    """How many processes the launcher started (``torchrun``/``accelerate launch`` set WORLD_SIZE, MPI its own)."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def has_accelerator() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def cpu_processes() -> bool:
    """Several processes on a machine without an accelerator: ask accelerate for CPU (gloo) processes. Left to
    itself, ``Accelerator()`` there gives every process a one-process run of its own (DistributedType.NO)."""
    return launched_processes() > 1 and not has_accelerator()


def make_accelerator(tc, out: Path):
    """The run's ``Accelerator`` (mixed precision, gradient accumulation, TensorBoard when installed); refuses a
    launch whose processes accelerate did not join into one run."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(
        mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
        log_with="tensorboard" if has_tensorboard() else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        cpu=cpu_processes(),
    )
    if launched_processes() > 1 and acc.num_processes != launched_processes():
        raise RunError(f"{launched_processes()} processes were launched but accelerate set up {acc.num_processes} "
                       f"({acc.distributed_type}); they would train independently into one folder. "
                       "See docs/multigpu.md")
    return acc


def has_tensorboard() -> bool:
    for name in ("tensorboard", "tensorboardX"):
        try:
            __import__(name)
            return True
        except ImportError:
            pass
    return False


def configure_threads(cpu_threads: int | None, accelerator) -> int | None:
    """torch threads per process on a CPU run: ``train.cpu_threads`` when set; else, with several processes on this
    machine and no ``OMP_NUM_THREADS``, the cores this process may use divided among them (two processes each taking
    every core make OpenMP threads spin against each other); else torch's own setting (all cores, or what the caller
    or ``OMP_NUM_THREADS`` chose). Returns the number in force (``None`` on an accelerator)."""
    if accelerator.device.type != "cpu":
        return None
    if cpu_threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
        if local <= 1 or os.environ.get("OMP_NUM_THREADS", "").isdigit():
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpu_threads = max(1, cores // local)
    torch.set_num_threads(cpu_threads)
    return cpu_threads


class StepRateWatch:
    """Warns once when the training step rate collapses (another process competing for the CPU cores: OpenMP
    threads busy-wait, and a 2-thread step next to another 2-thread process was measured 46x slower)."""

    def __init__(self, factor: float = 3.0, patience: int = 2):
        self.factor, self.patience = factor, patience
        self.best, self.slow, self.intervals, self.warned = 0.0, 0, 0, False

    def update(self, steps_per_s: float) -> str | None:
        """Feed one logging interval's rate; returns the warning the first time the rate has stayed below
        ``best / factor`` for ``patience`` intervals (the first interval, with its warm-up, is not a reference)."""
        self.intervals += 1
        if self.intervals > 1:
            self.best = max(self.best, steps_per_s)
        self.slow = self.slow + 1 if self.best and steps_per_s < self.best / self.factor else 0
        if self.slow >= self.patience and not self.warned:
            self.warned = True
            return (f"cmdistill: warning: training slowed from {self.best:.2f} to {steps_per_s:.2f} steps/s; another "
                    "process is probably competing for the CPU cores. Run alone, or give each process fewer threads "
                    "(train.cpu_threads=1 or OMP_NUM_THREADS=1)")
        return None


# --------------------------------------------------------------------------- non-finite values


class NonFiniteGuard:
    """``train.on_nonfinite``: what to do when the loss or the gradient norm of a step is not finite.

    Per optimiser step the check is one fused ``isfinite(loss + grad_norm)`` on the device.
    ``skip`` reads that flag on the host (one scalar sync per step) and drops the step: no optimiser, target,
    EMA or LR update. ``stop`` never syncs per step: the first bad step is recorded on the device and read
    where the loop syncs anyway (logging, samples, checkpoints, the end), before anything is written.
    """

    def __init__(self, mode: str, accelerator):
        self.mode, self.acc = mode, accelerator
        self.first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)

    def step_ok(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int) -> bool:
        total = loss if grad_norm is None else loss + grad_norm.to(loss.dtype)
        bad = ~torch.isfinite(total)
        if self.mode == "skip":
            if self.acc.num_processes > 1:
                bad = self.acc.reduce(bad.float(), "sum") > 0
            return not bool(bad)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        return True

    def check(self, ckpt_dir: Path) -> None:
        if self.mode != "stop":
            return
        fb = self.first_bad
        if self.acc.num_processes > 1:
            fb = self.acc.gather(fb[None])
            fb = fb[fb >= 0].min() if bool((fb >= 0).any()) else fb.new_tensor(-1)
        step = int(fb)
        if step >= 0:
            raise NonFiniteError(f"non-finite loss or gradient at step {step}; stopped "
                                 f"(train.on_nonfinite=stop). {last_checkpoint_hint(ckpt_dir)}")


def last_checkpoint_hint(ckpt_dir: Path) -> str:
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return "No checkpoint was written."
    return (f"The last checkpoint, {ckpts[-1]}, holds finite weights: continue with --resume latest "
            "(e.g. with a lower optim.lr or train.on_nonfinite=skip)")


def all_finite(*modules) -> bool:
    ts = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in ts]).all()) if ts else True


def peak_memory_summary(device: torch.device | None = None) -> str:
    """``peak memory 1.23 GiB (...)``: the peak resident set size of this process so far (``getrusage``'s
    ``ru_maxrss``, in GiB = 2^30 bytes; DataLoader worker processes not included), plus the CUDA allocator's peak on
    a GPU. ``/usr/bin/time`` reports the same counter in KiB at process exit, so it can be a little higher: it
    includes what runs after this line (writing files, interpreter shutdown)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gib = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    out = f"peak memory so far {rss_gib:.2f} GiB (RSS of this process, getrusage)"
    if device is not None and device.type == "cuda":
        out += f", {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device}"
    return out


def start_data(task: Task, recipe, accelerator, step: int) -> None:
    """Set ``task.batches``: the data stream from optimiser step ``step`` on, this process's share of each global
    micro-batch (batch positions are a pure function of the step, so a resumed run sees the same data)."""
    from ..data import step_loader

    tc = recipe.train
    task.batches = step_loader(task.dataset, tc.batch_size // tc.grad_accum, tc.seed, step * tc.grad_accum,
                               accelerator.process_index, accelerator.num_processes, recipe.data.num_workers,
                               pin_memory=accelerator.device.type == "cuda")


# --------------------------------------------------------------------------- one optimiser step


def optimizer_step(accelerator, task: Task, step: int, grad_accum: int, clip: float | None,
                   guard: NonFiniteGuard, check_grads: bool) -> tuple[torch.Tensor, bool]:
    """``grad_accum`` micro-batches of ``task.loss``, then clip, check and (when finite) apply the gradients and
    ``task.after_update``. Returns the summed loss (on the device: no host sync) and whether the step was applied:
    not when the guard refused it, nor when fp16's grad scaler skipped it for overflowing gradients
    (``accelerator.optimizer_step_was_skipped``), so the target, the evaluation EMA and the LR schedule advance
    only with the weights. The training loop and ``benchmarks/bench_step.py`` both run exactly this."""
    step_loss = torch.zeros((), device=accelerator.device)
    for _ in range(grad_accum):
        with accelerator.accumulate(task.model), accelerator.autocast(), skip_sync_checks():
            loss = task.loss(step)
            accelerator.backward(loss)
        step_loss += loss.detach().float()
    # the last micro-step synchronised the gradients: check, clip and (maybe) apply them
    params = [p for p in task.model.parameters() if p.requires_grad]
    norm = grad_norm(accelerator, params, clip, check_grads)
    ok = guard.step_ok(step_loss, norm if check_grads else None, step + 1)
    if ok:
        task.optimizer.step()
        ok = not accelerator.optimizer_step_was_skipped  # fp16: the grad scaler found inf/NaN gradients
    task.optimizer.zero_grad(set_to_none=True)
    if ok:  # a real optimiser step: target, EMA and LR follow
        task.after_update()
        task.lr_scheduler.step()
    return step_loss, ok


# --------------------------------------------------------------------------- the run


def train(recipe, task_cls, export: Callable[[Task, Path], Path], resume: str | None = None,
          overwrite: bool = False) -> Path | None:
    """Run ``task_cls`` as ``recipe`` says (``recipe.train`` drives the loop), then ``export(task, run_folder)`` on
    the main process; return what it returned there (``None`` on the other processes).

    The recipe is not modified. Order: every check (output folder, resume checkpoint, then the task's teacher, data
    and models), then the output folder, then the loop, then the export.
    """
    from accelerate.utils import set_seed

    from ..config import dump_recipe

    recipe = copy.deepcopy(recipe)
    tc = recipe.train
    out = Path(tc.output_dir)
    tc.output_dir = str(out)
    recipe_yaml = dump_recipe(recipe)
    ckpt_dir = out / "checkpoints"

    # 0. everything that can be wrong is checked before anything is written
    check_output_dir(out, resume, overwrite, recipe_yaml=recipe_yaml)
    resume_path = resolve_resume(resume, out) if resume else None
    check_output_dir(out, resume, overwrite, resume_path)
    accelerator = make_accelerator(tc, out)
    if resume_path is not None:
        verify_checkpoint(resume_path, task_cls.CHECKPOINT_MODULES, accelerator.num_processes)
    if (tc.batch_size // tc.grad_accum) % accelerator.num_processes:
        raise RunError(f"train.batch_size / grad_accum = {tc.batch_size // tc.grad_accum} is not divisible by "
                       f"{accelerator.num_processes} processes")
    threads = configure_threads(tc.cpu_threads, accelerator)
    set_seed(tc.seed, device_specific=True)
    task = task_cls(recipe, accelerator)
    state, rng = TrainState(), None
    if resume_path is not None:
        counters, rng = load_checkpoint(accelerator, resume_path, task.modules)
        state.load_state_dict(counters["train"])
        task.lr_scheduler.load_state_dict(counters["lr_scheduler"])
        accelerator.step = state.step * tc.grad_accum  # gradient-accumulation phase

    # 1. only now is the output folder touched
    if accelerator.is_main_process:
        prepare_output_dir(out, recipe_yaml, resume, overwrite, task_cls.OUTPUTS)
    accelerator.wait_for_everyone()
    if resume_path is not None:
        accelerator.print(f"resumed from {resume_path} at step {state.step}")
        changes = recipe_changes((resume_path / "recipe.yaml").read_text(), recipe_yaml)
        if changes and accelerator.is_main_process:
            print(f"cmdistill: warning: resuming with a recipe that differs from the checkpoint's "
                  f"(the run will not match an uninterrupted one): {'; '.join(changes)}", file=sys.stderr)
    start_data(task, recipe, accelerator, state.step)
    if accelerator.is_main_process:
        where = f"{accelerator.num_processes} process(es) on {accelerator.device}" + (
            f", {threads} CPU threads each" if threads else "")
        for line in task.describe() + [
                f"training: steps {state.step} -> {tc.max_steps}, batch {tc.batch_size}"
                + (f" ({tc.grad_accum} accumulation steps)" if tc.grad_accum > 1 else "")
                + f", {where}, mixed precision {tc.mixed_precision}",
                fingerprint_line(machine_fingerprint(accelerator.device)), f"output: {out}"]:
            print(f"{task.name}: {line}")
    if has_tensorboard():  # a resumed run drops what the log holds beyond its checkpoint (purge_step)
        accelerator.init_trackers(task.name, init_kwargs={"tensorboard": {"purge_step": state.step + 1}}
                                  if state.step else {})  # the first step this run logs
    if rng is not None:  # last: the loop continues the very RNG streams the checkpoint captured
        restore_rng(rng, accelerator.device, task.generators)

    # 2. the loop
    run_steps(accelerator, task, recipe, state, out, recipe_yaml)

    # 3. export (main process)
    result = None
    if accelerator.is_main_process:
        if not all_finite(*task.finite_modules()):
            raise NonFiniteError(f"non-finite weights at step {state.step}; nothing exported. "
                                 f"{last_checkpoint_hint(ckpt_dir)}")
        result = export(task, out)
        accelerator.print(f"{task.name}: saved to {result}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def snapshot_rng(device, generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Every generator the loop draws from: the global CPU (and CUDA) ones and the task's own."""
    return {**rng_state(device), **{name: g.get_state() for name, g in generators.items()}}


def restore_rng(rng: dict[str, torch.Tensor], device, generators: dict[str, torch.Generator]) -> None:
    set_rng_state(rng, device)
    for name, g in generators.items():
        g.set_state(rng[name])


def run_steps(accelerator, task: Task, recipe, state: TrainState, out: Path, recipe_yaml: str) -> None:
    """Optimiser steps up to ``train.max_steps`` with the periodic hooks: log, samples, checkpoint."""
    tc = recipe.train
    ckpt_dir, device = out / "checkpoints", accelerator.device
    guard = NonFiniteGuard(tc.on_nonfinite, accelerator)
    check_grads = accelerator.scaler is None  # fp16 with a grad scaler: overflowing gradients are its to skip
    bar = tqdm(total=tc.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
               desc=task.name, dynamic_ncols=True)
    loss_sum, loss_n, t_last, imgs_last = torch.zeros((), device=device), 0, time.perf_counter(), 0
    watch = StepRateWatch() if device.type == "cpu" else None
    try:
        while state.step < tc.max_steps:
            step_loss, ok = optimizer_step(accelerator, task, state.step, tc.grad_accum, recipe.optim.grad_clip,
                                           guard, check_grads)
            if ok:
                loss_sum += step_loss
                loss_n += tc.grad_accum
            else:
                state.skipped += 1
                why = ("fp16 gradients overflowed at step {}; the grad scaler skipped the step ({} skipped so far; "
                       "target, EMA and LR held)" if accelerator.optimizer_step_was_skipped else
                       "non-finite loss or gradient at step {}; step skipped (train.on_nonfinite=skip, {} skipped "
                       "so far)")
                if accelerator.is_main_process:
                    bar.write(f"cmdistill: warning: {why.format(state.step + 1, state.skipped)}", file=sys.stderr)
            state.step += 1
            bar.update(1)
            imgs_last += tc.batch_size

            last = state.step == tc.max_steps
            log_now = state.step % tc.log_every == 0 or last
            sample_now = state.step % tc.sample_every == 0 or last
            ckpt_now = state.step % tc.checkpoint_every == 0 or last
            if log_now or sample_now or ckpt_now:
                guard.check(ckpt_dir)
            if log_now:
                loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_n, 1)
                now = time.perf_counter()
                ips = imgs_last / (now - t_last)
                bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{ips:.1f}")
                warning = watch.update(ips / tc.batch_size) if watch is not None else None
                if warning and accelerator.is_main_process:
                    bar.write(warning, file=sys.stderr)
                accelerator.log({"loss": loss, "lr": task.lr_scheduler.get_last_lr()[0], "images_per_s": ips,
                                 "skipped_steps": state.skipped}, step=state.step)
                loss_sum.zero_()
                loss_n, t_last, imgs_last = 0, now, 0
            if accelerator.is_main_process and sample_now:
                task.save_samples(out / "samples" / f"step_{state.step:08d}.png")
            if ckpt_now:
                if not all_finite(*task.finite_modules()):
                    raise NonFiniteError(f"non-finite weights at step {state.step}; checkpoint not written. "
                                         f"{last_checkpoint_hint(ckpt_dir)}")
                save_checkpoint(accelerator, ckpt_dir, state.step, recipe_yaml, tc.keep_checkpoints,
                                modules=task.modules,
                                counters={"train": state.state_dict(),
                                          "lr_scheduler": task.lr_scheduler.state_dict()},
                                rng=snapshot_rng(device, task.generators))
    finally:
        bar.close()  # also on an error: the message then starts on its own line
