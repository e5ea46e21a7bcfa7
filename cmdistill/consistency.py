"""The consistency function with its boundary condition, and student construction (CM, Sec. 3)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .prior import start_sample
from .utils import append_dims, as_sigma, promote


def cm_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float, scale: float = 1.0):
    """CM boundary scalings (Song et al. 2023, Appendix C):
    ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``, ``c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)``,
    so ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0`` exactly. ``scale`` is unused here."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float, scale: float = 10.0):
    """LCM-style sharp boundary (Luo et al. 2023, with their timestep scaling written in sigma units):
    ``u = scale (sigma - sigma_min) / sigma_min``, ``c_skip = sd^2 / (u^2 + sd^2)``,
    ``c_out = u / sqrt(u^2 + sd^2)``. Exact at ``sigma_min`` and ``c_out -> 1`` quickly above it, so a student
    whose ``F`` is the teacher's denoiser starts as that denoiser."""
    u = scale * (sigma - sigma_min) / sigma_min
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


BOUNDARIES: dict[str, Callable] = {"cm": cm_scalings, "lcm": lcm_scalings}


class ConsistencyFunction(nn.Module):
    """``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma)`` with ``F`` a denoiser (DESIGN §2).

    ``F`` is the teacher's adapter around a copy of the teacher's network, so it satisfies the denoiser
    contract; ``f`` does too, which lets samplers treat the student like any other denoiser.
    """

    def __init__(self, denoiser: nn.Module, boundary: str = "cm", sigma_min: float | None = None,
                 sigma_data: float = 0.5, boundary_scale: float = 10.0, sigma_max: float | None = None):
        super().__init__()
        if boundary not in BOUNDARIES:
            raise ValueError(f"unknown boundary {boundary!r}; choose one of {sorted(BOUNDARIES)}")
        self.denoiser = denoiser
        self.boundary = boundary
        self.boundary_scale = float(boundary_scale)
        self.sigma_min = float(denoiser.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(denoiser.sigma_max if sigma_max is None else sigma_max)
        if self.sigma_max > denoiser.sigma_max * (1 + 1e-6) or self.sigma_max <= self.sigma_min:
            raise ValueError(f"student sigma_max {self.sigma_max:.4g} must lie in the teacher's range "
                             f"({self.sigma_min:.4g}, {denoiser.sigma_max:.4g}]")
        self.sigma_data = float(sigma_data)
        self.prior_mean: torch.Tensor | None = None  # [C, H, W] mean of the 1-step start (prior.py); None: 0

    def scalings(self, sigma: torch.Tensor):
        return BOUNDARIES[self.boundary](sigma, self.sigma_min, self.sigma_data, self.boundary_scale)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        c_skip, c_out = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        return c_skip * x + c_out * self.denoiser(x, sigma, **cond)

    def start(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """The first input of CM Algorithm 1 from unit noise ``z``: ``prior_mean + sigma z`` (prior.py)."""
        return start_sample(z, sigma, self.prior_mean)

    def consistency_config(self) -> dict:
        cfg = {"boundary": self.boundary, "boundary_scale": self.boundary_scale, "sigma_min": self.sigma_min,
               "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}
        if self.prior_mean is not None:  # JSON-friendly: nested [C][H][W] list, 6 significant digits
            cfg["prior_mean"] = [[[float(f"{v:.6g}") for v in row] for row in ch]
                                 for ch in self.prior_mean.detach().float().cpu().tolist()]
        return cfg


def make_student(teacher: nn.Module, boundary: str = "cm", sigma_data: float = 0.5,
                 boundary_scale: float = 10.0, sigma_max: float | None = None) -> ConsistencyFunction:
    """Student = the teacher's adapter around a *copy* of the teacher network, with the boundary condition on
    top (DESIGN §2). The copy is trainable; the teacher is untouched. ``sigma_max`` (default: the teacher's)
    caps the student's range: where its 1-step sampler starts and the top of its training grid."""
    den = copy.deepcopy(teacher)
    den.requires_grad_(True).train()
    return ConsistencyFunction(den, boundary=boundary, sigma_data=sigma_data, boundary_scale=boundary_scale,
                               sigma_max=sigma_max)


def make_target(student: nn.Module) -> nn.Module:
    """Frozen copy of the student used for ``f_target`` (CM Algorithm 2's ``theta^-``)."""
    target = copy.deepcopy(student)
    target.requires_grad_(False)
    return target
