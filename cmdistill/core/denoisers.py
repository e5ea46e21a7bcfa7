"""Teacher adapters: a diffusers network + its noise schedule as an EDM denoiser ``D(x, sigma) -> x0``.

The denoiser contract (k-diffusion's idea, EDM notation): any callable ``D(x, sigma, **cond)`` with
``x_sigma = x0 + sigma * z``, ``sigma`` of shape ``[B]``, returning an estimate of ``x0``, and exposing
``sigma_min``, ``sigma_max``, ``sigma_data``. Preconditioning runs in fp32; only the network may run
under autocast, and its output is cast back to fp32 before any arithmetic.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .lora import adapter_active, has_adapters
from .networks import UnsupportedNetwork, call_network, family_of
from .schedules import ddpm_betas, vp_sigmas_from_betas
from .tensors import append_dims, as_sigma, compute_dtype, promote, sync_checks_enabled


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' prediction_type values, all mapped to x0


class UnsupportedTeacher(ValueError):
    """A teacher whose noise schedule this package cannot represent (named in one line)."""


class Denoiser(nn.Module):
    """Base class: holds the network and the trained sigma range; subclasses implement ``forward``."""

    kind: str = ""
    scheduler_classes: frozenset[str] = frozenset()  # diffusers scheduler classes this adapter reads (infer_kind)
    sigma_data: float = 0.5
    # the LoRA adapter of the network this denoiser computes with (None: the base network, adapters off; a LoRA
    # student's teacher, student, target and EMA share one network, :mod:`.lora`)
    adapter: str | None = None

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
        """Call the network (through its family, :func:`~cmdistill.core.networks.call_network`) on its compute dtype (it may run under autocast); result back in ``x_in``'s.

        The compute dtype (:func:`~cmdistill.core.tensors.compute_dtype`) is not the storage dtype under diffusers'
        layerwise casting (weights stored in e.g. fp8, upcast per layer).
        The (fractional) timestep stays fp32 whatever the weights are: in bf16 a ``t`` in [512, 1024) would round
        to a multiple of 4, evaluating the network at a noise level that no longer matches ``sigma``. diffusers'
        time embeddings take fp32 timesteps and cast the embedding, not the timestep, to the weight dtype."""
        dtype = compute_dtype(self.net)
        net_in = x_in.to(dtype) if dtype is not None and dtype != x_in.dtype else x_in
        if has_adapters(self.net):  # a LoRA student's shared network: this denoiser's adapter, or none
            with adapter_active(self.net, self.adapter):
                return call_network(self.net, net_in, t.float(), cond).to(x_in.dtype)
        return call_network(self.net, net_in, t.float(), cond).to(x_in.dtype)

    def net_output(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """The network's raw output at ``(x, sigma)``, with this adapter's input scaling and time conditioning (what
        a parametrisation other than ``D`` reads, :mod:`cmdistill.core.parametrizations`)."""
        x = promote(x)
        sigma = as_sigma(sigma, x)
        self.check_range(sigma)
        return self.run_net(x * append_dims(self.c_in(sigma), x.ndim), self.c_noise(sigma), **cond)

    def adapter_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this adapter around a network (see :func:`build_denoiser`)."""
        raise NotImplementedError


class DDPMDenoiser(Denoiser):
    """Discrete VP (DDPM) teacher in EDM space (Karras et al. 2022, Table 1, VP column; k-diffusion's
    ``DiscreteEpsDDPMDenoiser``).

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the network sees ``x / sqrt(1 + sigma^2)`` and a fractional
    timestep found by interpolating ``log sigma`` in the table; outputs ``epsilon``, ``v_prediction`` or
    ``sample`` are mapped to ``x0``. A zero-terminal-SNR schedule (``rescale_betas_zero_snr``, Lin et al. 2024)
    has ``sigma = inf`` at ``t = T-1``; its trained range is the finite part of the table (``t <= T-2``).
    """

    kind = "ddpm"
    # diffusers scheduler classes whose config fully describes this schedule: the discrete-beta (VP) family all build
    # DDPMScheduler's beta table from the same keys (GaussianDDPMScheduler: pre-0.3 diffusers' DDPMScheduler, the
    # root config of google/ddpm-cifar10-32). Anything else (CMStochasticIterativeScheduler, ScoreSdeVeScheduler,
    # flow matching, ...) would be read as default betas and silently give a wrong sigma table: refused.
    scheduler_classes = frozenset({
        "DDPMScheduler", "GaussianDDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
        "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
        "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler", "SASolverScheduler",
    })
    unit_std = 1.0  # VP: x_vp = x / sqrt(1 + sigma^2) has unit variance at every sigma (for unit-variance data)

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
            bool(cfg.get("rescale_betas_zero_snr", False)),
        )
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.scheduler_config = {
            k: cfg[k]
            for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "_class_name")
            if k in cfg
        }
        table = vp_sigmas_from_betas(betas)
        table = table[torch.isfinite(table)]  # zero terminal SNR: t = T-1 is pure noise, outside EDM space
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

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (sigma**2 + 1.0).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_t(sigma)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        out = self.net_output(x, sigma, **cond)
        s = append_dims(sigma, x.ndim)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            # x_vp = a x0 + b eps, v = a eps - b x0, a = c_in, b = sigma c_in  =>  x0 = a x_vp - b v
            c_in = append_dims(self.c_in(sigma), x.ndim)
            return c_in**2 * x - s * c_in * out
        return out

    def adapter_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "scheduler": dict(self.scheduler_config)}


class EDMDenoiser(Denoiser):
    """EDM-preconditioned teacher (Karras et al. 2022, Table 1 "Ours"; diffusers' EDM schedulers).

    ``D = c_skip x + c_out F(c_in x, c_noise)``, ``c_noise = ln(sigma) / 4``; ``v_prediction`` flips ``c_out``.
    """

    kind = "edm"
    scheduler_classes = frozenset({"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"})  # sigma_min/max/data

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

    @property
    def unit_std(self) -> float:
        return self.sigma_data

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        out = self.net_output(x, sigma, **cond)
        s, sd = append_dims(sigma, x.ndim), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * x + c_out * out

    def adapter_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "scheduler": dict(self.scheduler_config)}


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of flow-matching schedulers (Esser et al. 2024, SD3, eq. 23): ``s t / (1 + (s - 1) t)``."""
    return shift * t / (1 + (shift - 1) * t)


class FlowMatchDenoiser(Denoiser):
    """Rectified-flow teacher (Liu et al. 2022, "Flow straight and fast"; Esser et al. 2024, SD3; diffusers'
    ``FlowMatchEulerDiscreteScheduler``) in EDM space.

    The forward process is ``x_t = (1 - t) x0 + t z`` and the network predicts the velocity ``v = z - x0`` at timestep
    ``1000 t``. Dividing by ``1 - t`` gives EDM's ``x = x0 + sigma z`` with ``sigma = t / (1 - t)``, so the network
    sees ``x_t = x / (1 + sigma)`` and ``D = x_t - t v``. ``t = 1`` (pure noise) is ``sigma = inf``: the trained
    range is the scheduler's training timesteps below it, shifted by ``shift``. Euler steps in EDM space are the
    flow's Euler steps (both are exact for a constant ``D``), so the DDIM solver reproduces diffusers' FlowMatchEuler
    loop from the same start."""

    kind = "flow"
    scheduler_classes = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})

    def __init__(self, net: nn.Module, scheduler_config: dict[str, Any], strict_range: bool = True):
        super().__init__(net, strict_range)
        cfg = dict(scheduler_config)
        if cfg.get("invert_sigmas"):
            raise UnsupportedTeacher("FlowMatchEulerDiscreteScheduler with invert_sigmas (Mochi) runs time backwards; "
                                     "cmdistill reads x_t = (1 - t) x0 + t z")
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.shift = 1.0 if cfg.get("use_dynamic_shifting") else float(cfg.get("shift", 1.0))
        n = self.num_train_timesteps
        t_lo, t_hi = (float(flow_shift(torch.tensor(v, dtype=torch.float64), self.shift)) for v in (1 / n, (n - 1) / n))
        self.sigma_min, self.sigma_max = t_lo / (1 - t_lo), t_hi / (1 - t_hi)
        self.t_max = t_hi
        self.scheduler_config = {k: cfg[k] for k in ("num_train_timesteps", "shift", "use_dynamic_shifting",
                                                     "_class_name") if k in cfg}

    def prior_std(self, sigma: float) -> float:
        """A flow sampler starts from unit noise ``x_t = z``, i.e. ``(1 + sigma) z`` in EDM space."""
        return 1.0 + float(sigma)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + sigma)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.num_train_timesteps * sigma / (1.0 + sigma)

    def native_sigmas(self, steps: int) -> torch.Tensor:
        """diffusers' FlowMatchEuler timesteps for ``steps`` steps (linear in the shifted t, shifted again, as its
        ``set_timesteps`` does) as EDM sigmas, the first (``t = 1``, infinite) at the top of the trained range."""
        n = self.num_train_timesteps
        top = float(flow_shift(torch.tensor(1.0, dtype=torch.float64), self.shift))
        low = float(flow_shift(torch.tensor(1.0 / n, dtype=torch.float64), self.shift))
        t = flow_shift(torch.linspace(top, low, steps, dtype=torch.float64), self.shift).clamp(max=self.t_max)
        return t / (1 - t)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        v = self.net_output(x, sigma, **cond)
        s = append_dims(sigma, x.ndim)
        return x / (1 + s) - s / (1 + s) * v

    def adapter_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "scheduler": dict(self.scheduler_config)}


ADAPTERS: dict[str, type[Denoiser]] = {"ddpm": DDPMDenoiser, "edm": EDMDenoiser, "flow": FlowMatchDenoiser}


def unsupported_reason(scheduler_config: dict[str, Any], net: nn.Module | None = None) -> str | None:
    """Why a teacher of a known scheduler family would still be misread (``None`` when it is read correctly):
    continuous timesteps where the adapter feeds discrete ones, or a network of a family the seam cannot call
    (:func:`~cmdistill.core.networks.family_of`; a learned-variance output is read, cut to its mean half)."""
    name = scheduler_config.get("_class_name", "the scheduler")
    if scheduler_config.get("timestep_type", "discrete") != "discrete":
        return (f"{name} with timestep_type={scheduler_config['timestep_type']!r} feeds the network "
                "0.25 ln(sigma), not a DDPM timestep; cmdistill reads discrete timesteps only")
    if net is not None:
        try:
            family_of(net)
        except UnsupportedNetwork as e:
            return str(e)
    return None


def infer_kind(scheduler_config: dict[str, Any]) -> str:
    """The adapter for a scheduler config, from its ``_class_name`` (each adapter's ``scheduler_classes``; a config
    without a class name is a DDPM one, as in pre-0.3 diffusers); raises :class:`UnsupportedTeacher` for other
    classes and for configs an adapter would misread (:func:`unsupported_reason`)."""
    name = scheduler_config.get("_class_name")
    kinds = ["ddpm"] if name is None else [k for k, a in ADAPTERS.items() if name in a.scheduler_classes]
    if not kinds:
        raise UnsupportedTeacher(
            f"teacher scheduler {name} is not supported: cmdistill reads "
            + ", ".join(f"{k} ({', '.join(sorted(a.scheduler_classes)[:3])}, ...)" for k, a in ADAPTERS.items())
            + f" schedulers; a {name} config does not describe a noise schedule it can represent")
    reason = unsupported_reason(scheduler_config)
    if reason:
        raise UnsupportedTeacher(reason)
    return kinds[0]


def build_denoiser(net: nn.Module, scheduler_config: dict[str, Any], kind: str = "auto", **kw) -> Denoiser:
    """Wrap ``net`` with the adapter named ``kind`` (``auto`` reads the scheduler's class name). An explicit
    ``kind`` must agree with the scheduler's family: a ``ddpm`` adapter on a non-beta scheduler would read
    default betas."""
    inferred = infer_kind(scheduler_config)
    kind = inferred if kind == "auto" else kind
    if kind not in ADAPTERS:
        raise ValueError(f"unknown teacher kind {kind!r}; choose one of {sorted(ADAPTERS)}")
    if "_class_name" in scheduler_config and kind != inferred:
        raise UnsupportedTeacher(f"teacher.kind is {kind!r} but the scheduler {scheduler_config['_class_name']} "
                                 f"is a {inferred!r} schedule; use teacher.kind: auto")
    reason = unsupported_reason(scheduler_config, net)
    if reason:
        raise UnsupportedTeacher(reason)
    return ADAPTERS[kind](net, scheduler_config, **kw)
