"""The accelerate training loop for consistency distillation. Orchestration only: every diffusion formula
lives in ``distill.py``, ``solvers.py``, ``consistency.py``, ``schedules.py`` and ``losses.py``.

Reliability contract (docs/reliability.md): everything a run can get wrong (recipe, teacher, data, output
folder, resume checkpoint) is checked before anything is written; checkpoints are atomic and hold every state
the loop draws from, so a run killed at any moment and resumed ends bitwise identical to an uninterrupted one;
a non-finite loss or gradient skips the step or stops the run (``train.on_nonfinite``) and non-finite weights
are never saved.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import (clean_stale, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
                         verify_checkpoint, write_atomic)
from .config import ConfigError, Recipe, dump_recipe, recipe_to_dict
from .consistency import make_student, make_target
from .data import DataError, StepBatchSampler, check_fits, make_dataset
from .denoisers import load_teacher
from .distill import cd_loss
from .ema import make_eval_ema, update_target
from .images import save_grid
from .losses import get_weighting, make_distance
from .lr_schedule import make_lr_schedule
from .pipeline import ConsistencyPipeline
from .prior import prior_mean
from .sample import default_multistep_sigmas, sample_consistency
from .schedules import PairSchedule
from .speed import configure_networks, to_device
from .utils import peak_memory_summary, skip_sync_checks

# networks saved beside accelerate's files in every checkpoint (as <name>.safetensors)
CKPT_MODULES = ("target", "ema")
# recipe keys that may change on --resume without a warning (they do not change the numbers)
RESUME_FREE_KEYS = {"train.output_dir", "train.max_steps", "train.log_every", "train.sample_every",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.num_sample_images",
                    "data.num_workers", "data.root"}
RUN_SUBFOLDERS = ("checkpoints", "samples", "student", "logs")


class RunError(RuntimeError):
    """A run that cannot start (output folder conflicts, bad resume)."""

    exit_code = 2


class NonFiniteError(RunError):
    """A non-finite loss, gradient or weight with ``train.on_nonfinite: stop``: the run stops, nothing is saved."""

    exit_code = 1


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


OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(params, cfg):
    """RAdam (CM's CIFAR-10 choice), Adam or AdamW, keyed by ``optim.name``."""
    return OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- output folder


def check_output_dir(out: Path, resume: str | None, overwrite: bool, resume_path: Path | None = None) -> None:
    """Refuse to mix two runs in one folder unless ``--resume`` or ``--overwrite``. Writes nothing."""
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
        raise RunError(f"output folder {out} already holds a run; pass --resume latest to continue it "
                       "or --overwrite to replace it")
    if not holds_run and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunError(f"output folder {out} is not empty and holds no cmdistill run; choose another folder "
                       "or pass --overwrite")


def prepare_output_dir(out: Path, recipe_yaml: str, resume: str | None, overwrite: bool) -> None:
    """After every check passed: clear a replaced run (``--overwrite``), then write the resolved recipe."""
    out = Path(out)
    check_output_dir(out, resume, overwrite)
    if overwrite and resume is None:
        for sub in RUN_SUBFOLDERS:
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


def recipe_changes(ckpt_recipe_yaml: str, recipe: Recipe) -> list[str]:
    """``key: old -> new`` for recipe values that differ from the checkpoint's (and change the numbers)."""
    try:
        old = _flatten(yaml.safe_load(ckpt_recipe_yaml) or {})
    except yaml.YAMLError:
        return ["the checkpoint's recipe.yaml is unreadable"]
    new = _flatten(recipe_to_dict(recipe))
    free = set(RESUME_FREE_KEYS)
    if recipe.schedule.curriculum == "constant" and recipe.optim.lr_schedule == "constant":
        free.add("train.max_steps")
    else:
        free.discard("train.max_steps")  # an N curriculum or a cosine LR is scaled to max_steps
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in free and not k.startswith(("eval.", "train.on_nonfinite")) and old.get(k) != new.get(k)]


# --------------------------------------------------------------------------- models


def build_models(recipe: Recipe, device):
    """Teacher adapter, student (copy of the teacher network + boundary condition), target and eval EMA."""
    teacher = load_teacher(recipe.teacher.path, recipe.teacher.kind).to(device)
    if device.type == "cuda" and recipe.teacher.dtype != "fp32":
        teacher.net.to({"fp16": torch.float16, "bf16": torch.bfloat16}[recipe.teacher.dtype])
    sc = recipe.student
    if sc.sigma_max is not None and not teacher.sigma_min < sc.sigma_max <= teacher.sigma_max:
        raise ConfigError(f"'student.sigma_max' must lie in the teacher's range ({teacher.sigma_min:.4g}, "
                          f"{teacher.sigma_max:.4g}], got {sc.sigma_max}")
    student = make_student(teacher, sc.boundary, sc.sigma_data, sc.boundary_scale, sc.sigma_max).to(device)
    if student.denoiser.net.dtype != torch.float32:  # the student trains in fp32 master weights
        student.denoiser.net.to(torch.float32)
    target = make_target(student)
    ema = make_eval_ema(student, sc.ema_decay, sc.ema_update_after_step, sc.ema_power).to(device)
    return teacher, student, target, ema


def launched_processes() -> int:
    """How many processes the launcher started (``torchrun``/``accelerate launch`` set WORLD_SIZE, MPI its own)."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def cpu_processes() -> bool:
    """Several processes on a machine without an accelerator: ask accelerate for CPU (gloo) processes. Left to
    itself, ``Accelerator()`` there gives every process a one-process run of its own (DistributedType.NO)."""
    has_acc = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return launched_processes() > 1 and not has_acc


def teacher_shape(teacher) -> tuple[int, int]:
    cfg = teacher.net.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return int(cfg.in_channels), int(size)


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
                                 f"(train.on_nonfinite=stop). {_last_ckpt_hint(ckpt_dir)}")


def _last_ckpt_hint(ckpt_dir: Path) -> str:
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return "No checkpoint was written."
    return (f"The last checkpoint, {ckpts[-1]}, holds finite weights: continue with --resume latest "
            "(e.g. with a lower optim.lr or train.on_nonfinite=skip)")


def _grad_norm(accelerator, params, clip: float | None, check: bool):
    """The total gradient norm (clipping to ``clip`` when set); ``None`` when neither is needed."""
    if clip:
        return accelerator.clip_grad_norm_(params, clip)
    if check:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return None


def _all_finite(*modules) -> bool:
    ts = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in ts]).all()) if ts else True


def _rng_snapshot(device, flip_gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every generator the loop draws from: the global CPU (pairs, noise, dropout) and CUDA ones, hflip."""
    rng = {"torch_cpu": torch.get_rng_state(), "flip": flip_gen.get_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _rng_restore(rng: dict[str, torch.Tensor], device, flip_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    flip_gen.set_state(rng["flip"])
    if device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], device)


def _save_samples(ema_model, noise: torch.Tensor, path: Path, accelerator) -> None:
    """1-step samples of the evaluation EMA in eval mode, on a forked RNG (training draws are not disturbed)."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    was_training = ema_model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast():
        ema_model.eval()
        try:
            x = sample_consistency(ema_model, noise, [ema_model.sigma_max])
        finally:
            ema_model.train(was_training)
    save_grid(x, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (the previous one, if any, is removed only afterwards)."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the run


def distill(recipe: Recipe, output_dir: str | None = None, resume: str | None = None,
            overwrite: bool = False) -> Path:
    """Run consistency distillation as the recipe says; return the student folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    t_start = time.perf_counter()
    tc = recipe.train
    out = Path(output_dir or tc.output_dir)
    tc.output_dir = str(out)
    recipe_yaml = dump_recipe(recipe)
    ckpt_dir = out / "checkpoints"

    # 0. everything that can be wrong is checked before anything is written
    check_output_dir(out, resume, overwrite)
    resume_path = resolve_resume(resume, out) if resume else None
    check_output_dir(out, resume, overwrite, resume_path)
    has_tb = _has_tensorboard()
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
        log_with="tensorboard" if has_tb else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        cpu=cpu_processes(),
    )
    world = accelerator.num_processes
    if launched_processes() > 1 and world != launched_processes():
        raise RunError(f"{launched_processes()} processes were launched but accelerate set up {world} "
                       f"({accelerator.distributed_type}); they would train independently into one folder. "
                       "See docs/multigpu.md")
    if resume_path is not None:
        verify_checkpoint(resume_path, CKPT_MODULES, world)
    set_seed(tc.seed, device_specific=True)
    device = accelerator.device

    # 1. models
    teacher, student, target, ema = build_models(recipe, device)
    configure_networks(teacher, student, target, channels_last=tc.channels_last, compile=tc.compile,
                       gradient_checkpointing=tc.gradient_checkpointing)
    channels, resolution = teacher_shape(teacher)

    # 2. data (checked against the teacher)
    dc = recipe.data
    if dc.resolution is not None and dc.resolution != resolution:
        raise DataError(f"data.resolution is {dc.resolution} but the teacher {recipe.teacher.path!r} works at "
                        f"{resolution}x{resolution}; set data.resolution to {resolution} or null")
    ds = make_dataset(dc.name, dc.root, dc.resolution or resolution, channels)
    check_fits(ds, resolution, channels, dc.name)
    mean = prior_mean(recipe.student.prior, ds, dc.hflip)  # where 1-step sampling starts (prior.py)
    for fn in (student, target, ema.ema_model):
        fn.prior_mean = None if mean is None else mean.to(device)
    micro_global = tc.batch_size // tc.grad_accum
    if micro_global % world:
        raise RunError(f"train.batch_size / grad_accum = {micro_global} is not divisible by {world} processes")

    # 3. loss, schedule, optimiser
    lc = recipe.loss
    distance = make_distance(lc.distance, lpips_net=lc.lpips_net, lpips_resize=lc.lpips_resize, huber_c=lc.huber_c,
                             lpips_pretrained_backbone=lc.lpips_pretrained)
    if isinstance(distance, torch.nn.Module):
        distance.to(device)
    weighting = get_weighting(lc.weighting)
    sch = recipe.schedule
    pairs = PairSchedule(sch.grid, teacher.sigma_min, student.sigma_max, sch.num_scales, sch.rho, sch.curriculum,
                         sch.num_scales_start, tc.max_steps, sch.pairs, sch.p_mean, sch.p_std,
                         getattr(teacher, "sigma_table", None), sch.skip)
    for at in (0, tc.max_steps):  # the grids span the teacher's range: checked once here, on the host, so the
        teacher.check_range(pairs.grid_and_probs(at)[0])  # step runs without per-call checks (host syncs)
    opt = make_optimizer(student.parameters(), recipe.optim)
    lr_sched = make_lr_schedule(opt, recipe.optim, tc.max_steps)
    state = TrainState()
    student_train, opt = accelerator.prepare(student, opt)
    params = [p for p in student_train.parameters() if p.requires_grad]
    flip_gen = torch.Generator().manual_seed(tc.seed + 1 + accelerator.process_index)
    ckpt_modules = {"target": target, "ema": ema}
    rng = None
    if resume_path is not None:
        counters, rng = load_checkpoint(accelerator, resume_path, ckpt_modules)
        state.load_state_dict(counters["train"])
        lr_sched.load_state_dict(counters["lr_scheduler"])
        accelerator.step = state.step * tc.grad_accum  # gradient-accumulation phase

    # 4. only now is the output folder touched
    if accelerator.is_main_process:
        prepare_output_dir(out, recipe_yaml, resume, overwrite)
    accelerator.wait_for_everyone()
    if resume_path is not None:
        accelerator.print(f"resumed from {resume_path} at step {state.step}")
        changes = recipe_changes((resume_path / "recipe.yaml").read_text(), recipe)
        if changes and accelerator.is_main_process:
            print(f"cmdistill: warning: resuming with a recipe that differs from the checkpoint's "
                  f"(the run will not match an uninterrupted one): {'; '.join(changes)}", file=sys.stderr)

    sampler = StepBatchSampler(len(ds), micro_global, tc.seed, state.step * tc.grad_accum,
                               accelerator.process_index, world)
    # its own generator: creating the iterator must not draw from the global RNG (worker seeds only)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=dc.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=dc.num_workers > 0,
                                         generator=torch.Generator().manual_seed(tc.seed))
    batches = iter(loader)
    if has_tb:
        accelerator.init_trackers("cmdistill")
    sample_noise = torch.randn(tc.num_sample_images, channels, resolution, resolution,
                               generator=torch.Generator().manual_seed(tc.seed)).to(device)
    guard = NonFiniteGuard(tc.on_nonfinite, accelerator)
    check_grads = tc.mixed_precision != "fp16"  # fp16: gradient overflow is the grad scaler's to skip
    if rng is not None:  # last: the loop continues the very RNG streams the checkpoint captured
        _rng_restore(rng, device, flip_gen)

    # 5. the loop (CM Algorithm 2)
    bar = tqdm(total=tc.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
               desc="distill", dynamic_ncols=True)
    loss_sum, loss_n, t_last, imgs_last = torch.zeros((), device=device), 0, time.perf_counter(), 0
    try:
        while state.step < tc.max_steps:
            step_loss = torch.zeros((), device=device)
            for _ in range(tc.grad_accum):
                (x0,) = next(batches)
                x0 = x0.to(device, non_blocking=True)
                if dc.hflip:
                    flip = torch.rand(x0.shape[0], generator=flip_gen) < 0.5
                    x0 = torch.where(to_device(flip, device)[:, None, None, None], x0.flip(-1), x0)
                sigma_hi, sigma_lo = (to_device(t, device) for t in pairs.sample(x0.shape[0], state.step))
                with accelerator.accumulate(student_train), accelerator.autocast(), skip_sync_checks():
                    res = cd_loss(student_train, target, teacher, x0, sigma_hi, sigma_lo, distance, weighting,
                                  recipe.solver.name, recipe.solver.substeps)
                    accelerator.backward(res.loss)
                step_loss += res.loss.detach().float()
            # the last micro-step synchronised the gradients: check, clip and (maybe) apply them
            grad_norm = _grad_norm(accelerator, params, recipe.optim.grad_clip, check_grads)
            ok = guard.step_ok(step_loss, grad_norm if check_grads else None, state.step + 1)
            if ok:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if ok:  # real optimiser step: target and evaluation EMA follow
                update_target(target, student, recipe.student.target_decay)
                ema.update()
                lr_sched.step()
                loss_sum += step_loss
                loss_n += tc.grad_accum
            else:
                state.skipped += 1
                if accelerator.is_main_process:
                    bar.write(f"cmdistill: warning: non-finite loss or gradient at step {state.step + 1}; step skipped "
                              f"(train.on_nonfinite=skip, {state.skipped} skipped so far)", file=sys.stderr)
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
                if has_tb:
                    accelerator.log({"loss": loss, "lr": lr_sched.get_last_lr()[0], "images_per_s": ips,
                                     "skipped_steps": state.skipped}, step=state.step)
                loss_sum.zero_()
                loss_n, t_last, imgs_last = 0, now, 0
            if accelerator.is_main_process and sample_now:
                _save_samples(ema.ema_model, sample_noise, out / "samples" / f"step_{state.step:08d}.png", accelerator)
            if ckpt_now:
                if not _all_finite(student, target, ema):
                    raise NonFiniteError(f"non-finite weights at step {state.step}; checkpoint not written. "
                                         f"{_last_ckpt_hint(ckpt_dir)}")
                save_checkpoint(accelerator, ckpt_dir, state.step, recipe_yaml, tc.keep_checkpoints,
                                modules=ckpt_modules,
                                counters={"train": state.state_dict(), "lr_scheduler": lr_sched.state_dict()},
                                rng=_rng_snapshot(device, flip_gen))
    finally:
        bar.close()  # also on an error: the message then starts on its own line

    # 6. export the evaluation-EMA student as a ConsistencyPipeline (atomically)
    student_dir = out / "student"
    if accelerator.is_main_process:
        fn = ema.ema_model
        if not _all_finite(fn):
            raise NonFiniteError(f"non-finite evaluation-EMA weights at step {state.step}; student not exported. "
                                 f"{_last_ckpt_hint(ckpt_dir)}")
        ms = {k: default_multistep_sigmas(fn.sigma_min, fn.sigma_max, k) for k in (2, 3, 4)}
        tmp_dir = out / ".tmp-student"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        ConsistencyPipeline.from_student(fn, ms).save_pretrained(str(tmp_dir), safe_serialization=True)
        _replace_dir(tmp_dir, student_dir)
        accelerator.print(f"student saved to {student_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if recipe.eval.at_end and accelerator.is_main_process:  # `cmdistill evaluate` on the finished run
        from .evaluate import evaluate

        evaluate(out)
    if accelerator.is_main_process:
        print(f"finished in {(time.perf_counter() - t_start) / 60:.1f} min, {peak_memory_summary(device)}")
        report = f"report: {out / 'report.md'}; " if recipe.eval.at_end else ""
        print(f"student: {student_dir} ({report}sample it with `cmdistill sample --student {student_dir} --steps 1`)")
    return student_dir


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        try:
            import tensorboardX  # noqa: F401

            return True
        except ImportError:
            return False


__all__ = ["distill", "RunError", "NonFiniteError", "list_checkpoints"]
