"""Training-free few-step samplers of the same teacher: what a distilled student has to beat.

Every sampler here is a plain function over the teacher's denoiser ``D(x, sigma)`` on a descending sigma grid that
ends at 0 (k-diffusion's form, Karras et al. 2022), so it can start anywhere on the teacher's range. It draws on the
evaluation's unit noise ``z`` (the same ``z`` as every other sampler, so samples pair up; a class-conditional
teacher also takes ``class_labels``, and a :class:`~cmdistill.core.guidance.GuidedDenoiser` guides them) and starts
at one of two places, a :class:`Start`:

* ``teacher``: the teacher's ``sigma_max``, ``z`` scaled by its ``prior_std`` (``sqrt(1 + sigma^2)`` for a DDPM
  teacher: where diffusers' loops start). Labels as ever: ``unipc-4``.
* ``student``: the student's own start, ``x = mu + sigma_max z`` with the student's ``sigma_max`` and prior mean
  (:func:`~cmdistill.core.sampling.start_sample`; truncated diffusion, Zheng et al. 2023, Lyu et al. 2022), the
  very point CM Algorithm 1 starts from. Labels end in ``@student``: ``unipc-4@student``. A student whose start
  is the teacher's (same ``sigma_max``, no prior mean) has no second start: no duplicate rows.

Registry :data:`BASELINES`, keyed by the names ``eval.baselines`` takes; each entry holds its solver, its grid from
either start and the network evaluations (NFE, one network call on one batch) it uses for a budget:

* ``dpm++2m``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, data prediction): :func:`dpmpp_2m`;
* ``unipc``: UniPC (Zhao et al. 2023, the UniP-2 predictor and UniC corrector with ``B(h) = e^h - 1``, "bh2",
  data prediction): :func:`unipc`;
* ``heun-karras``: Heun's method on a Karras grid (Karras et al. 2022, Algorithm 1 and eq. 5, rho = 7), ``s`` steps
  costing ``2s - 1`` evaluations (the last step, to sigma 0, is an Euler step); only at budgets that give it
  :data:`MIN_HEUN_STEPS` steps (:func:`heun_steps` says why).

Grids. From the teacher's start, ``dpm++2m`` and ``unipc`` run on the timesteps diffusers' own scheduler
(``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``) picks at the evaluation's timestep spacing, looked up
in the teacher's sigma table: they are diffusers' loops, computed in EDM space (the tests check it from the same
noise); they need a discrete (DDPM-family) teacher. From the student's start ``dpm++2m``, ``unipc`` and the
teacher's DDIM run on diffusers' ``trailing`` spacing over the range left, uniform in the teacher's timestep from
the student's ``sigma_max`` (:func:`truncated_sigmas`, which is the trailing grid when started at the teacher's
``sigma_max``). ``heun-karras`` runs on the Karras grid from either start (:func:`karras_sigmas`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.sampling import integrate, start_sample, teacher_sigmas
from ..core.schedules import DEFAULT_TEACHER_SPACING, append_zero, karras_grid
from ..core.tensors import promote

Sampler = Callable[..., torch.Tensor]   # (z, generator, **cond) -> x0
Grid = Callable[..., Optional[torch.Tensor]]


# --------------------------------------------------------------------------- where a sampler starts


@dataclass(frozen=True)
class Start:
    """Where a training-free sampler starts: ``name`` (``teacher`` or ``student``), ``sigma_max`` and the prior mean
    ``[C, H, W]`` (``None``: zero). ``native``: scale the unit noise by the teacher's ``prior_std(sigma_max)``, as its
    own samplers (and diffusers' loops) do; otherwise ``x = mean + sigma_max z``, as the student does."""

    name: str
    sigma_max: float
    mean: Optional[torch.Tensor] = None
    native: bool = False

    @property
    def suffix(self) -> str:
        """What a sampler's label gets: nothing from the teacher's start, ``@student`` from the student's."""
        return "" if self.name == "teacher" else f"@{self.name}"

    def state(self, teacher, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """The first state from unit noise ``z`` of a grid that starts at ``sigma`` (EDM space): ``z`` times the
        teacher's ``prior_std(sigma)`` from the teacher's start (a grid of diffusers' ``leading`` spacing starts below
        ``sigma_max``, and so do its loops), ``mean + sigma_max z`` from any other."""
        if self.native:
            return promote(z) * getattr(teacher, "prior_std", lambda s: s)(float(sigma))
        return start_sample(promote(z), self.sigma_max, self.mean)

    def describe(self) -> dict:
        """JSON-ready: ``sigma_max``, ``prior`` (``zero`` or ``data_mean``) and how the noise is scaled."""
        return {"sigma_max": self.sigma_max, "prior": "zero" if self.mean is None else "data_mean",
                "noise": "prior_std(sigma_max) z" if self.native else "sigma_max z"}


def teacher_start(teacher) -> Start:
    """The teacher's own start: its whole range, native noise scaling."""
    return Start("teacher", float(teacher.sigma_max), None, native=True)


def student_start(teacher, sigma_max: float, mean: Optional[torch.Tensor]) -> Optional[Start]:
    """The student's start (its ``sigma_max`` and prior mean), or ``None`` where that is the teacher's own (the same
    ``sigma_max`` and no mean): its rows would repeat the teacher-start rows."""
    if mean is None and math.isclose(float(sigma_max), float(teacher.sigma_max), rel_tol=1e-6):
        return None
    return Start("student", float(sigma_max), mean)


# --------------------------------------------------------------------------- solvers over D on a sigma grid


def _lam(sigma: float) -> float:
    """Half the log-SNR in EDM space, ``lambda = -log sigma`` (``log(alpha / sigma_vp)`` of the VP process);
    ``inf`` at sigma 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


@torch.no_grad()
def dpmpp_2m(denoiser, x: torch.Tensor, sigmas, **cond) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in EDM space, as k-diffusion's ``sample_dpmpp_2m``: with
    ``h = lambda_next - lambda``, ``x <- (sigma_next / sigma) x - expm1(-h) D'`` where ``D' = D + (D - D_prev) / (2r)``,
    ``r = h_prev / h`` (first order, ``D' = D``, at the first step and into sigma 0, where the step is ``x <- D``).
    This is diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, midpoint, ``lower_order_final``)
    divided through by ``alpha``: the VP state is ``x / sqrt(1 + sigma^2)``."""
    sig = [float(s) for s in sigmas]
    x, prev, h_prev = promote(x), None, None
    for s, t in zip(sig[:-1], sig[1:]):
        d = denoiser(x, s, **cond)
        h = _lam(t) - _lam(s)
        d_hat = d if prev is None or t == 0 else d + (d - prev) * (h / (2 * h_prev))
        x = (t / s) * x - math.expm1(-h) * d_hat
        prev, h_prev = d, h
    return x


def _uni_b(h: float) -> tuple[float, float, float]:
    """UniPC's ``B(h) = e^{hh} - 1`` ("bh2"; data prediction: ``hh = -h``) and the right-hand side
    ``b_k = k! hh phi_{k+1}(hh) / B(h)``, k = 1, 2, of its order conditions (Zhao et al. 2023, eq. 8 with
    ``phi_1(h) = (e^h - 1) / h``, ``phi_{k+1}(h) = (phi_k(h) - 1 / k!) / h``), as diffusers computes them."""
    hh = -h
    b_h = math.expm1(hh)
    phi1 = b_h / hh - 1
    phi2 = phi1 / hh - 0.5
    return b_h, phi1 / b_h, 2 * phi2 / b_h


def _uni_p(x, m0, m1, s, s_prev, t, order: int):
    """UniP (B(h), order 1 or 2) from ``(x, m0 = D(x, s))`` to ``t``; ``m1`` is ``D`` at ``s_prev``. Order 2 uses
    ``rho = 1/2``, where UniP-2 is DPM-Solver++(2M)."""
    h = _lam(t) - _lam(s)
    b_h = math.expm1(-h)
    out = (t / s) * x - b_h * m0
    if order == 2:
        r = (_lam(s_prev) - _lam(s)) / h
        out = out - b_h * 0.5 * (m1 - m0) / r
    return out


def _uni_c(x_last, m_t, m0, m1, t, s, s_prev, order: int):
    """UniC (B(h), order 1 or 2): correct the predictor's ``x_t`` with ``m_t = D(x_t, t)``, the evaluation the next
    step needs anyway (no extra NFE). ``x_last`` was the state at ``s`` with ``m0 = D(x_last, s)``, ``m1 = D`` at
    ``s_prev``."""
    h = _lam(t) - _lam(s)
    b_h, b1, b2 = _uni_b(h)
    out = (t / s) * x_last - b_h * m0
    if order == 1:
        return out - b_h * 0.5 * (m_t - m0)
    r = (_lam(s_prev) - _lam(s)) / h
    rho0 = (b1 - b2) / (1 - r)  # solve [[1, 1], [r, 1]] rho = [b1, b2]
    return out - b_h * (rho0 * (m1 - m0) / r + (b1 - rho0) * (m_t - m0))


@torch.no_grad()
def unipc(denoiser, x: torch.Tensor, sigmas, **cond) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, Algorithm 2: UniP-2 predictor, UniC corrector, bh2) in EDM space: one network call
    per step; each call first corrects the state it was made at (UniC), then predicts the next (UniP, order 1 at the
    first step and into sigma 0, order 2 between). diffusers' ``UniPCMultistepScheduler`` (``solver_order=2``,
    ``predict_x0``, ``lower_order_final``) divided through by ``alpha``."""
    sig = [float(s) for s in sigmas]
    n, x, ms, x_last = len(sig) - 1, promote(x), [], None
    for i in range(n):
        m = denoiser(x, sig[i], **cond)
        if i > 0:
            x = _uni_c(x_last, m, ms[-1], ms[-2] if i > 1 else None, sig[i], sig[i - 1],
                       sig[i - 2] if i > 1 else None, 1 if i == 1 else 2)
        x_last = x
        order = 1 if i == 0 or i == n - 1 else 2
        x = _uni_p(x, m, ms[-1] if ms else None, sig[i], sig[i - 1] if i else None, sig[i + 1], order)
        ms.append(m)
    return x


def ode(name: str) -> Callable[..., torch.Tensor]:
    """One of the teacher's ODE solvers (:data:`~cmdistill.core.solvers.SOLVERS`) as a solver over a grid."""
    return lambda denoiser, x, sigmas, **cond: integrate(denoiser, x, sigmas, name, **cond)


# --------------------------------------------------------------------------- grids


def karras_sigmas(teacher, start: Start, steps: int) -> torch.Tensor:
    """``steps`` sigmas of a Karras grid (rho = 7) from the start's ``sigma_max`` to the teacher's ``sigma_min``, then
    0 (one step: ``[sigma_max, 0]``); k-diffusion's ``get_sigmas_karras``, EDM's grid for Heun."""
    if steps == 1:
        return torch.tensor([start.sigma_max, 0.0], dtype=torch.float64)
    return append_zero(karras_grid(steps, teacher.sigma_min, start.sigma_max).double())


def _fractional_t(table: torch.Tensor, sigma: float) -> float:
    """The fractional timestep of ``sigma`` in an ascending sigma table (``log sigma`` interpolated linearly, as
    :meth:`~cmdistill.core.denoisers.DDPMDenoiser.sigma_to_t` reads it)."""
    log_t = table.double().log().cpu()
    hi = int(torch.searchsorted(log_t, torch.tensor([math.log(sigma)], dtype=torch.float64)).clamp(1, len(log_t) - 1))
    w = (math.log(sigma) - float(log_t[hi - 1])) / float(log_t[hi] - log_t[hi - 1])
    return hi - 1 + min(max(w, 0.0), 1.0)


def _sigma_at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sigmas at fractional timesteps ``t`` (the inverse of :func:`_fractional_t`)."""
    log_t = table.double().log().cpu()
    lo = t.floor().long().clamp(0, len(log_t) - 2)
    w = t - lo
    return torch.exp(log_t[lo] * (1 - w) + log_t[lo + 1] * w)


def truncated_sigmas(teacher, start: Start, steps: int) -> Optional[torch.Tensor]:
    """The grid every sampler but Heun runs on from the student's start: ``steps`` points uniform in the teacher's
    (fractional) timestep from ``t_0 = t(sigma_max)``, ``t_i = (t_0 + 1)(1 - i / steps) - 1``, then 0: diffusers'
    ``trailing`` spacing (Lin et al. 2024, Table 2) over the range the start leaves; from ``t_0 = T - 1`` it is the
    trailing grid itself (exactly where ``T / steps`` is whole). The network is evaluated at those fractional
    timesteps, as the denoiser always does. A Karras grid instead ends on ``sigma_min``, and its step from there to 0
    costs an evaluation that changes almost nothing: on the digits student's start (``mu + 5 z``) DDIM-2/3/4 scored
    FID 423/111/40 on it and 66/22/11 on this grid, DPM-Solver++(2M)-4 7.8 against 4.2, UniPC-4 7.4 against 3.1.
    A teacher without a sigma table (EDM) gets :func:`karras_sigmas`; ``None`` where the range holds fewer
    timesteps than ``steps``."""
    table = getattr(teacher, "sigma_table", None)
    if table is None:
        return karras_sigmas(teacher, start, steps)
    t0 = _fractional_t(table, start.sigma_max)
    if steps > t0 + 1:
        return None
    t = (t0 + 1) * (1 - torch.arange(steps, dtype=torch.float64) / steps) - 1
    sigmas = _sigma_at(table, t)
    sigmas[0] = start.sigma_max
    return append_zero(sigmas)


def scheduler_sigmas(scheduler: str) -> Grid:
    """The grid of diffusers' ``scheduler`` class over the teacher's sigma table: the timesteps its
    ``set_timesteps(steps)`` picks at the evaluation's spacing, their sigmas, then 0 (its ``final_sigmas_type``);
    ``None`` for a teacher without a discrete table."""

    def grid(teacher, steps: int, spacing: str) -> Optional[torch.Tensor]:
        import diffusers

        table = getattr(teacher, "sigma_table", None)
        if table is None:
            return None
        cfg = {k: v for k, v in teacher.scheduler_config.items() if k != "_class_name"}
        sched = getattr(diffusers, scheduler).from_config({**cfg, "timestep_spacing": spacing})
        sched.set_timesteps(steps)
        return append_zero(table.cpu()[sched.timesteps.long().clamp(max=len(table) - 1)].double())

    return grid


def ddim_sigmas(teacher, steps: int, spacing: str) -> torch.Tensor:
    """The teacher's own DDIM grid over its whole range (:func:`~cmdistill.core.sampling.teacher_sigmas`)."""
    return teacher_sigmas(teacher, steps, spacing).double()


def per_start(native: Callable[..., Optional[torch.Tensor]]) -> Grid:
    """A grid from either start: ``native(teacher, steps, spacing)`` from the teacher's own, :func:`truncated_sigmas`
    from the student's."""
    return lambda teacher, start, steps, spacing: (native(teacher, steps, spacing) if start.native
                                                   else truncated_sigmas(teacher, start, steps))


# --------------------------------------------------------------------------- the registry


MIN_HEUN_STEPS = 4


def heun_steps(nfe: int) -> Optional[int]:
    """Heun steps that fit in ``nfe`` evaluations (``s`` steps cost ``2s - 1``), or ``None`` below
    :data:`MIN_HEUN_STEPS`. On a Karras grid the last positive sigma is the teacher's ``sigma_min``, so ``s`` steps are
    ``s - 1`` second-order steps and an Euler step from ``sigma_min`` to 0 that changes almost nothing. A Heun step
    from ``sigma_hi`` into ``sigma_min`` averages the slope at ``sigma_hi`` with the network's noise estimate at
    ``sigma_min`` and leaves about ``sigma_hi / 2`` of noise: with 1 or 2 steps that is ``sigma_max / 2``, with 3 the
    noise of the grid's middle point (sigma 5.9 of 157; 0.44 of 5 from the digits student's start). From 4 steps
    (7 NFE) the last second-order step starts near the data's scale (sigma 1.2 of 157, 0.15 of 5). Digits teacher,
    1000 samples, Heun at 1/3/5/7/9 NFE: FID 218/283/333/51/37 over the whole range, 431/221/52/6.1/2.6 from
    ``mu + 5 z``."""
    s = (nfe + 1) // 2
    return s if s >= MIN_HEUN_STEPS else None


@dataclass(frozen=True)
class Baseline:
    """A registry entry: the solver over a grid, the grid from a start, and the steps a budget of NFE buys
    (``None``: not run at that budget)."""

    solve: Callable[..., torch.Tensor]      # (denoiser, x, sigmas, **cond) -> x0
    grid: Grid                              # (teacher, start, steps, spacing) -> sigmas ending in 0, or None
    steps: Callable[[int], Optional[int]]   # budget -> steps
    nfe: Callable[[int], int]               # steps -> network evaluations


BASELINES: dict[str, Baseline] = {
    "dpm++2m": Baseline(dpmpp_2m, per_start(scheduler_sigmas("DPMSolverMultistepScheduler")), lambda n: n,
                        lambda s: s),
    "unipc": Baseline(unipc, per_start(scheduler_sigmas("UniPCMultistepScheduler")), lambda n: n, lambda s: s),
    "heun-karras": Baseline(ode("heun"), lambda teacher, start, steps, spacing: karras_sigmas(teacher, start, steps),
                            heun_steps, lambda s: 2 * s - 1),
}


def sampler(teacher, solve: Callable[..., torch.Tensor], sigmas: torch.Tensor, start: Start) -> Sampler:
    """``(z, generator, **cond) -> x0``: ``solve`` over ``sigmas`` from ``start``'s state for ``z``."""
    return lambda z, g, **cond: solve(teacher, start.state(teacher, z, float(sigmas[0])), sigmas, **cond)


def teacher_sampler(teacher, solver: str, steps: int, start: Start,
                    spacing: str = DEFAULT_TEACHER_SPACING) -> Optional[Sampler]:
    """The teacher's ``steps``-step ODE sampler (``ddim``, ``heun``, ``euler``) from ``start``: from its own start
    over its DDIM grid, which is :func:`~cmdistill.evaluation.generate.teacher_fn`; from the student's over
    :func:`truncated_sigmas` (``None`` where that has too few timesteps)."""
    sigmas = per_start(ddim_sigmas)(teacher, start, steps, spacing)
    return None if sigmas is None else sampler(teacher, ode(solver), sigmas, start)


def make_baselines(teacher, nfes: list[int], names: list[str] | None = None,
                   spacing: str = DEFAULT_TEACHER_SPACING,
                   start: Start | None = None) -> list[tuple[str, int, Sampler]]:
    """``(label, nfe, sampler)`` for every baseline and budget that applies to this teacher from ``start`` (default:
    the teacher's own), labelled ``<name>-<nfe><start suffix>`` with the evaluations it really uses."""
    start = start or teacher_start(teacher)
    out = []
    for name in names or list(BASELINES):
        entry = BASELINES[name]
        for n in nfes:
            steps = entry.steps(n)
            sigmas = entry.grid(teacher, start, steps, spacing) if steps else None
            if sigmas is not None:
                used = entry.nfe(steps)
                out.append((f"{name}-{used}{start.suffix}", used, sampler(teacher, entry.solve, sigmas, start)))
    return out
