"""The consistency function with its boundary condition, student and target construction, and the target update
(Song et al. 2023, "Consistency Models", Sec. 3 and Algorithm 2)."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from .denoisers import Denoiser
from .lora import LoraSpec, add_adapters, follow_adapter, merged_network
from .networks import guidance_entered, prepare_network, takes_text
from .parametrizations import DEFAULT_PARAMETRIZATION, PARAMETRIZATIONS
from .sampling import start_sample
from .tensors import append_dims, as_sigma, lerp_toward, promote


def cm_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float, scale: float = 1.0, denoiser=None):
    """CM boundary scalings (Song et al. 2023, Appendix C):
    ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``, ``c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)``,
    so ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0`` exactly. ``scale`` is unused here."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float, scale: float = 10.0, denoiser=None):
    """LCM-style sharp boundary (Luo et al. 2023, with their timestep scaling written in sigma units):
    ``u = scale (sigma - sigma_min) / sigma_min``, ``c_skip = sd^2 / (u^2 + sd^2)``,
    ``c_out = u / sqrt(u^2 + sd^2)``. Exact at ``sigma_min`` and ``c_out -> 1`` quickly above it, so a student
    whose ``F`` is the teacher's denoiser starts as that denoiser."""
    u = scale * (sigma - sigma_min) / sigma_min
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_scheduler_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float, scale: float = 10.0,
                           denoiser=None):
    """diffusers' ``LCMScheduler`` boundary (``get_scalings_for_boundary_condition_discrete``), written in EDM space:
    on a VP (DDPM) teacher's timestep ``t(sigma)``, ``u = scale t`` (its ``timestep_scaling``),
    ``c_skip = sd^2 / (u^2 + sd^2)``, ``c_out = u / sqrt(u^2 + sd^2)``, and LCMScheduler skips the VP sample
    ``x / sqrt(1 + sigma^2)``, so ``c_skip`` here carries that factor. A student of this boundary computes what
    ``LCMScheduler.step`` computes from its network's output (Luo et al. 2023, eq. 9 with LCM's released constants);
    exact (``f = x``) only at ``t = 0``, where LCMScheduler is too."""
    if not hasattr(denoiser, "sigma_to_t"):
        raise ValueError("the lcm_scheduler boundary is LCMScheduler's: it needs a DDPM (VP) teacher's timesteps")
    u = scale * denoiser.sigma_to_t(sigma).to(sigma.dtype)
    c_skip = sigma_data**2 / (u**2 + sigma_data**2) / (sigma**2 + 1).sqrt()
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


BOUNDARIES: dict[str, Callable] = {"cm": cm_scalings, "lcm": lcm_scalings, "lcm_scheduler": lcm_scheduler_scalings}
# the one default (recipe, ConsistencyFunction, make_student, a pipeline config without the key): with F = the
# teacher's denoiser, lcm starts the student as that denoiser while cm starts it near 0.5 D at high sigma
DEFAULT_BOUNDARY = "lcm"


def resolve_boundary(name: str, denoiser) -> str:
    """``auto`` (the recipe's default): LCMScheduler's boundary for a text-conditional U-Net on a DDPM teacher, whose
    students diffusers' ``LatentConsistencyModelPipeline`` runs, else :data:`DEFAULT_BOUNDARY`; any other name as
    is."""
    if name != "auto":
        return name
    text = takes_text(denoiser.net)
    return "lcm_scheduler" if text and hasattr(denoiser, "sigma_to_t") else DEFAULT_BOUNDARY


class ConsistencyFunction(nn.Module):
    """``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma)`` with ``F`` a denoiser (CM eq. 5).

    ``F`` reads the network of the teacher's adapter (a copy of the teacher's) through the parametrisation named
    ``parametrization`` (:mod:`.parametrizations`), so it satisfies the denoiser contract; ``f`` does too, which
    lets samplers treat the student like any other denoiser.
    """

    def __init__(self, denoiser: nn.Module, boundary: str = DEFAULT_BOUNDARY, sigma_min: float | None = None,
                 sigma_data: float = 0.5, boundary_scale: float = 10.0, sigma_max: float | None = None,
                 parametrization: str = DEFAULT_PARAMETRIZATION):
        super().__init__()
        if boundary not in BOUNDARIES:
            raise ValueError(f"unknown boundary {boundary!r}; choose one of {sorted(BOUNDARIES)}")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {parametrization!r}; choose one of {sorted(PARAMETRIZATIONS)}")
        self.denoiser = denoiser
        self.boundary = boundary
        self.parametrization = parametrization
        self.boundary_scale = float(boundary_scale)
        self.sigma_min = float(denoiser.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(denoiser.sigma_max if sigma_max is None else sigma_max)
        if self.sigma_max > denoiser.sigma_max * (1 + 1e-6) or self.sigma_max <= self.sigma_min:
            raise ValueError(f"student sigma_max {self.sigma_max:.4g} must lie in the teacher's range "
                             f"({self.sigma_min:.4g}, {denoiser.sigma_max:.4g}]")
        self.sigma_data = float(sigma_data)
        self.prior_mean: torch.Tensor | None = None  # [C, H, W] mean of the 1-step start; None: 0 (CM)
        self.guidance_scale: float | None = None  # the teacher's classifier-free guidance w distilled into f
        # a student for a range of w: GuidanceEmbedding of w added to the time embedding; guidance_scale: its default
        self.guidance_embedding: nn.Module | None = None
        self.guidance_range: tuple[float, float] | None = None

    def scalings(self, sigma: torch.Tensor):
        return BOUNDARIES[self.boundary](sigma, self.sigma_min, self.sigma_data, self.boundary_scale, self.denoiser)

    def forward(self, x: torch.Tensor, sigma, guidance_scale=None, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        c_skip, c_out = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        return c_skip * x + c_out * self.denoise(x, sigma, guidance_scale, **cond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, guidance_scale=None, **cond) -> torch.Tensor:
        """``F(x, sigma)`` under the student's parametrisation; for a student with a guidance embedding, at scale
        ``guidance_scale`` (a float or one per sample; ``None``: its default ``self.guidance_scale``), through the
        network's native input or added to its embeddings (:func:`~cmdistill.core.networks.guidance_entered`)."""
        param = PARAMETRIZATIONS[self.parametrization]
        if self.guidance_embedding is None:
            if guidance_scale is not None:
                raise ValueError("this consistency function has no guidance embedding: call it without guidance_scale")
            return param(self.denoiser, x, sigma, **cond)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        w = torch.as_tensor(w, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        with guidance_entered(self.denoiser.net, self.guidance_embedding(w)) as extra:
            return param(self.denoiser, x, sigma, **cond, **extra)

    def start(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """The first input of CM Algorithm 1 from unit noise ``z``: ``prior_mean + start_std(sigma) z``
        (:func:`start_sample`)."""
        return start_sample(z, self.start_std(sigma), self.prior_mean)

    def start_std(self, sigma: float) -> float:
        """Std of the noise sampling starts from at ``sigma``: CM's ``sigma``; LCMScheduler's unit VP noise,
        ``sqrt(1 + sigma^2)`` in EDM space, for the ``lcm_scheduler`` boundary."""
        return self.denoiser.prior_std(sigma) if self.boundary == "lcm_scheduler" else float(sigma)

    def renoise_std(self, tau: float) -> float:
        """Std of the noise multistep sampling adds to reach ``tau`` (CM Algorithm 1: ``sqrt(tau^2 - sigma_min^2)``,
        its ``f`` keeping ``sigma_min`` of noise; LCMScheduler's ``tau``, its ``f`` being a clean estimate)."""
        if self.boundary == "lcm_scheduler":
            return float(tau)
        return math.sqrt(max(tau**2 - self.sigma_min**2, 0.0))

    def consistency_config(self) -> dict:
        cfg = {"boundary": self.boundary, "boundary_scale": self.boundary_scale, "sigma_min": self.sigma_min,
               "sigma_max": self.sigma_max, "sigma_data": self.sigma_data, "parametrization": self.parametrization}
        if self.guidance_scale is not None:
            cfg["guidance_scale"] = self.guidance_scale
        if self.guidance_range is not None:
            cfg["guidance_range"] = [float(w) for w in self.guidance_range]
        if self.prior_mean is not None:  # JSON-friendly: nested [C][H][W] list, 6 significant digits
            cfg["prior_mean"] = [[[float(f"{v:.6g}") for v in row] for row in ch]
                                 for ch in self.prior_mean.detach().float().cpu().tolist()]
        return cfg


def make_student(teacher: nn.Module, boundary: str = DEFAULT_BOUNDARY, sigma_data: float = 0.5,
                 boundary_scale: float = 10.0, sigma_max: float | None = None,
                 parametrization: str = DEFAULT_PARAMETRIZATION, lora: LoraSpec | None = None) -> ConsistencyFunction:
    """Student = the teacher's adapter around a *copy* of the teacher network, with the boundary condition on
    top, so that it starts as the teacher's one-step denoiser (as LCM, Luo et al. 2023, initialises from the
    teacher). The copy is trainable, in fp32 whatever the teacher's dtype; the teacher is untouched.
    ``sigma_max`` (default: the teacher's) caps the student's range: where its 1-step sampler starts and the top of
    its training grid. ``boundary`` ``auto``: :func:`resolve_boundary`. ``parametrization`` names how the network's
    output becomes ``F`` (:mod:`.parametrizations`).

    With ``lora`` (LCM-LoRA, Luo et al. 2023b) there is no copy: LoRA adapters are added to the teacher's own
    network (:func:`~.lora.add_adapters`), the student computes with its ``student`` adapter, the teacher with none.
    """
    if lora is not None:
        add_adapters(teacher.net, lora)
        prepare_network(teacher.net)
        den = shared_view(teacher, "student").train()
    else:
        den = copy.deepcopy(teacher)
        prepare_network(den.net)  # e.g. a DiT's own random label dropout off: the student sees the labels it is given
        den.net.float()  # fp32 master weights; nn.Module.float, which ModelMixin.to does not wrap with a warning
        den.requires_grad_(True).train()
    return ConsistencyFunction(den, boundary=resolve_boundary(boundary, den), sigma_data=sigma_data,
                               boundary_scale=boundary_scale, sigma_max=sigma_max, parametrization=parametrization)


def shared_view(module: nn.Module, adapter: str) -> nn.Module:
    """A copy of ``module`` (a denoiser or a consistency function: its tables, boundary, prior) around the *same*
    network, computing with LoRA adapter ``adapter`` (:mod:`.lora`)."""
    den = module if isinstance(module, Denoiser) else module.denoiser
    view = copy.deepcopy(module, memo={id(den.net): den.net})
    (view if isinstance(view, Denoiser) else view.denoiser).adapter = adapter
    return view


def merged_student(fn: ConsistencyFunction) -> ConsistencyFunction:
    """A LoRA view's consistency function with its adapter folded into a plain copy of the network
    (:func:`~.lora.merged_network`): what a full student of the same weights would be; ``fn`` itself otherwise."""
    den = fn.denoiser
    if den.adapter is None:
        return fn
    merged = copy.deepcopy(fn, memo={id(den.net): merged_network(den.net, den.adapter)})
    merged.denoiser.adapter = None
    return merged


def make_target(student: nn.Module, mu: float | None = None) -> nn.Module:
    """``f_target`` (CM Algorithm 2's ``theta^-``): a frozen copy of the student; with ``mu = 0`` the student itself.

    With ``mu = 0`` the target is set to the online weights after every update (:func:`update_target`), so between
    updates it always equals the student: evaluating the student under ``no_grad`` with the replayed RNG
    (:func:`cmdistill.core.cd_step.cd_loss`) is the same arithmetic, with one network fewer in memory.
    ``mu = None``: always a copy. A LoRA student's target is its network's ``target`` adapter (:func:`shared_view`).
    """
    if mu == 0:
        return student
    if student.denoiser.adapter is not None:
        return shared_view(student, "target")
    target = copy.deepcopy(student)
    target.requires_grad_(False)
    return target


def _pairs(target: nn.Module, online: nn.Module):
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameter lists")
    return t_params, o_params


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, mu: float) -> None:
    """CM Algorithm 2, last line: ``theta^- <- stopgrad(mu theta^- + (1 - mu) theta)`` with fused foreach ops.

    ``mu = 0`` copies the online weights exactly (a stop-gradient copy, as CM's CIFAR-10 CD and iCT use); a target
    that is the online network itself (:func:`make_target` with ``mu = 0``) has nothing to update. Buffers are
    copied as they are.
    """
    if target is online:
        return
    if online.denoiser.adapter is not None:  # LoRA views of one network: the target adapter follows the student's
        follow_adapter(online.denoiser.net, target.denoiser.adapter, online.denoiser.adapter, mu)
        return
    lerp_toward(*_pairs(target, online), mu)
    t_bufs, o_bufs = list(target.buffers()), list(online.buffers())
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)
