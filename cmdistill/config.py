"""Typed recipes for both commands that train, ``cmdistill distill`` (:class:`Recipe`) and ``cmdistill
train-teacher`` (:class:`TeacherRecipe`), read by one strict reader (:func:`read_recipe`): ``yaml.safe_load``,
unknown keys and wrong types are errors naming the key, malformed YAML names line and column, ``--set a.b=value``
overrides, finite and range checks. The allowed values of every string choice are read from the registries that
implement them (:func:`choices`), so a new solver or distance is a choice the moment it is registered.

Each layer owns the rules of its own sections (:class:`RecipeRules`): this module those of the core and the data,
``cmdistill.training.recipe_rules`` and ``cmdistill.evaluation.recipe_rules`` theirs; this module imports neither
(the layer rule, docs/architecture.md). :func:`cmdistill.commands.load_recipe` reads a recipe under all of them."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A recipe problem, reported as one line naming the key."""


@dataclass
class TeacherConfig:
    path: str = "google/ddpm-cifar10-32"   # hub id or local folder (DDPMPipeline or flat layout)
    kind: str = "auto"                     # auto | ddpm | edm
    dtype: str = "fp32"                    # fp32 | fp16 | bf16 (the teacher network's weights, GPU only)


@dataclass
class DataConfig:
    name: str = "cifar10"                  # cifar10 | imagefolder | digits | fashion_mnist | captions | hf_disk | teacher
    root: str = "~/.cache/cmdistill/data"  # download cache (cifar10), image folder, Fashion-MNIST's IDX folder
    hflip: bool = True
    num_workers: int = 2
    resolution: Optional[int] = None       # None: the teacher's sample_size (a latent teacher's: its VAE's)
    latent_cache: str = "~/.cache/cmdistill/latents"  # latent teachers: the verified cache of encoded images
    caption_column: str = "text"           # captions / hf_disk: the column holding each image's caption


@dataclass
class ScheduleConfig:
    grid: str = "karras"                   # karras | teacher
    num_scales: int = 18                   # N (grid points); with a curriculum, the final N
    num_scales_start: int = 11             # first N of a curriculum (iCT: 11 points, i.e. s0 = 10 intervals)
    curriculum: str = "constant"           # constant | ict_exponential
    rho: float = 7.0
    skip: int = 20                         # teacher grid: step between timesteps (LCM's k)
    pairs: str = "uniform"                 # uniform | lognormal
    gap: str = "constant"                  # pair gap in grid intervals: constant (1, CM) | ect_halving (gap_start..1)
    gap_start: int = 4                     # ect_halving: the first gap, halved in equal stages down to 1
    p_mean: float = -1.1                   # lognormal pair sampling (iCT)
    p_std: float = 2.0


@dataclass
class GuidanceConfig:
    scale: float = 1.0                     # classifier-free guidance w of the teacher (1: the conditional teacher);
                                           # with w_min/w_max: the student's default w
    null_class: Optional[int] = None       # the teacher's null label; null: its last class embedding
    w_min: Optional[float] = None          # both set: w drawn per sample from [w_min, w_max] and given to the
    w_max: Optional[float] = None          # student through a guidance embedding (LCM); null: w fixed at scale

    @property
    def w_range(self) -> tuple[float, float] | None:
        """``(w_min, w_max)`` when w is drawn per sample (an input of the student), else ``None``."""
        return None if self.w_min is None else (self.w_min, self.w_max)


@dataclass
class BankConfig:
    """The teacher trajectory bank (cmdistill.training.bank): made once, cached with a manifest, reused."""

    count: int = 0                         # trajectories; 0: no bank (needed by loss.regression_weight, data teacher)
    path: Optional[str] = None             # its folder; null: runs/banks/<teacher>-<hash of what makes it>
    start: str = "student"                 # student: from the 1-step start mu + sigma_max z | teacher: from the top
    solver: str = "heun"                   # of the teacher's range; the ODE solver and its grid (null points:
    num_scales: Optional[int] = None       # schedule.num_scales) over the student's range
    seed: int = 20240                      # of the bank's noise (its own stream: not the training seed)


@dataclass
class SolverConfig:
    name: str = "heun"                     # heun | euler | ddim
    substeps: int = 1                      # teacher sub-steps per pair (times the pair gap)
    substep_schedule: str = "constant"     # constant | doubling (1, 2, 4 .. substeps in equal stages; Multistep CM)


def _default_lora_modules() -> list:
    from .core.lora import DEFAULT_TARGET_MODULES

    return list(DEFAULT_TARGET_MODULES)


@dataclass
class LoraConfig:
    """A LoRA student (peft adapters on the teacher's own network, LCM-LoRA); ``rank: 0`` trains a full copy."""

    rank: int = 0                          # r; 0: no LoRA (the student is a full copy of the teacher's network)
    alpha: Optional[float] = None          # the update is scaled by alpha / r; null: alpha = r
    target_modules: list = field(default_factory=lambda: _default_lora_modules())  # layer names (peft's)


@dataclass
class StudentConfig:
    boundary: str = "auto"                 # auto | lcm | cm | lcm_scheduler (auto: lcm_scheduler for text U-Nets, else lcm)
    boundary_scale: float = 10.0           # lcm, lcm_scheduler (LCMScheduler's timestep_scaling)
    sigma_data: float = 0.5
    target_decay: float = 0.0              # mu; 0 = stop-gradient copy
    ema_decay: float = 0.9999              # evaluation EMA (ema-pytorch)
    ema_power: float = 0.6667              # ema-pytorch warm-up exponent
    ema_update_after_step: int = 0
    sigma_max: Optional[float] = None      # top of the student's range (Karras grid, 1-step start); null: teacher's
    prior: str = "zero"                    # 1-step start: zero (CM, sigma_max z) | data_mean (mu + sigma_max z)
    parametrization: str = "denoiser"      # F: denoiser (the teacher's D) | v (TrigFlow v head, bounded output)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters instead of a full copy (text U-Nets)


@dataclass
class LossConfig:
    distance: str = "lpips"                # lpips | l2 | l1 | pseudo_huber
    lpips_net: str = "vgg"                 # vgg | alex
    lpips_resize: Optional[int] = 224      # upsample smaller images to this size (CM); null: never
    lpips_pretrained: bool = True          # ImageNet backbone weights (torchvision download); false: random
    huber_c: Optional[float] = None        # None: 0.00054 * sqrt(dim) (iCT)
    decode: bool = False                   # latent teachers: the distance on decoded pixels (VAE decoder per step)
    weighting: str = "uniform"             # uniform | inv_delta
    regression_weight: float = 0.0         # > 0: + weight * d(f(x_start, sigma_max), x0) on trajectory-bank entries
    regression_schedule: str = "constant"  # constant | linear_decay (weight -> 0 at train.max_steps)
    regression_batch: Optional[int] = None  # bank entries per micro-batch; null: the micro-batch size


@dataclass
class OptimConfig:
    name: str = "radam"                    # radam | adam | adamw
    lr: float = 4e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"          # after warm-up: constant (CM) | cosine (down to 0 at train.max_steps)
    grad_clip: Optional[float] = 1.0       # max grad norm; null disables


@dataclass
class LoopConfig:
    """What the one training loop reads (cmdistill.training.loop), shared by both recipes."""

    seed: int = 0
    batch_size: int = 512                  # global batch (all processes, one optimiser step)
    grad_accum: int = 1
    max_steps: int = 800000
    mixed_precision: str = "no"            # no | fp16 | bf16
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 5000               # PNG grid of samples
    num_sample_images: int = 64
    output_dir: str = "runs/cd"
    on_nonfinite: str = "stop"            # non-finite loss/gradient: stop (name the step) | skip the step
    cpu_threads: Optional[int] = None      # torch threads per process on CPU; null: the cores / local processes


@dataclass
class TrainConfig(LoopConfig):
    channels_last: bool = False            # U-Nets on NHWC activations (GPU tensor cores); weights stay NCHW
    compile: bool = False                  # torch.compile the teacher, student and target U-Nets
    gradient_checkpointing: bool = False   # recompute student activations in backward: less memory, slower


@dataclass
class EvalConfig:
    at_end: bool = False                   # run `cmdistill evaluate` when distillation ends
    num_samples: int = 1000
    feature_net: str = "inception"         # inception | digits
    batch_size: int = 250
    search_sigmas: bool = False            # at the end of distill: pick the 2-4-step sigmas by FID, store them
    seeds: int = 1                         # noise seeds per sampler (mean ± std when > 1)
    baselines: list = field(default_factory=lambda: ["dpm++2m", "unipc", "heun-karras"])  # training-free samplers
    baseline_nfe: list = field(default_factory=lambda: [2, 4, 8])  # their budgets of network evaluations
    curve: bool = False                    # at the end of distill: score every kept checkpoint (curve.json/png)
    data: Optional[str] = None             # the real images FID/precision/recall compare with; null: data.name
                                           # (a data-free run, data.name: teacher, must name them to be evaluated)


@dataclass
class Recipe:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- train-teacher (DDPM, Ho et al. 2020)


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
    num_class_embeds: Optional[int] = None  # class-conditional: the data's classes (+ 1 null class for guidance)


@dataclass
class TransformerConfig:
    """Keyword arguments of ``diffusers.DiTTransformer2DModel`` (Peebles & Xie 2023), read when ``model: dit``.
    ``num_embeds_ada_norm``: the class table's classes; diffusers adds one row, the null class, and its
    ``DiTPipeline`` guides with class 1000, so 1000 keeps a package-made DiT runnable by that pipeline at w > 1."""

    sample_size: int = 8                   # latent (or pixel) side
    in_channels: int = 4
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_embeds_ada_norm: int = 1000
    learn_sigma: bool = False              # True: 2C output channels (the variance half is not trained here)


@dataclass
class TextUNetConfig:
    """Keyword arguments of ``diffusers.UNet2DConditionModel`` (Stable Diffusion's U-Net, Rombach et al. 2022), read
    when ``model: sd`` (``out_channels`` = ``in_channels``; ``cross_attention_dim`` = the text encoder's width)."""

    sample_size: int = 8                   # latent side
    in_channels: int = 4
    block_out_channels: list = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    down_block_types: list = field(default_factory=lambda: ["CrossAttnDownBlock2D", "DownBlock2D"])
    up_block_types: list = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D"])
    attention_head_dim: int = 8
    norm_num_groups: int = 32


@dataclass
class TextEncoderConfig:
    """The text encoder of ``model: sd``: a ``CLIPTextModel`` at its seeded random initialisation, **frozen**, over a
    tokenizer whose vocabulary is the data's caption words (:mod:`cmdistill.tokenizer`). Frozen because then each
    distinct caption is embedded once into the latent cache (no text-encoder pass per step on 2 cores) and a random
    transformer still gives each caption its own states, which the U-Net's cross-attention learns to read."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_length: int = 16                   # tokens, start and end included
    seed: int = 0


@dataclass
class AutoencoderConfig:
    """Keyword arguments of ``diffusers.AutoencoderKL`` (Rombach et al. 2022), read when ``model: autoencoder``, and
    its loss: reconstruction MSE + ``kl_weight`` x the per-element KL to N(0, I)."""

    sample_size: int = 32
    in_channels: int = 1
    latent_channels: int = 4
    block_out_channels: list = field(default_factory=lambda: [32, 64, 64])  # 3 blocks: 32x32 -> 8x8 latents
    layers_per_block: int = 1
    norm_num_groups: int = 16
    kl_weight: float = 1.0e-4


@dataclass
class LatentConfig:
    """A latent teacher's autoencoder: the data are encoded once by ``vae`` (a diffusers ``AutoencoderKL`` folder, or a
    pipeline folder with a ``vae/``) into the verified latent cache in ``data.latent_cache`` (:mod:`cmdistill.latents`)."""

    vae: Optional[str] = None              # None: a pixel-space teacher (the cache: data.latent_cache)


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
class TeacherTrainConfig(LoopConfig):
    batch_size: int = 128
    max_steps: int = 6000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 2000               # PNG grid of EMA samples (DDIM, sample_steps)
    num_sample_images: int = 100
    output_dir: str = "runs/teacher"       # checkpoints, samples, logs
    ema_decay: float = 0.9995              # ema-pytorch, with its warm-up 1 - (1 + step)^-power
    ema_power: float = 0.6667
    sample_steps: int = 50
    export_dir: Optional[str] = None       # the DDPMPipeline folder; None: <output_dir>/pipeline
    label_dropout: float = 0.0             # class-conditional: labels replaced by the null class (CFG training)


@dataclass
class TeacherRecipe:
    model: str = "unet"                    # unet | dit | sd (DDPM teachers) | autoencoder (a latent teacher's VAE)
    unet: UNetConfig = field(default_factory=UNetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    text_unet: TextUNetConfig = field(default_factory=TextUNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    scheduler: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="digits", hflip=False, num_workers=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, warmup_steps=200,
                                                                   lr_schedule="cosine"))
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class RecipeRules:
    """What one layer checks of a recipe: the registries its string keys choose from (dotted key -> a registry dict,
    whose keys are the allowed values, or a tuple of them) and its checks that tie keys together. This module holds
    the rules of the core and the data (:data:`CONFIG_RULES`); ``cmdistill.training.recipe_rules`` and
    ``cmdistill.evaluation.recipe_rules`` hold theirs, and :func:`cmdistill.commands.load_recipe` applies them all."""

    registries: Callable[[], dict[str, Any]]
    check: Callable[[Any], None] = lambda recipe: None


def config_registries() -> dict[str, Any]:
    """The registries of the core and the data behind the recipe's string keys (imported on first use, so reading
    this module stays cheap)."""
    from .core.consistency import BOUNDARIES
    from .core.denoisers import ADAPTERS, PREDICTION_TYPES
    from .core.losses import DISTANCES, LPIPS_NETS, WEIGHTINGS
    from .core.parametrizations import PARAMETRIZATIONS
    from .core.schedules import (BETA_SCHEDULES, CURRICULA, GAP_CURRICULA, GRIDS, PAIR_SAMPLERS, SUBSTEP_SCHEDULES,
                                 TIMESTEP_SPACINGS)
    from .core.solvers import SOLVERS
    from .core.tensors import DTYPES
    from .data import DATASETS, PRIORS

    return {
        "teacher.kind": ("auto", *ADAPTERS), "teacher.dtype": DTYPES, "data.name": (*DATASETS, "teacher"),
        "schedule.grid": GRIDS, "schedule.curriculum": CURRICULA, "schedule.pairs": PAIR_SAMPLERS,
        "schedule.gap": GAP_CURRICULA, "solver.substep_schedule": SUBSTEP_SCHEDULES, "solver.name": SOLVERS,
        "student.boundary": ("auto", *BOUNDARIES), "student.parametrization": PARAMETRIZATIONS, "student.prior": PRIORS,
        "loss.distance": DISTANCES, "loss.lpips_net": LPIPS_NETS, "loss.weighting": WEIGHTINGS,
        "scheduler.beta_schedule": BETA_SCHEDULES, "scheduler.prediction_type": PREDICTION_TYPES,
        "scheduler.timestep_spacing": TIMESTEP_SPACINGS,
    }


def choices(rules: Sequence[RecipeRules] = ()) -> dict[str, tuple]:
    """Allowed values of every string key, read from the registries of :data:`CONFIG_RULES` and ``rules``, so a new
    solver or distance is a choice the moment it is registered."""
    return {k: tuple(v) for k, v in registries(rules).items()}


def registries(rules: Sequence[RecipeRules] = ()) -> dict[str, Any]:
    """Dotted key -> registry, from :data:`CONFIG_RULES` and ``rules``."""
    merged: dict[str, Any] = {}
    for r in (CONFIG_RULES, *rules):
        merged.update(r.registries())
    return merged


def run_length_keys(recipe, rules: Sequence[RecipeRules] = ()) -> list[str]:
    """The keys whose chosen registry entry depends on ``train.max_steps`` (entries marked with
    :func:`cmdistill.core.schedules.scaled_to_run`): changing the run's length on ``--resume`` changes their
    schedules for the steps still to come. ``recipe``: a recipe object or its nested dict (a checkpoint's)."""
    from .core.schedules import is_scaled_to_run

    out = []
    for key, registry in registries(rules).items():
        value = get_key(recipe, key)
        if isinstance(registry, dict) and value in registry and is_scaled_to_run(registry[value]):
            out.append(key)
    return out


def get_key(recipe, dotted: str):
    """``recipe``'s value at ``dotted`` (a recipe object or its nested dict), ``None`` where it has none."""
    obj = recipe
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# keys that exist in only one recipe are checked where they exist
POSITIVE = {"schedule.num_scales", "schedule.num_scales_start", "schedule.skip", "solver.substeps",
            "schedule.gap_start",
            "train.batch_size", "train.grad_accum", "train.max_steps", "train.checkpoint_every",
            "train.keep_checkpoints", "train.log_every", "train.sample_every", "train.num_sample_images", "optim.lr",
            "eval.num_samples", "eval.batch_size", "eval.seeds", "train.sample_steps", "unet.sample_size", "unet.in_channels",
            "unet.layers_per_block", "unet.attention_head_dim", "unet.norm_num_groups",
            "scheduler.num_train_timesteps", "scheduler.beta_start", "scheduler.beta_end"}
UNIT_INTERVAL = {"student.target_decay", "student.ema_decay", "train.ema_decay", "unet.dropout",
                 "train.label_dropout"}
# > 0 when set (None allowed where the annotation is Optional)
POSITIVE_OR_NONE = {"bank.num_scales", "loss.regression_batch", "unet.num_class_embeds", "train.cpu_threads", "data.resolution", "loss.lpips_resize", "loss.huber_c", "optim.grad_clip", "optim.eps",
                    "schedule.rho", "schedule.p_std", "student.sigma_data", "student.boundary_scale",
                    "student.sigma_max", "student.lora.alpha"}
NON_NEGATIVE = {"student.lora.rank", "bank.count", "bank.seed", "loss.regression_weight", "guidance.scale", "guidance.null_class", "guidance.w_min", "guidance.w_max", "train.seed", "data.num_workers", "optim.weight_decay", "optim.warmup_steps",
                "student.ema_update_after_step", "student.ema_power", "train.ema_power"}


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_ok(value: Any, tp) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is not type(None):
                ok, v = _type_ok(value, a)
                if ok:
                    return True, v
        return False, value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return True, float(value)  # PyYAML (YAML 1.1) reads "6e-4" as a string; accept it as the number
        return False, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        return isinstance(value, list), value
    return True, value


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str, base=None):
    """``cls`` from a mapping, each missing key taken from ``base`` (default: ``cls()``): a section a recipe
    gives in part keeps its recipe's own defaults for the rest (``TeacherRecipe.optim`` is AdamW, not RAdam)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(data).__name__}")
    base = cls() if base is None else base
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", getattr(base, key))
            continue
        ok, v = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"'{prefix}{key}' must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = v
    return dataclasses.replace(base, **kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def validate(recipe, rules: Sequence[RecipeRules] = ()):
    """Choices, finite numbers, ranges, then the checks that tie keys together (this module's, then each of
    ``rules``'); returns the recipe."""
    present = dict(_flat_values(recipe))
    for key, allowed in choices(rules).items():
        if key in present and present[key] not in allowed:
            v, names = present[key], [a for a in allowed if a is not None]
            close = difflib.get_close_matches(str(v), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            null = " (or null)" if None in allowed else ""
            raise ConfigError(f"'{key}' must be one of {', '.join(names)}{null}; got {v!r}{hint}")
    for key, v in present.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"'{key}' must be a finite number, got {v!r}")
    for keys, ok, what in ((POSITIVE, lambda v: v > 0, "positive"),
                           (POSITIVE_OR_NONE, lambda v: v is None or v > 0, "positive (or null)"),
                           (NON_NEGATIVE, lambda v: v is None or v >= 0, ">= 0"),
                           (UNIT_INTERVAL, lambda v: 0.0 <= v < 1.0, "in [0, 1)")):
        for key in sorted(keys & present.keys()):
            if not ok(present[key]):
                raise ConfigError(f"'{key}' must be {what}, got {present[key]!r}")
    for r in (CONFIG_RULES, *rules):
        r.check(recipe)
    return recipe


def check_config(recipe) -> None:
    """The cross-key checks of the sections this module owns (optimiser betas, batch split, the teacher recipe's
    U-Net, the distillation recipe's schedule, student and guidance)."""
    betas = recipe.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"'optim.betas' must be two numbers in [0, 1), got {betas!r}")
    if recipe.train.batch_size % recipe.train.grad_accum:
        raise ConfigError("'train.batch_size' must be divisible by 'train.grad_accum'")
    if isinstance(recipe, TeacherRecipe):
        _check_unet(recipe.unet)
        if recipe.data.name == "teacher":
            raise ConfigError("'data.name: teacher' (a teacher's own samples) is for distillation; a teacher trains "
                              "on real images")
    else:
        _check_distill(recipe)


def _check_distill(recipe: Recipe) -> None:
    from .core.schedules import CURRICULA, GRIDS

    sch = recipe.schedule
    if sch.num_scales < 2 or sch.num_scales_start < 2:
        raise ConfigError("'schedule.num_scales' and 'schedule.num_scales_start' must be at least 2 (grid points)")
    try:  # a curriculum that reads its start refuses one above its end (it would stay there the whole run)
        CURRICULA[sch.curriculum](0, recipe.train.max_steps, sch.num_scales_start, sch.num_scales)
    except ValueError:
        raise ConfigError(f"'schedule.num_scales_start' ({sch.num_scales_start}) is above 'schedule.num_scales' "
                          f"({sch.num_scales}): the {sch.curriculum} curriculum would run at {sch.num_scales_start} "
                          "points for the whole run; lower num_scales_start") from None
    if recipe.student.sigma_max is not None and not GRIDS[sch.grid].capped_by_student:
        allowed = " or ".join(f"'schedule.grid: {k}'" for k, g in GRIDS.items() if g.capped_by_student)
        raise ConfigError(f"'student.sigma_max' caps the grid, which 'schedule.grid: {sch.grid}' does not allow; "
                          f"it needs {allowed}")
    gc = recipe.guidance
    if (gc.w_min is None) != (gc.w_max is None):
        raise ConfigError("'guidance.w_min' and 'guidance.w_max' go together: set both (a range of w) or neither")
    if gc.w_min is not None and not gc.w_min < gc.w_max:
        raise ConfigError(f"'guidance.w_min' ({gc.w_min:g}) must be below 'guidance.w_max' ({gc.w_max:g})")
    if gc.w_min is not None and not gc.w_min <= gc.scale <= gc.w_max:
        raise ConfigError(f"'guidance.scale' ({gc.scale:g}), the student's default w, must lie in "
                          f"[w_min, w_max] = [{gc.w_min:g}, {gc.w_max:g}]")
    lc = recipe.student.lora
    if lc.rank and gc.w_min is not None:
        raise ConfigError("a LoRA student (student.lora.rank > 0) has no guidance-scale input: the base network its "
                          "adapters load onto has none; distil one w (guidance.scale) and leave w_min/w_max unset")
    if lc.rank and (not lc.target_modules or not all(isinstance(m, str) and m for m in lc.target_modules)):
        raise ConfigError(f"'student.lora.target_modules' must be a non-empty list of layer names, got "
                          f"{lc.target_modules!r}")


CONFIG_RULES = RecipeRules(config_registries, check_config)


def _check_unet(u: UNetConfig) -> None:
    if not len(u.block_out_channels) == len(u.down_block_types) == len(u.up_block_types):
        raise ConfigError("'unet.block_out_channels', 'unet.down_block_types' and 'unet.up_block_types' "
                          "must have the same length")
    if any(c % u.norm_num_groups for c in u.block_out_channels):
        raise ConfigError(f"every 'unet.block_out_channels' entry must be divisible by 'unet.norm_num_groups' "
                          f"({u.norm_num_groups})")


def _flat_values(obj, prefix: str = ""):
    """``(dotted key, value)`` for every leaf of the recipe."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _flat_values(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` (value parsed as YAML) into the nested mapping."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set '{item.split('=')[0]}': '{p}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_recipe(path: str | Path | None, overrides: list[str] = (), cls: type = Recipe,
                rules: Sequence[RecipeRules] = ()):
    """Read a recipe of type ``cls`` (:class:`Recipe` or :class:`TeacherRecipe`) with ``yaml.safe_load``, apply
    ``--set`` overrides, type-check and validate it against this module's rules and ``rules`` (the other layers').
    Every problem is one :class:`ConfigError` line. :func:`cmdistill.commands.load_recipe` passes every layer's
    rules: that is the loader to use."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {str(path)!r} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read recipe file {str(path)!r}: {type(e).__name__}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    data = apply_overrides(data, list(overrides))
    recipe = _build(cls, data, "")
    resolve_input_paths(recipe, Path(path).resolve().parent if path is not None else None)
    return validate(recipe, rules)


# keys naming inputs (read, never written); outputs (train.output_dir, train.export_dir) stay relative to the
# working directory, where the command runs
INPUT_PATHS = ("teacher.path", "data.root", "latent.vae")


def resolve_input_paths(recipe, recipe_dir: Path | None) -> None:
    """Make each relative input path of the recipe absolute: relative to the recipe file's folder when it exists
    there, else to the working directory when it exists there; left as written otherwise (a hub id such as
    ``google/ddpm-cifar10-32``, or a download cache still to be created)."""
    for key in INPUT_PATHS:
        section, name = key.split(".")
        if not hasattr(recipe, section) or not hasattr(getattr(recipe, section), name):
            continue
        value = getattr(getattr(recipe, section), name)
        if not value or value.startswith("~") or Path(value).is_absolute():
            continue
        for base in ([recipe_dir] if recipe_dir is not None else []) + [Path.cwd()]:
            if (base / value).exists():
                setattr(getattr(recipe, section), name, str((base / value).resolve()))
                break


def recipe_to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
