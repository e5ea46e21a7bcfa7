"""Samplers over the denoiser contract: the teacher's probability-flow ODE sampler and the consistency sampler
(Song et al. 2023, "Consistency Models", Algorithm 1), with where 1-step sampling starts.

Where sampling starts: CM Algorithm 1 starts from ``x = sigma_max z``, i.e. it approximates the marginal
``p_sigma = p_data * N(0, sigma^2 I)`` at ``sigma_max`` by ``N(0, sigma_max^2 I)``, exact only as
``sigma_max / ||data|| -> infinity``. A student whose range stops lower (``student.sigma_max``) needs the next
moment, ``N(mu, sigma_max^2 I)`` with ``mu`` the per-pixel data mean: the Gaussian prior of truncated diffusion
(Zheng et al. 2023, "Truncated diffusion probabilistic models"; Lyu et al. 2022, "Accelerating diffusion models
via early stop"). :func:`start_sample` takes that mean (``None``: CM's zero mean).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .schedules import DEFAULT_TEACHER_SPACING, append_zero, ddpm_timesteps, karras_grid
from .solvers import get_solver
from .tensors import promote

# (shape, dtype, device) -> unit Gaussian noise; the pipeline passes diffusers' randn_tensor with its generators
NoiseFn = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]


def start_sample(z: torch.Tensor, sigma: float, mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first input of CM Algorithm 1: ``x = mu + sigma z`` (``mu = 0`` when ``mean`` is ``None``)."""
    x = z * sigma
    return x if mean is None else x + mean.to(x.device, x.dtype)


def teacher_sigmas(denoiser, steps: int, spacing: str | None = DEFAULT_TEACHER_SPACING) -> torch.Tensor:
    """Descending sigmas ending in 0 for a ``steps``-step teacher sampler.

    DDPM teachers: the timesteps diffusers' DDIMScheduler would use with this ``timestep_spacing`` (``None``: the
    teacher scheduler's own), so the DDIM sampler reproduces diffusers' loop; flow-matching teachers: their
    scheduler's (``native_sigmas``); EDM teachers: the Karras grid (Karras et al. 2022, eq. 5, rho = 7) over the
    trained range.
    """
    native = getattr(denoiser, "native_sigmas", None)  # an adapter with its own scheduler's grid (flow matching)
    if native is not None:
        return append_zero(native(steps).float())
    table = getattr(denoiser, "sigma_table", None)
    if table is None:
        return append_zero(karras_grid(steps, denoiser.sigma_min, denoiser.sigma_max))
    cfg = getattr(denoiser, "scheduler_config", {})
    spacing = spacing or cfg.get("timestep_spacing", "leading")
    T = int(cfg.get("num_train_timesteps", len(table)))
    ts = ddpm_timesteps(T, steps, spacing, cfg.get("steps_offset", 0)).clamp(max=len(table) - 1)
    return append_zero(table[ts].float())


@torch.no_grad()
def sample_ode(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, solver: str = "ddim",
               progress: bool = False, **cond) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` (Karras et al. 2022, Algorithm 1
    for Heun).

    ``noise`` is unit Gaussian; it is scaled by the teacher's ``prior_std(sigmas[0])`` (``sqrt(1 + sigma^2)``
    for DDPM teachers, exactly as diffusers' loops start from unit VP noise).
    """
    prior = getattr(denoiser, "prior_std", lambda s: s)
    return integrate(denoiser, promote(noise) * prior(float(sigmas[0])), sigmas, solver, progress, **cond)


@torch.no_grad()
def integrate(denoiser, x: torch.Tensor, sigmas, solver: str = "heun", progress: bool = False,
              **cond) -> torch.Tensor:
    """The probability-flow ODE from the state ``x`` at ``sigmas[0]`` through each next sigma in turn, one
    ``solver`` step each (Karras et al. 2022, Algorithm 1 for Heun)."""
    step = get_solver(solver)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    x = promote(x)
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))
    for s_hi, s_lo in tqdm(pairs, disable=not progress, desc=f"teacher {solver}", leave=False):
        x = step(denoiser, x, s_hi, s_lo, **cond)
    return x


def _torch_noise(generator: torch.Generator | None) -> NoiseFn:
    def draw(shape, dtype, device):
        gen_device = device if generator is None else generator.device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)

    return draw


@torch.no_grad()
def sample_consistency(f, noise: torch.Tensor, sigmas: Sequence[float], generator: torch.Generator | None = None,
                       noise_fn: NoiseFn | None = None, clip_denoised: bool = False, **cond) -> torch.Tensor:
    """Multistep consistency sampling (CM Algorithm 1): ``x = f(mu + sigmas[0] z, sigmas[0])``; for each next
    ``tau``: ``x = f(x + sqrt(tau^2 - sigma_min^2) z', tau)``.

    ``sigmas`` is descending, ``sigmas[0]`` usually ``sigma_max``; one sigma is one step. A consistency function
    whose boundary has other conventions says so (``f.start_std``, ``f.renoise_std``: LCMScheduler's unit VP start
    and full ``tau`` of noise). ``mu`` is ``f.prior_mean``
    when ``f`` has one, else 0 (CM). The fresh noise ``z'`` comes from ``noise_fn`` (default: ``torch.randn`` on
    ``generator``). ``clip_denoised``: clamp each intermediate ``x`` to the data range [-1, 1] before it is noised
    again, as CM's code and diffusers' ``CMStochasticIterativeScheduler(clip_denoised=True)`` do. Off by default:
    on the digits student it raised the 2-4-step FID in all 6 comparisons (same taus and noise, two seeds; by
    0.05-0.37, docs/benchmarks.md "Clamping between steps"). The returned sample is never clamped (callers map it
    to pixels).
    """
    draw = noise_fn or _torch_noise(generator)
    sigmas = [float(s) for s in sigmas]
    start_std = getattr(f, "start_std", lambda s: s)  # a consistency function's own conventions, else CM's
    renoise_std = getattr(f, "renoise_std", lambda tau: math.sqrt(max(tau**2 - f.sigma_min**2, 0.0)))
    x = f(start_sample(promote(noise), start_std(sigmas[0]), getattr(f, "prior_mean", None)), sigmas[0], **cond)
    for tau in sigmas[1:]:
        if clip_denoised:
            x = x.clamp(-1, 1)
        z = draw(tuple(x.shape), x.dtype, x.device)
        x = f(x + renoise_std(tau) * z, tau, **cond)
    return x


def default_multistep_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Default tau schedule for k steps: ``sigma_max`` then ``k-1`` points of a Karras grid (rho = 7) over the
    range, excluding both ends. CM picked its taus by FID search; ``cmdistill evaluate --search-sigmas`` does."""
    if steps == 1:
        return [sigma_max]
    grid = karras_grid(steps + 1, sigma_min, sigma_max, rho).tolist()
    return [sigma_max] + grid[1:-1]
