"""Train a small DDPM teacher (Ho et al. 2020, Algorithm 1) and export it as a ``DDPMPipeline`` folder.

This is how the shipped digits teacher (``recipes/teachers/digits``) was made: a diffusers ``UNet2DModel``
trained to predict ``epsilon`` (or ``v`` / ``x0``) under a ``DDPMScheduler``, with an ema-pytorch EMA of its
weights, which is what gets exported. Its recipe is a typed, strict YAML file read with the machinery of
:mod:`cmdistill.config` (unknown keys and wrong types are errors naming the key).
"""
from __future__ import annotations

import dataclasses
import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from tqdm.auto import tqdm

from .config import ConfigError, _build, apply_overrides, get_key

# --------------------------------------------------------------------------- recipe


@dataclass
class UNetConfig:
    """Keyword arguments of ``diffusers.UNet2DModel`` (``out_channels`` = ``in_channels``)."""

    sample_size: int = 8
    in_channels: int = 1
    block_out_channels: list = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 2
    down_block_types: list = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D"])
    up_block_types: list = field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D"])
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    dropout: float = 0.0


@dataclass
class NoiseConfig:
    """Keyword arguments of ``diffusers.DDPMScheduler`` (the teacher's forward process and output)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"          # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"       # epsilon | v_prediction | sample
    timestep_spacing: str = "trailing"     # leading | trailing | linspace: few-step DDIM starts at t = T-1


@dataclass
class TeacherDataConfig:
    name: str = "digits"                   # digits | imagefolder | cifar10 (cmdistill.data registry)
    root: str = "~/.cache/cmdistill/data"
    hflip: bool = False
    num_workers: int = 0


@dataclass
class TeacherOptimConfig:
    lr: float = 1e-3                       # AdamW
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "cosine"            # constant | cosine (after warm-up, down to 0 at max_steps)
    grad_clip: Optional[float] = 1.0


@dataclass
class TeacherTrainConfig:
    seed: int = 0
    batch_size: int = 128
    max_steps: int = 6000
    ema_decay: float = 0.9995              # ema-pytorch, with its warm-up 1 - (1 + step)^-power
    ema_power: float = 0.6667
    mixed_precision: str = "no"            # no | fp16 | bf16
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    sample_every: int = 2000               # PNG grid of EMA samples (DDIM, sample_steps)
    sample_steps: int = 50
    num_sample_images: int = 100
    output_dir: str = "runs/teacher"       # checkpoints, samples, logs
    export_dir: Optional[str] = None       # the DDPMPipeline folder; None: <output_dir>/pipeline


@dataclass
class TeacherRecipe:
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: NoiseConfig = field(default_factory=NoiseConfig)
    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    optim: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


CHOICES = {
    "scheduler.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
    "scheduler.prediction_type": ("epsilon", "v_prediction", "sample"),
    "scheduler.timestep_spacing": ("leading", "trailing", "linspace"),
    "data.name": ("digits", "imagefolder", "cifar10"),
    "optim.lr_schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}
POSITIVE = {"unet.sample_size", "unet.in_channels", "unet.layers_per_block", "scheduler.num_train_timesteps",
            "optim.lr", "train.batch_size", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every", "train.sample_every", "train.sample_steps", "train.num_sample_images"}


def validate_teacher_recipe(r: TeacherRecipe) -> TeacherRecipe:
    """Choices, positive counts, EMA decay in [0, 1), and a U-Net whose block lists agree."""
    for key, allowed in CHOICES.items():
        v = get_key(r, key)
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'{key}' must be one of {', '.join(allowed)}; got {v!r}{hint}")
    for key in sorted(POSITIVE):
        if get_key(r, key) <= 0:
            raise ConfigError(f"'{key}' must be positive, got {get_key(r, key)!r}")
    if not 0.0 <= r.train.ema_decay < 1.0:
        raise ConfigError(f"'train.ema_decay' must be in [0, 1), got {r.train.ema_decay!r}")
    u = r.unet
    if not len(u.block_out_channels) == len(u.down_block_types) == len(u.up_block_types):
        raise ConfigError("'unet.block_out_channels', 'unet.down_block_types' and 'unet.up_block_types' "
                          "must have the same length")
    if any(c % u.norm_num_groups for c in u.block_out_channels):
        raise ConfigError(f"every 'unet.block_out_channels' entry must be divisible by 'unet.norm_num_groups' "
                          f"({u.norm_num_groups})")
    return r


def load_teacher_recipe(path: str | Path | None, overrides: list[str] = ()) -> TeacherRecipe:
    """Read a teacher recipe with ``yaml.safe_load``, apply ``--set`` overrides, type-check, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {str(path)!r} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"malformed YAML in {path}: {getattr(e, 'problem', e)}") from None
    data = apply_overrides(data, list(overrides))
    return validate_teacher_recipe(_build(TeacherRecipe, data, ""))


def dump_teacher_recipe(r: TeacherRecipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(r), sort_keys=False)


# --------------------------------------------------------------------------- model, objective


def make_unet(cfg: UNetConfig):
    """A fresh ``UNet2DModel`` from the recipe (shape errors become one-line recipe errors)."""
    from diffusers import UNet2DModel

    kw = dataclasses.asdict(cfg)
    kw["out_channels"] = kw["in_channels"]
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        kw[k] = tuple(kw[k])
    try:
        return UNet2DModel(**kw)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"bad 'unet' section: {e}") from None


def make_scheduler(cfg: NoiseConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**dataclasses.asdict(cfg))


# what the network regresses onto, keyed by the scheduler's prediction_type (x0, noise, t -> target)
TARGETS: dict[str, Callable] = {
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}


def ddpm_loss(unet, sched, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ho et al. (2020) Algorithm 1: ``t ~ U{0..T-1}``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``,
    mean squared error between the network output and the prediction target."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    x_t = sched.add_noise(x0, noise, t)
    out = unet(x_t, t).sample
    tgt = TARGETS[sched.config.prediction_type](sched, x0, noise, t)
    return torch.nn.functional.mse_loss(out.float(), tgt.float())


@torch.no_grad()
def sample_teacher_grid(unet, sched, n: int, steps: int, seed: int = 0) -> torch.Tensor:
    """``n`` deterministic DDIM samples of ``unet`` through the package's own teacher adapter and sampler."""
    from .denoisers import build_denoiser
    from .sample import sample_ode, teacher_sigmas

    den = build_denoiser(unet, dict(sched.config), "ddpm")
    c, s = unet.config.in_channels, unet.config.sample_size
    noise = torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))
    return sample_ode(den, noise.to(unet.device), teacher_sigmas(den, steps), "ddim")


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The noise/timestep/flip RNG of one step, a pure function of (seed, step, rank): resumed runs repeat
    an uninterrupted run exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) % (2**63))


class StepCounter:
    """The optimiser-step counter saved with every checkpoint (the data position follows from it)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])


def export_pipeline(unet, sched, folder: Path) -> Path:
    """Write a ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/; safetensors). Other subfolders
    already there (e.g. a shipped ``classifier/``) are left alone."""
    from diffusers import DDPMPipeline

    folder.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(folder), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- the loop


def train_teacher(recipe: TeacherRecipe, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the recipe's DDPM teacher and export its EMA as a ``DDPMPipeline`` folder; return that folder."""
    import copy

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .checkpoint import resolve_resume, save_checkpoint
    from .data import StepBatchSampler, check_fits, make_dataset
    from .ema import make_eval_ema
    from .images import save_grid
    from .lr_schedule import make_lr_schedule
    from .train import prepare_output_dir

    tc = recipe.train
    out = Path(tc.output_dir)
    export = Path(tc.export_dir) if tc.export_dir else out / "pipeline"
    recipe_yaml = dump_teacher_recipe(recipe)
    resume_path = resolve_resume(resume, out) if resume else None
    accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    if accelerator.is_main_process:
        prepare_output_dir(out, recipe_yaml, resume, overwrite)
        (out / "recipe.yaml").write_text(recipe_yaml)
    accelerator.wait_for_everyone()
    set_seed(tc.seed, device_specific=True)
    device = accelerator.device

    # 1. data, model, noise schedule, EMA
    dc, uc = recipe.data, recipe.unet
    ds = make_dataset(dc.name, dc.root, uc.sample_size, uc.in_channels)
    check_fits(ds, uc.sample_size, uc.in_channels, dc.name)
    unet = make_unet(uc).to(device)
    sched = make_scheduler(recipe.scheduler)
    ema = make_eval_ema(unet, tc.ema_decay, 0, tc.ema_power).to(device)
    n_params = sum(p.numel() for p in unet.parameters())
    accelerator.print(f"teacher U-Net: {n_params / 1e6:.2f} M parameters; data {dc.name}: {len(ds)} images")

    # 2. optimiser and learning-rate schedule
    oc = recipe.optim
    opt = torch.optim.AdamW(unet.parameters(), lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
    lr_sched = make_lr_schedule(opt, oc, tc.max_steps)
    state = StepCounter()
    unet_train, opt = accelerator.prepare(unet, opt)
    for obj in (ema, lr_sched, state):
        accelerator.register_for_checkpointing(obj)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        accelerator.print(f"resumed from {resume_path} at step {state.step}")

    # 3. resumable data stream: the batch of step m is a pure function of (seed, m)
    world = accelerator.num_processes
    sampler = StepBatchSampler(len(ds), tc.batch_size, tc.seed, state.step, accelerator.process_index, world)
    batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=dc.num_workers))

    # 4. the loop (DDPM Algorithm 1)
    bar = tqdm(total=tc.max_steps, initial=state.step, desc="teacher", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    loss_sum, loss_n, t0 = 0.0, 0, time.perf_counter()
    while state.step < tc.max_steps:
        (x0,) = next(batches)
        x0 = x0.to(device)
        gen = step_generator(tc.seed, state.step, accelerator.process_index)
        if dc.hflip:
            flip = torch.rand(x0.shape[0], generator=gen) < 0.5
            x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
        with accelerator.autocast():
            loss = ddpm_loss(unet_train, sched, x0, gen)
        accelerator.backward(loss)
        if oc.grad_clip:
            accelerator.clip_grad_norm_(unet_train.parameters(), oc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr_sched.step()
        ema.update()
        state.step += 1
        bar.update(1)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if state.step % tc.log_every == 0 or state.step == tc.max_steps:
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
            loss_sum, loss_n = 0.0, 0
        if accelerator.is_main_process and (state.step % tc.sample_every == 0 or state.step == tc.max_steps):
            x = sample_teacher_grid(ema.ema_model, sched, tc.num_sample_images, tc.sample_steps, tc.seed)
            save_grid(x, out / "samples" / f"step_{state.step:08d}.png")
        if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
            save_checkpoint(accelerator, out / "checkpoints", state.step, recipe_yaml, tc.keep_checkpoints)
    bar.close()

    # 5. export the EMA weights as a DDPMPipeline
    if accelerator.is_main_process:
        export_pipeline(copy.deepcopy(ema.ema_model).eval(), sched, export)
        accelerator.print(f"teacher saved to {export} ({time.perf_counter() - t0:.0f} s this session)")
    accelerator.wait_for_everyone()
    return export
