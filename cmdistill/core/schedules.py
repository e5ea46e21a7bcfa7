"""Noise-level grids, DDPM sigma tables, pair sampling and N curricula.

Everything is in EDM (variance-exploding) space: ``x_sigma = x0 + sigma * z``.
Grids are **descending**: ``grid[0]`` is the largest sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# --------------------------------------------------------------------------- DDPM tables


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # diffusers' DDPMScheduler names


def ddpm_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """Betas exactly as diffusers' ``DDPMScheduler`` builds them (float32, its precision), including its
    ``rescale_betas_zero_snr`` option (:func:`rescale_zero_terminal_snr`)."""
    betas = _base_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), "Common diffusion noise schedules and sample steps are flawed", Algorithm 1: shift and
    scale ``sqrt(abar)`` so that it ends at exactly 0 (zero terminal SNR) while its first value is unchanged."""
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))  # diffusers' order of float32 operations
    ab = ab_sqrt**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _base_betas(n: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas) -> torch.Tensor:
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021), eq. 17, capped at 0.999 as diffusers does.
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")


def vp_sigmas_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """DDPM table to EDM sigmas: ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (EDM Table 1, VP column).

    ``abar`` is the float32 cumulative product diffusers uses, so tables match its schedulers bit for bit;
    the square root is taken in float64. A zero-terminal-SNR schedule ends in ``inf`` (``abar_T = 0``).
    """
    abar = torch.cumprod(1.0 - betas.float(), dim=0).double()
    return ((1.0 - abar) / abar).sqrt()


def ddpm_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0):
    """The integer timesteps diffusers' ``DDIMScheduler.set_timesteps`` picks (descending); ``spacing`` is its
    ``timestep_spacing`` (Lin et al. 2024, Table 2: ``leading``, ``linspace``, ``trailing``)."""
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


TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
# the teacher samplers' spacing wherever none is given (`cmdistill sample`, `cmdistill evaluate`): trailing starts
# every k-step sampler at t = T-1, the only one of the three whose 1-step sampler starts from noise
DEFAULT_TEACHER_SPACING = "trailing"


# --------------------------------------------------------------------------- grids


def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``n`` sigmas from ``sigma_max`` down to ``sigma_min`` (descending)."""
    if n < 2:
        raise ValueError("a Karras grid needs n >= 2")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = 1.0 / rho
    s = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv)) ** rho
    return s.float()


def teacher_grid(table: torch.Tensor, skip: int) -> torch.Tensor:
    """The teacher's own discrete sigmas at ``t = T-1, T-1-k, ..., 0`` (LCM's skipping-step grid), descending.

    The last point is always ``t = 0`` (``sigma_min``, where the boundary condition holds), as LCM clamps its last
    skipped step to ``t = 0``: the final interval may then be shorter than ``k``."""
    if skip < 1:
        raise ValueError("skip must be >= 1")
    idx = torch.arange(len(table) - 1, -1, -skip)
    if idx[-1] != 0:
        idx = torch.cat([idx, idx.new_zeros(1)])
    return table[idx].float()


def append_zero(grid: torch.Tensor) -> torch.Tensor:
    """Append a final ``sigma = 0`` so a sampler ends on the denoised image."""
    return torch.cat([grid, grid.new_zeros(1)])


# --------------------------------------------------------------------------- pair sampling


def uniform_pair_probs(grid: torch.Tensor) -> torch.Tensor:
    """Uniform over the ``N-1`` adjacent intervals (CM Algorithm 2)."""
    return torch.full((len(grid) - 1,), 1.0 / (len(grid) - 1))


def lognormal_pair_probs(grid: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretised lognormal (Song & Dhariwal 2023, Sec. 3.5): mass of ``ln sigma ~ N(P_mean, P_std^2)``
    between the two ends of each interval."""
    log_s = grid.double().log()
    cdf = torch.special.erf((log_s - p_mean) / (math.sqrt(2.0) * p_std))
    p = (cdf[:-1] - cdf[1:]).clamp_min(0)
    if p.sum() <= 0:
        return uniform_pair_probs(grid)
    return (p / p.sum()).float()


PAIR_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform_pair_probs,
    "lognormal": lognormal_pair_probs,
}


def sample_pairs(grid: torch.Tensor, probs: torch.Tensor, batch: int, generator=None, gap: int = 1):
    """Draw ``batch`` interval indices ``n`` and return ``(sigma_hi, sigma_lo) = (grid[n], grid[n + gap])``, the
    lower end clamped to the grid's last point."""
    n = torch.multinomial(probs, batch, replacement=True, generator=generator)
    return grid[n], grid[(n + gap).clamp_max(len(grid) - 1)]


# --------------------------------------------------------------------------- N curricula


def scaled_to_run(fn):
    """Mark a schedule whose value at a step depends on the run's length (``train.max_steps``): changing the length
    on ``--resume`` then changes the schedule of the steps still to come. Read with :func:`is_scaled_to_run`."""
    fn.scaled_to_run = True
    return fn


def is_scaled_to_run(entry) -> bool:
    """Whether a registry entry (:func:`scaled_to_run`) depends on the run's length."""
    return bool(getattr(entry, "scaled_to_run", False))


def stage_of(step: int, total_steps: int, num_stages: float) -> int:
    """Which of ``num_stages`` equal stages ``step`` is in: ``floor(step / K')`` with ``K' = floor(K / num_stages)``
    (at least 1), the stage count of iCT's eq. (6) and of every doubling curriculum below."""
    return step // max(1, math.floor(total_steps / num_stages))


def constant_curriculum(step: int, total_steps: int, n_start: int, n_end: int) -> int:
    """The fixed ``N`` of CM's CD: always ``n_end`` grid points."""
    return n_end


@scaled_to_run
def ict_exponential_curriculum(step: int, total_steps: int, n_start: int, n_end: int) -> int:
    """iCT eq. (6), counted in grid points: ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` with
    ``K' = floor(K / (log2(s1/s0) + 1))``, where ``s0 = n_start - 1`` and ``s1 = n_end - 1`` are interval counts;
    so the curriculum starts at ``n_start`` points and ends at exactly ``n_end`` (iCT's s0 = 10, s1 = 1280 are
    ``n_start = 11``, ``n_end = 1281``). A start above the end is refused: the curriculum would stay at
    ``n_start`` for the whole run."""
    if n_start > n_end:
        raise ValueError(f"the curriculum starts at {n_start} grid points, above its final {n_end}")
    s0, s1 = n_start - 1, n_end - 1
    return min(s0 * 2 ** stage_of(step, total_steps, math.log2(s1 / s0) + 1), s1) + 1


CURRICULA: dict[str, Callable[[int, int, int, int], int]] = {
    "constant": constant_curriculum,
    "ict_exponential": ict_exponential_curriculum,
}


# --------------------------------------------------------------------------- pair-gap and teacher sub-step curricula


def doubling_stage(step: int, total_steps: int, top: int) -> int:
    """``2^stage`` capped at ``top`` over ``log2(top) + 1`` equal stages (:func:`stage_of`): the multiplier of
    iCT's eq. (6), so each stage gets an equal share of the run."""
    return min(2 ** stage_of(step, total_steps, math.log2(max(top, 1)) + 1), top)


def constant_gap(step: int, total_steps: int, gap_start: int) -> int:
    """CM's pairs: adjacent grid points (a gap of one interval) throughout."""
    return 1


@scaled_to_run
def ect_halving_gap(step: int, total_steps: int, gap_start: int) -> int:
    """ECT's shrinking pair gap (Geng et al. 2024, arXiv:2406.14548, Sec. 3: ``dt`` divided by ``q = 2`` every
    ``d`` iterations), on the grid: the pair ``(grid[n], grid[n + k])`` with ``k`` halving from ``gap_start`` to 1
    in equal stages. A wide gap early asks the student to match the teacher over a long stretch of its ODE; the
    run ends on CM's adjacent pairs."""
    return max(1, gap_start // doubling_stage(step, total_steps, gap_start))


GAP_CURRICULA: dict[str, Callable[[int, int, int], int]] = {"constant": constant_gap, "ect_halving": ect_halving_gap}


def constant_substeps(step: int, total_steps: int, substeps: int) -> int:
    """The teacher's sub-steps per pair as set (``solver.substeps``)."""
    return substeps


@scaled_to_run
def doubling_substeps(step: int, total_steps: int, substeps: int) -> int:
    """Teacher sub-step annealing (after Multistep CM, Heek et al. 2024, arXiv:2403.06807, Table 2, which anneals
    the teacher's step size from coarse to fine): 1, 2, 4, ... up to ``solver.substeps`` sub-steps per pair in
    equal stages; cheap, coarse teacher targets early, accurate ones at the end."""
    return doubling_stage(step, total_steps, substeps)


SUBSTEP_SCHEDULES: dict[str, Callable[[int, int, int], int]] = {"constant": constant_substeps,
                                                                 "doubling": doubling_substeps}


@dataclass(frozen=True)
class Grid:
    """A registry entry of :data:`GRIDS`: how the grid at a step is built from a :class:`PairSchedule`, the cache key
    that says when it must be rebuilt, and what it needs."""

    build: Callable[["PairSchedule", int], torch.Tensor]
    key: Callable[["PairSchedule", int], object]
    needs_table: bool = False       # a teacher with a discrete sigma table (DDPM)
    capped_by_student: bool = True  # spans the student's range (student.sigma_max caps it)


GRIDS: dict[str, Grid] = {
    # Karras et al. (2022) eq. 5 over the student's range, N from the curriculum (CM, iCT)
    "karras": Grid(build=lambda ps, step: karras_grid(ps.num_points(step), ps.sigma_min, ps.sigma_max, ps.rho),
                   key=lambda ps, step: ps.num_points(step)),
    # the teacher's own discrete sigmas every k timesteps (LCM's skipping-step grid)
    "teacher": Grid(build=lambda ps, step: teacher_grid(ps.table.cpu(), ps.skip), key=lambda ps, step: None,
                    needs_table=True, capped_by_student=False),
}


class PairSchedule:
    """Everything that picks ``(sigma_hi, sigma_lo)`` for a training step, built from the recipe:
    a grid (``karras`` with N from a curriculum, or the ``teacher``'s own grid with skip k) and a pair
    distribution (``uniform`` or ``lognormal``) over its intervals, whose lower end lies ``gap`` grid points
    below (:data:`GAP_CURRICULA`; clamped to the grid's last point, ``sigma_min``)."""

    def __init__(self, grid: str, sigma_min: float, sigma_max: float, num_scales: int, rho: float = 7.0,
                 curriculum: str = "constant", num_scales_start: int = 10, total_steps: int = 1,
                 pairs: str = "uniform", p_mean: float = -1.1, p_std: float = 2.0, table=None, skip: int = 1,
                 gap: str = "constant", gap_start: int = 1):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
        if GRIDS[grid].needs_table and table is None:
            raise ValueError(f"grid {grid!r} needs a teacher with a discrete sigma table (a DDPM teacher)")
        if curriculum not in CURRICULA:
            raise ValueError(f"unknown curriculum {curriculum!r}; choose one of {sorted(CURRICULA)}")
        CURRICULA[curriculum](0, total_steps, num_scales_start, num_scales)  # refuses a start above the end
        if pairs not in PAIR_SAMPLERS:
            raise ValueError(f"unknown pair sampling {pairs!r}; choose one of {sorted(PAIR_SAMPLERS)}")
        if gap not in GAP_CURRICULA:
            raise ValueError(f"unknown pair gap {gap!r}; choose one of {sorted(GAP_CURRICULA)}")
        self.grid, self.sigma_min, self.sigma_max, self.rho = grid, sigma_min, sigma_max, rho
        self.num_scales, self.num_scales_start, self.curriculum = num_scales, num_scales_start, curriculum
        self.total_steps, self.pairs, self.p_mean, self.p_std = total_steps, pairs, p_mean, p_std
        self.table, self.skip, self.gap, self.gap_start = table, skip, gap, gap_start
        self._cache: tuple[object, torch.Tensor, torch.Tensor] | None = None

    def num_points(self, step: int) -> int:
        return CURRICULA[self.curriculum](step, self.total_steps, self.num_scales_start, self.num_scales)

    def grid_and_probs(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = GRIDS[self.grid]
        key = entry.key(self, step)
        if self._cache is None or self._cache[0] != key:
            g = entry.build(self, step)
            kw = {"p_mean": self.p_mean, "p_std": self.p_std} if self.pairs == "lognormal" else {}
            self._cache = (key, g, PAIR_SAMPLERS[self.pairs](g, **kw))
        return self._cache[1], self._cache[2]

    def gap_at(self, step: int) -> int:
        """Grid intervals between the two points of a pair at ``step``."""
        return GAP_CURRICULA[self.gap](step, self.total_steps, self.gap_start)

    def sample(self, batch: int, step: int, device=None):
        """``(sigma_hi, sigma_lo)``, each ``[batch]`` fp32 on ``device`` (CM Algorithm 2, line 3)."""
        grid, probs = self.grid_and_probs(step)
        hi, lo = sample_pairs(grid, probs, batch, gap=self.gap_at(step))
        return hi.to(device), lo.to(device)
