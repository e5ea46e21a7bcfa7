"""Single probability-flow ODE steps over any denoiser, with per-sample sigmas.

The ODE in EDM space is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 3 with s(t)=1, sigma(t)=t).
Each step maps ``x`` at ``sigma_hi`` to ``sigma_lo``; the same functions drive the teacher sampler and
the consistency-distillation targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .tensors import append_dims, as_sigma, sync_checks_enabled


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative ``(x - D) / sigma`` (EDM eq. 3; k-diffusion ``to_d``)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def euler_step(denoiser, x, sigma_hi, sigma_lo, **cond) -> torch.Tensor:
    """First-order step: ``x + (sigma_lo - sigma_hi) d(x, sigma_hi)`` (EDM Algorithm 1 without line 6)."""
    sigma_hi, sigma_lo = as_sigma(sigma_hi, x), as_sigma(sigma_lo, x)
    d = to_d(x, sigma_hi, denoiser(x, sigma_hi, **cond))
    return x + append_dims(sigma_lo - sigma_hi, x.ndim) * d


def heun_step(denoiser, x, sigma_hi, sigma_lo, **cond) -> torch.Tensor:
    """Second-order Heun step (EDM Algorithm 1, lines 5-8); falls back to Euler where ``sigma_lo == 0``."""
    sigma_hi, sigma_lo = as_sigma(sigma_hi, x), as_sigma(sigma_lo, x)
    d = to_d(x, sigma_hi, denoiser(x, sigma_hi, **cond))
    dt = append_dims(sigma_lo - sigma_hi, x.ndim)
    x_euler = x + dt * d
    if sync_checks_enabled():  # host syncs; skip_sync_checks() promises sigma_lo > 0 (training pairs)
        nonzero = sigma_lo > 0
        if not bool(nonzero.any()):
            return x_euler
        if not bool(nonzero.all()):
            raise ValueError("heun_step: sigma_lo must be all zero or all positive within a batch")
    d_lo = to_d(x_euler, sigma_lo, denoiser(x_euler, sigma_lo, **cond))
    return x + dt * 0.5 * (d + d_lo)


def ddim_step(denoiser, x, sigma_hi, sigma_lo, **cond) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) in EDM variables:
    ``x_lo = D + sigma_lo * eps_hat`` with ``eps_hat = (x - D) / sigma_hi``. Algebraically equal to Euler in
    VE space; written in DDIM's (x0, eps) form, as diffusers' ``DDIMScheduler.step`` computes it."""
    sigma_hi, sigma_lo = as_sigma(sigma_hi, x), as_sigma(sigma_lo, x)
    denoised = denoiser(x, sigma_hi, **cond)
    eps = to_d(x, sigma_hi, denoised)
    return denoised + append_dims(sigma_lo, x.ndim) * eps


@dataclass(frozen=True)
class Solver:
    """A registry entry: the step function and what it costs, so that registering a solver is all it takes for the
    recipe, the samplers and NFE accounting to know it."""

    step: Callable[..., torch.Tensor]
    nfe: int               # network evaluations of one step between two positive sigmas
    nfe_to_zero: int       # of a step that ends at sigma = 0 (Heun falls back to Euler there)

    def sampler_nfe(self, steps: int) -> int:
        """Evaluations of a ``steps``-step sampler whose last step ends at sigma = 0."""
        return (steps - 1) * self.nfe + self.nfe_to_zero


SOLVERS: dict[str, Solver] = {
    "heun": Solver(heun_step, nfe=2, nfe_to_zero=1),
    "euler": Solver(euler_step, nfe=1, nfe_to_zero=1),
    "ddim": Solver(ddim_step, nfe=1, nfe_to_zero=1),
}


def get_solver(name: str) -> Callable[..., torch.Tensor]:
    """The step function of the solver registered as ``name``."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name].step


def solve(denoiser, x, sigma_hi, sigma_lo, solver: str = "heun", substeps: int = 1, **cond) -> torch.Tensor:
    """Integrate from ``sigma_hi`` to ``sigma_lo`` (both > 0) with ``substeps`` log-uniform sub-steps."""
    step = get_solver(solver)
    sigma_hi, sigma_lo = as_sigma(sigma_hi, x), as_sigma(sigma_lo, x)
    if substeps == 1:
        return step(denoiser, x, sigma_hi, sigma_lo, **cond)
    log_hi, log_lo = sigma_hi.log(), sigma_lo.log()
    for k in range(substeps):
        a = torch.exp(torch.lerp(log_hi, log_lo, k / substeps))
        b = sigma_lo if k == substeps - 1 else torch.exp(torch.lerp(log_hi, log_lo, (k + 1) / substeps))
        x = step(denoiser, x, a, b, **cond)
    return x
