"""Typed recipe: dataclasses, strict YAML (unknown keys and wrong types are errors naming the key),
``--set a.b=value`` overrides. Choices are validated against the registries that implement them."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    name: str = "cifar10"                  # cifar10 | imagefolder | digits
    root: str = "~/.cache/cmdistill/data"  # download cache (cifar10) or image folder (imagefolder)
    hflip: bool = True
    num_workers: int = 2
    resolution: Optional[int] = None       # None: the teacher's sample_size


@dataclass
class ScheduleConfig:
    grid: str = "karras"                   # karras | teacher
    num_scales: int = 18                   # N (grid points); with a curriculum, the final N
    num_scales_start: int = 10             # s0 of an N curriculum
    curriculum: str = "constant"           # constant | ict_exponential
    rho: float = 7.0
    skip: int = 20                         # teacher grid: step between timesteps (LCM's k)
    pairs: str = "uniform"                 # uniform | lognormal
    p_mean: float = -1.1                   # lognormal pair sampling (iCT)
    p_std: float = 2.0


@dataclass
class SolverConfig:
    name: str = "heun"                     # heun | euler | ddim
    substeps: int = 1                      # teacher sub-steps per pair


@dataclass
class StudentConfig:
    boundary: str = "lcm"                  # lcm | cm (see README: lcm starts the student as the teacher's D)
    boundary_scale: float = 10.0           # lcm only
    sigma_data: float = 0.5
    target_decay: float = 0.0              # mu; 0 = stop-gradient copy
    ema_decay: float = 0.9999              # evaluation EMA (ema-pytorch)
    ema_power: float = 0.6667              # ema-pytorch warm-up exponent
    ema_update_after_step: int = 0
    sigma_max: Optional[float] = None      # top of the student's range (Karras grid, 1-step start); null: teacher's
    prior: str = "zero"                    # 1-step start: zero (CM, sigma_max z) | data_mean (mu + sigma_max z)


@dataclass
class LossConfig:
    distance: str = "lpips"                # lpips | l2 | l1 | pseudo_huber
    lpips_net: str = "vgg"                 # vgg | alex
    lpips_resize: Optional[int] = 224      # upsample smaller images to this size (CM); null: never
    lpips_pretrained: bool = True          # ImageNet backbone weights (torchvision download); false: random
    huber_c: Optional[float] = None        # None: 0.00054 * sqrt(dim) (iCT)
    weighting: str = "uniform"             # uniform | inv_delta


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
class TrainConfig:
    seed: int = 0
    batch_size: int = 512                  # global batch (all processes, one optimiser step)
    grad_accum: int = 1
    max_steps: int = 800000
    mixed_precision: str = "no"            # no | fp16 | bf16
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 5000               # PNG grid of 1-step samples
    num_sample_images: int = 64
    output_dir: str = "runs/cd"
    on_nonfinite: str = "stop"            # non-finite loss/gradient: stop (name the step) | skip the step
    channels_last: bool = False            # U-Nets on NHWC activations (GPU tensor cores); weights stay NCHW
    compile: bool = False                  # torch.compile the teacher, student and target U-Nets
    gradient_checkpointing: bool = False   # recompute student activations in backward: less memory, slower


@dataclass
class EvalConfig:
    at_end: bool = False                   # run `cmdistill evaluate` when distillation ends
    num_samples: int = 1000
    feature_net: str = "inception"         # inception | digits
    batch_size: int = 250
    search_sigmas: bool = False            # first pick the 2-4-step sigmas by FID (`evaluate --search-sigmas`)


@dataclass
class Recipe:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# allowed values of string choices, checked at load time
CHOICES = {
    "teacher.kind": ("auto", "ddpm", "edm"),
    "teacher.dtype": ("fp32", "fp16", "bf16"),
    "data.name": ("cifar10", "imagefolder", "digits"),
    "schedule.grid": ("karras", "teacher"),
    "schedule.curriculum": ("constant", "ict_exponential"),
    "schedule.pairs": ("uniform", "lognormal"),
    "solver.name": ("heun", "euler", "ddim"),
    "student.boundary": ("cm", "lcm"),
    "student.prior": ("zero", "data_mean"),
    "loss.distance": ("lpips", "l2", "l1", "pseudo_huber"),
    "loss.lpips_net": ("vgg", "alex"),
    "loss.weighting": ("uniform", "inv_delta"),
    "optim.name": ("radam", "adam", "adamw"),
    "optim.lr_schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.on_nonfinite": ("stop", "skip"),
    "eval.feature_net": ("inception", "digits"),
}
POSITIVE = {"schedule.num_scales", "schedule.num_scales_start", "schedule.skip", "solver.substeps",
            "train.batch_size", "train.grad_accum", "train.max_steps", "train.checkpoint_every",
            "train.keep_checkpoints", "train.log_every", "train.sample_every", "optim.lr", "eval.num_samples",
            "eval.batch_size"}
UNIT_INTERVAL = {"student.target_decay", "student.ema_decay"}
# > 0 when set (None allowed where the annotation is Optional)
POSITIVE_OR_NONE = {"data.resolution", "loss.lpips_resize", "loss.huber_c", "optim.grad_clip", "optim.eps",
                    "schedule.rho", "schedule.p_std", "student.sigma_data", "student.boundary_scale",
                    "student.sigma_max"}
NON_NEGATIVE = {"train.seed", "data.num_workers", "optim.weight_decay", "optim.warmup_steps",
                "student.ema_update_after_step", "student.ema_power"}


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


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(data).__name__}")
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
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
            continue
        ok, v = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"'{prefix}{key}' must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = v
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def validate(recipe: Recipe) -> Recipe:
    for key, allowed in CHOICES.items():
        v = get_key(recipe, key)
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'{key}' must be one of {', '.join(allowed)}; got {v!r}{hint}")
    for key, v in _flat_values(recipe):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"'{key}' must be a finite number, got {v!r}")
    for key in POSITIVE:
        if not get_key(recipe, key) > 0:
            raise ConfigError(f"'{key}' must be positive, got {get_key(recipe, key)!r}")
    for key in POSITIVE_OR_NONE:
        v = get_key(recipe, key)
        if v is not None and not v > 0:
            raise ConfigError(f"'{key}' must be positive (or null), got {v!r}")
    for key in NON_NEGATIVE:
        if not get_key(recipe, key) >= 0:
            raise ConfigError(f"'{key}' must be >= 0, got {get_key(recipe, key)!r}")
    for key in UNIT_INTERVAL:
        v = get_key(recipe, key)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"'{key}' must be in [0, 1), got {v!r}")
    betas = recipe.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"'optim.betas' must be two numbers in [0, 1), got {betas!r}")
    if recipe.schedule.num_scales < 2:
        raise ConfigError("'schedule.num_scales' must be at least 2")
    if recipe.student.sigma_max is not None and recipe.schedule.grid != "karras":
        raise ConfigError("'student.sigma_max' caps the Karras grid; it needs 'schedule.grid: karras'")
    if recipe.train.batch_size % recipe.train.grad_accum:
        raise ConfigError("'train.batch_size' must be divisible by 'train.grad_accum'")
    return recipe


def _flat_values(obj, prefix: str = ""):
    """``(dotted key, value)`` for every leaf of the recipe."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _flat_values(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


def get_key(recipe: Recipe, dotted: str):
    obj = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe with ``yaml.safe_load``, apply overrides, type-check and validate."""
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
    return validate(_build(Recipe, data, ""))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
