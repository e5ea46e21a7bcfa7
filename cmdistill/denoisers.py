"""Teacher adapters: a diffusers network + its noise schedule as an EDM denoiser ``D(x, sigma) -> x0``.

The denoiser contract (k-diffusion's idea, EDM notation): any callable ``D(x, sigma, **cond)`` with
``x_sigma = x0 + sigma * z``, ``sigma`` of shape ``[B]``, returning an estimate of ``x0``, and exposing
``sigma_min``, ``sigma_max``, ``sigma_data``. Preconditioning runs in fp32; only the network may run
under autocast, and its output is cast back to fp32 before any arithmetic.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .schedules import ddpm_betas, vp_sigmas_from_betas
from .utils import append_dims, as_sigma, promote, sync_checks_enabled


class TeacherLoadError(RuntimeError):
    """A teacher folder or hub id could not be loaded (missing, malformed, or offline)."""


class Denoiser(nn.Module):
    """Base class: holds the network and the trained sigma range; subclasses implement ``forward``."""

    kind: str = ""
    sigma_data: float = 0.5

    def __init__(self, net: nn.Module, strict_range: bool = True):
        super().__init__()
        self.net = net
        self.strict_range = strict_range

    # the range the teacher was trained on; never evaluated outside it
    sigma_min: float
    sigma_max: float

    def prior_std(self, sigma: float) -> float:
        """Std of the noise a native sampler of this teacher starts from at ``sigma``."""
        return float(sigma)

    def check_range(self, sigma: torch.Tensor) -> None:
        """Refuse sigmas outside the trained range (a host sync on GPU; skipped inside
        :func:`cmdistill.utils.skip_sync_checks`, which the training step uses)."""
        if not self.strict_range or not sync_checks_enabled():
            return
        lo, hi = self.sigma_min * (1 - 1e-3), self.sigma_max * (1 + 1e-3)
        if bool(((sigma < lo) | (sigma > hi)).any()):
            raise ValueError(
                f"sigma outside the teacher's trained range [{self.sigma_min:.4g}, {self.sigma_max:.4g}]: "
                f"got min {float(sigma.min()):.4g}, max {float(sigma.max()):.4g}"
            )

    def run_net(self, x_in: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Call the network with its own weight dtype (it may run under autocast); result back in ``x_in``'s."""
        p = next(self.net.parameters(), None)
        net_in = x_in.to(p.dtype) if p is not None and p.dtype != x_in.dtype else x_in
        out = self.net(net_in, t.to(net_in.dtype) if p is not None else t, **cond)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        return out.to(x_in.dtype)

    def adapter_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this adapter around a network (see :func:`build_denoiser`)."""
        raise NotImplementedError


class DDPMDenoiser(Denoiser):
    """Discrete VP (DDPM) teacher in EDM space (EDM Table 1, VP column; DESIGN §1).

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the network sees ``x / sqrt(1 + sigma^2)`` and a fractional
    timestep found by interpolating ``log sigma`` in the table; outputs ``epsilon``, ``v_prediction`` or
    ``sample`` are mapped to ``x0``.
    """

    kind = "ddpm"

    def __init__(self, net: nn.Module, scheduler_config: dict[str, Any], strict_range: bool = True):
        super().__init__(net, strict_range)
        cfg = dict(scheduler_config)
        if "num_train_timesteps" not in cfg and "timesteps" in cfg:  # pre-0.3 diffusers configs
            cfg["num_train_timesteps"] = cfg["timesteps"]
        betas = ddpm_betas(
            cfg.get("num_train_timesteps", 1000),
            cfg.get("beta_start", 1e-4),
            cfg.get("beta_end", 0.02),
            cfg.get("beta_schedule", "linear"),
            cfg.get("trained_betas"),
        )
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.scheduler_config = {
            k: cfg[k]
            for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "timestep_spacing", "steps_offset", "_class_name")
            if k in cfg
        }
        table = vp_sigmas_from_betas(betas)
        self.register_buffer("sigma_table", table, persistent=False)  # float64, ascending in t
        self.register_buffer("log_sigma_table", table.log(), persistent=False)
        self.sigma_min = float(table[0])
        self.sigma_max = float(table[-1])

    def prior_std(self, sigma: float) -> float:
        """A DDPM sampler starts from unit-variance VP noise, i.e. ``sqrt(1 + sigma^2)`` in EDM space."""
        return math.sqrt(1.0 + float(sigma) ** 2)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by linear interpolation of ``log sigma`` in the table (k-diffusion's DiscreteSchedule)."""
        log_s = sigma.double().log()
        tab = self.log_sigma_table.to(sigma.device)
        hi = torch.searchsorted(tab, log_s).clamp(1, len(tab) - 1)
        lo = hi - 1
        w = ((log_s - tab[lo]) / (tab[hi] - tab[lo])).clamp(0, 1)
        return (lo.double() + w).to(sigma.dtype)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        self.check_range(sigma)
        s = append_dims(sigma, x.ndim)
        c_in = 1.0 / (s**2 + 1.0).sqrt()
        out = self.run_net(x * c_in, self.sigma_to_t(sigma), **cond)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            # x_vp = a x0 + b eps, v = a eps - b x0, a = c_in, b = sigma c_in  =>  x0 = a x_vp - b v
            return c_in**2 * x - s * c_in * out
        return out

    def adapter_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "scheduler": dict(self.scheduler_config)}


class EDMDenoiser(Denoiser):
    """EDM-preconditioned teacher (Karras et al. 2022, Table 1 "Ours"; diffusers' EDM schedulers).

    ``D = c_skip x + c_out F(c_in x, c_noise)``, ``c_noise = ln(sigma) / 4``; ``v_prediction`` flips ``c_out``.
    """

    kind = "edm"

    def __init__(self, net: nn.Module, scheduler_config: dict[str, Any], strict_range: bool = True):
        super().__init__(net, strict_range)
        cfg = dict(scheduler_config)
        self.sigma_min = float(cfg.get("sigma_min", 0.002))
        self.sigma_max = float(cfg.get("sigma_max", 80.0))
        self.sigma_data = float(cfg.get("sigma_data", 0.5))
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} for an EDM teacher")
        self.scheduler_config = {
            k: cfg[k] for k in ("sigma_min", "sigma_max", "sigma_data", "prediction_type", "rho", "_class_name")
            if k in cfg
        }

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        self.check_range(sigma)
        s, sd = append_dims(sigma, x.ndim), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        out = self.run_net(x * c_in, 0.25 * sigma.log(), **cond)
        return c_skip * x + c_out * out

    def adapter_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "scheduler": dict(self.scheduler_config)}


ADAPTERS: dict[str, type[Denoiser]] = {"ddpm": DDPMDenoiser, "edm": EDMDenoiser}


def infer_kind(scheduler_config: dict[str, Any]) -> str:
    """``edm`` for diffusers' EDM* schedulers, else ``ddpm`` (DDPM, DDIM, PNDM, … share the beta table)."""
    return "edm" if str(scheduler_config.get("_class_name", "")).startswith("EDM") else "ddpm"


def build_denoiser(net: nn.Module, scheduler_config: dict[str, Any], kind: str = "auto", **kw) -> Denoiser:
    """Wrap ``net`` with the adapter named ``kind`` (``auto`` reads the scheduler's class name)."""
    kind = infer_kind(scheduler_config) if kind == "auto" else kind
    if kind not in ADAPTERS:
        raise ValueError(f"unknown teacher kind {kind!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[kind](net, scheduler_config, **kw)


# --------------------------------------------------------------------------- loading


def _resolve_folder(path_or_id: str) -> Path:
    """A local folder as is; a hub id through ``huggingface_hub.snapshot_download`` (json + weights only)."""
    p = Path(os.path.expanduser(path_or_id))
    if p.exists():
        if not p.is_dir():
            raise TeacherLoadError(f"teacher {path_or_id!r} is a file, expected a folder or a hub id")
        return p
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise TeacherLoadError(f"teacher folder {path_or_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:  # offline, unknown repo, network error: one clear line
        reason = type(e).__name__
        raise TeacherLoadError(
            f"cannot download teacher {path_or_id!r} from the Hugging Face Hub ({reason}); "
            "are you offline? Download it once with network access or pass a local folder"
        ) from e


def find_teacher_layout(folder: Path) -> tuple[Path, Path]:
    """Return ``(model_dir, scheduler_config_file)`` for the DDPMPipeline layout (model_index.json, unet/,
    scheduler/) or the flat layout of ``google/ddpm-cifar10-32`` (config.json + scheduler_config.json)."""
    if (folder / "model_index.json").exists() and (folder / "unet" / "config.json").exists():
        model_dir, sched = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    else:
        model_dir, sched = folder, folder / "scheduler_config.json"
    if not (model_dir / "config.json").exists():
        raise TeacherLoadError(f"no model config.json in {model_dir} (expected a diffusers model folder)")
    if not sched.exists():
        raise TeacherLoadError(f"no scheduler_config.json for the teacher in {folder}")
    return model_dir, sched


def load_teacher(path_or_id: str, kind: str = "auto", strict_range: bool = True) -> Denoiser:
    """Load a diffusers teacher (hub id or local folder, either layout) as an EDM denoiser."""
    import diffusers

    folder = _resolve_folder(path_or_id)
    model_dir, sched_file = find_teacher_layout(folder)
    try:
        model_cfg = json.loads((model_dir / "config.json").read_text())
        sched_cfg = json.loads(sched_file.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise TeacherLoadError(f"malformed teacher config in {folder}: {e}") from e
    cls_name = model_cfg.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise TeacherLoadError(f"teacher model class {cls_name!r} is not a diffusers model")
    try:
        net = cls.from_pretrained(model_dir)
    except Exception as e:
        raise TeacherLoadError(f"cannot load teacher weights from {model_dir}: {e}") from e
    net.eval().requires_grad_(False)
    return build_denoiser(net, sched_cfg, kind, strict_range=strict_range)
