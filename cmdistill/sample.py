"""Samplers: the teacher's ODE sampler and the consistency sampler (CM Algorithm 1)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .prior import start_sample
from .schedules import append_zero, karras_grid
from .solvers import get_solver
from .utils import promote


def ddpm_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0):
    """The integer timesteps diffusers' ``DDIMScheduler.set_timesteps`` picks (descending)."""
    T = num_train_timesteps
    if spacing == "leading":
        ts = (torch.arange(steps) * (T // steps)).flip(0) + steps_offset
    elif spacing == "trailing":
        ts = (torch.arange(T, 0, -T / steps).round() - 1).long()
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps).round().long().flip(0)
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    return ts.long()


def teacher_sigmas(denoiser, steps: int, spacing: str | None = None) -> torch.Tensor:
    """Descending sigmas ending in 0 for a ``steps``-step teacher sampler.

    DDPM teachers: the timesteps diffusers' DDIMScheduler would use (its ``timestep_spacing``), so the DDIM
    sampler reproduces diffusers' loop; EDM teachers: the Karras grid (rho = 7) over the trained range.
    """
    table = getattr(denoiser, "sigma_table", None)
    if table is None:
        return append_zero(karras_grid(steps, denoiser.sigma_min, denoiser.sigma_max))
    cfg = getattr(denoiser, "scheduler_config", {})
    spacing = spacing or cfg.get("timestep_spacing", "leading")
    ts = ddpm_timesteps(len(table), steps, spacing, cfg.get("steps_offset", 0))
    return append_zero(table[ts].float())


@torch.no_grad()
def sample_ode(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, solver: str = "ddim",
               progress: bool = False, **cond) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` (EDM Algorithm 1 for Heun).

    ``noise`` is unit Gaussian; it is scaled by the teacher's ``prior_std(sigmas[0])`` (``sqrt(1 + sigma^2)``
    for DDPM teachers, exactly as diffusers' loops start from unit VP noise).
    """
    step = get_solver(solver)
    prior = getattr(denoiser, "prior_std", lambda s: s)
    x = promote(noise) * prior(float(sigmas[0]))
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))
    for s_hi, s_lo in tqdm(pairs, disable=not progress, desc=f"teacher {solver}", leave=False):
        x = step(denoiser, x, s_hi, s_lo, **cond)
    return x


@torch.no_grad()
def sample_consistency(f, noise: torch.Tensor, sigmas, generator: torch.Generator | None = None,
                       **cond) -> torch.Tensor:
    """Multistep consistency sampling (CM Algorithm 1).

    ``x = f(mu + sigmas[0] z, sigmas[0])``; for each next ``tau``: ``x = f(x + sqrt(tau^2 - sigma_min^2) z, tau)``.
    ``sigmas`` is descending with ``sigmas[0]`` usually ``sigma_max``; one sigma means one step. ``mu`` is
    ``f.prior_mean`` when ``f`` has one (prior.py), else 0 as in CM.
    """
    sigmas = [float(s) for s in sigmas]
    x = f(start_sample(promote(noise), sigmas[0], getattr(f, "prior_mean", None)), sigmas[0], **cond)
    for tau in sigmas[1:]:
        z = torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device,
                        dtype=x.dtype).to(x.device)
        x = f(x + math.sqrt(max(tau**2 - f.sigma_min**2, 0.0)) * z, tau, **cond)
    return x


def default_multistep_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Default tau schedule for k steps: ``sigma_max`` then ``k-1`` points of a Karras grid (rho = 7) over the
    range, excluding both ends. CM picked its taus by FID search; ``cmdistill evaluate --search-sigmas`` does."""
    if steps == 1:
        return [sigma_max]
    grid = karras_grid(steps + 1, sigma_min, sigma_max, rho).tolist()
    return [sigma_max] + grid[1:-1]
