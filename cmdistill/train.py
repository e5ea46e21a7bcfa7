"""The accelerate training loop for consistency distillation. Orchestration only: every diffusion formula
lives in ``distill.py``, ``solvers.py``, ``consistency.py``, ``schedules.py`` and ``losses.py``."""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from .config import Recipe, dump_recipe
from .consistency import make_student, make_target
from .data import StepBatchSampler, check_fits, make_dataset
from .denoisers import load_teacher
from .distill import cd_loss
from .ema import make_eval_ema, update_target
from .images import save_grid
from .losses import get_weighting, make_distance
from .pipeline import ConsistencyPipeline
from .sample import default_multistep_sigmas, sample_consistency
from .schedules import PairSchedule


class RunError(RuntimeError):
    """A run that cannot start (output folder conflicts, bad resume)."""


class TrainState:
    """Counters saved with every checkpoint (the data position is a function of ``step``)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])


OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(params, cfg):
    """RAdam (CM's CIFAR-10 choice), Adam or AdamW, keyed by ``optim.name``."""
    return OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)


def make_lr_schedule(opt, warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` optimiser steps, then constant (CM)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)


def prepare_output_dir(out: Path, recipe_yaml: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless ``--resume`` or ``--overwrite``."""
    existing = out / "recipe.yaml"
    if existing.exists() and resume is None:
        if not overwrite:
            raise RunError(f"output folder {out} already holds a run; pass --resume latest to continue it "
                           "or --overwrite to replace it")
        for sub in ("checkpoints", "samples", "student", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def build_models(recipe: Recipe, device):
    """Teacher adapter, student (copy of the teacher network + boundary condition), target and eval EMA."""
    teacher = load_teacher(recipe.teacher.path, recipe.teacher.kind).to(device)
    if device.type == "cuda" and recipe.teacher.dtype != "fp32":
        teacher.net.to({"fp16": torch.float16, "bf16": torch.bfloat16}[recipe.teacher.dtype])
    sc = recipe.student
    student = make_student(teacher, sc.boundary, sc.sigma_data, sc.boundary_scale).to(device)
    if student.denoiser.net.dtype != torch.float32:  # the student trains in fp32 master weights
        student.denoiser.net.to(torch.float32)
    target = make_target(student)
    ema = make_eval_ema(student, sc.ema_decay, sc.ema_update_after_step, sc.ema_power).to(device)
    return teacher, student, target, ema


def teacher_shape(teacher) -> tuple[int, int]:
    cfg = teacher.net.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return int(cfg.in_channels), int(size)


def distill(recipe: Recipe, output_dir: str | None = None, resume: str | None = None,
            overwrite: bool = False) -> Path:
    """Run consistency distillation as the recipe says; return the student folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    tc = recipe.train
    out = Path(output_dir or tc.output_dir)
    tc.output_dir = str(out)
    recipe_yaml = dump_recipe(recipe)
    resume_path = resolve_resume(resume, out) if resume else None

    has_tb = _has_tensorboard()
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
        log_with="tensorboard" if has_tb else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if accelerator.is_main_process:
        prepare_output_dir(out, recipe_yaml, resume, overwrite)
        (out / "recipe.yaml").write_text(recipe_yaml)
    accelerator.wait_for_everyone()
    set_seed(tc.seed, device_specific=True)
    device = accelerator.device

    # 1. models
    teacher, student, target, ema = build_models(recipe, device)
    channels, resolution = teacher_shape(teacher)

    # 2. data (checked against the teacher)
    dc = recipe.data
    ds = make_dataset(dc.name, dc.root, dc.resolution or resolution, channels)
    check_fits(ds, resolution, channels, dc.name)
    world = accelerator.num_processes
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
    pairs = PairSchedule(sch.grid, teacher.sigma_min, teacher.sigma_max, sch.num_scales, sch.rho, sch.curriculum,
                         sch.num_scales_start, tc.max_steps, sch.pairs, sch.p_mean, sch.p_std,
                         getattr(teacher, "sigma_table", None), sch.skip)
    opt = make_optimizer(student.parameters(), recipe.optim)
    lr_sched = make_lr_schedule(opt, recipe.optim.warmup_steps)
    state = TrainState()

    student_train, opt = accelerator.prepare(student, opt)
    for obj in (target, ema, lr_sched, state):
        accelerator.register_for_checkpointing(obj)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        accelerator.print(f"resumed from {resume_path} at step {state.step}")

    sampler = StepBatchSampler(len(ds), micro_global, tc.seed, state.step * tc.grad_accum,
                               accelerator.process_index, world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=recipe.data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=recipe.data.num_workers > 0)
    batches = iter(loader)
    if has_tb:
        accelerator.init_trackers("cmdistill")
    sample_noise = torch.randn(tc.num_sample_images, channels, resolution, resolution,
                               generator=torch.Generator().manual_seed(tc.seed)).to(device)
    flip_gen = torch.Generator().manual_seed(tc.seed + 1 + accelerator.process_index)

    # 4. the loop (CM Algorithm 2)
    bar = tqdm(total=tc.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
               desc="distill", dynamic_ncols=True)
    loss_sum, loss_n, t_last, imgs_last = torch.zeros((), device=device), 0, time.perf_counter(), 0
    ckpt_dir = out / "checkpoints"
    while state.step < tc.max_steps:
        for _ in range(tc.grad_accum):
            (x0,) = next(batches)
            x0 = x0.to(device, non_blocking=True)
            if dc.hflip:
                flip = torch.rand(x0.shape[0], generator=flip_gen) < 0.5
                x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
            sigma_hi, sigma_lo = pairs.sample(x0.shape[0], state.step, device)
            with accelerator.accumulate(student_train), accelerator.autocast():
                res = cd_loss(student_train, target, teacher, x0, sigma_hi, sigma_lo, distance, weighting,
                              recipe.solver.name, recipe.solver.substeps)
                accelerator.backward(res.loss)
                if accelerator.sync_gradients and recipe.optim.grad_clip:
                    accelerator.clip_grad_norm_(student_train.parameters(), recipe.optim.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss_sum += res.loss.detach()
            loss_n += 1
        # real optimiser step: target and evaluation EMA follow
        update_target(target, student, recipe.student.target_decay)
        ema.update()
        lr_sched.step()
        state.step += 1
        bar.update(1)
        imgs_last += tc.batch_size

        if state.step % tc.log_every == 0 or state.step == tc.max_steps:
            loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_n, 1)
            now = time.perf_counter()
            ips = imgs_last / (now - t_last)
            bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{ips:.1f}")
            if has_tb:
                accelerator.log({"loss": loss, "lr": lr_sched.get_last_lr()[0], "images_per_s": ips}, step=state.step)
            loss_sum.zero_()
            loss_n, t_last, imgs_last = 0, now, 0
        if accelerator.is_main_process and (state.step % tc.sample_every == 0 or state.step == tc.max_steps):
            with torch.no_grad(), accelerator.autocast():
                x = sample_consistency(ema.ema_model, sample_noise, [ema.ema_model.sigma_max])
            save_grid(x, out / "samples" / f"step_{state.step:08d}.png")
        if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
            save_checkpoint(accelerator, ckpt_dir, state.step, recipe_yaml, tc.keep_checkpoints)
    bar.close()

    # 5. export the evaluation-EMA student as a ConsistencyPipeline
    student_dir = out / "student"
    if accelerator.is_main_process:
        fn = ema.ema_model
        ms = {k: default_multistep_sigmas(fn.sigma_min, fn.sigma_max, k) for k in (2, 3, 4)}
        ConsistencyPipeline.from_student(fn, ms).save_pretrained(str(student_dir), safe_serialization=True)
        accelerator.print(f"student saved to {student_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if recipe.eval.at_end and accelerator.is_main_process:  # `cmdistill evaluate` on the finished run
        from .evaluate import evaluate

        evaluate(out)
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


__all__ = ["distill", "RunError", "list_checkpoints"]
