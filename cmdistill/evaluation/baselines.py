"""Training-free few-step samplers of the same teacher: what a distilled student has to beat.

Registry :data:`BASELINES`, keyed by the names ``eval.baselines`` takes; each entry turns a teacher denoiser and a
budget of network evaluations (NFE) into a sampler ``(z, generator) -> x0`` from the evaluation's unit noise ``z``
(the same ``z`` as every other sampler, so samples pair up; a class-conditional teacher also takes
``class_labels``, and a :class:`~cmdistill.core.guidance.GuidedDenoiser` guides them), or ``None`` where it does
not apply:

* ``dpm++2m``: diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``
  (Lu et al. 2022, "DPM-Solver++", the 2M multistep solver), driven by diffusers' own scheduler loop;
* ``unipc``: diffusers' ``UniPCMultistepScheduler`` (Zhao et al. 2023, "UniPC", bh2, order 2), likewise;
* ``heun-karras``: the teacher's Heun steps on a Karras grid (Karras et al. 2022, Algorithm 1 and eq. 5, rho = 7),
  with ``s`` steps costing ``2s - 1`` evaluations (the last step, to sigma 0, is an Euler step).

The diffusers samplers need a discrete (DDPM-family) teacher: they run on its scheduler config with the teacher
timestep spacing of the evaluation (``trailing`` by default). NFE is one network evaluation of one batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.sampling import sample_ode
from ..core.schedules import DEFAULT_TEACHER_SPACING, append_zero, karras_grid

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def diffusers_loop(teacher, scheduler_cls_name: str, nfe: int, spacing: str = DEFAULT_TEACHER_SPACING,
                   **options) -> Optional[Sampler]:
    """diffusers' scheduler loop (``set_timesteps``, ``scale_model_input``, network, ``step``) over the teacher's
    network and noise schedule; ``None`` for a teacher without a discrete beta table."""
    import diffusers

    if getattr(teacher, "sigma_table", None) is None:
        return None
    cfg = {k: v for k, v in teacher.scheduler_config.items() if k != "_class_name"}
    cfg.update(timestep_spacing=spacing, **options)
    sched = getattr(diffusers, scheduler_cls_name).from_config(cfg)

    @torch.no_grad()
    def sample(z: torch.Tensor, generator: torch.Generator, **cond) -> torch.Tensor:
        sched.set_timesteps(nfe, device=z.device)
        x = z.float() * sched.init_noise_sigma
        for t in sched.timesteps:
            out = teacher.run_net(sched.scale_model_input(x, t), t.reshape(1).expand(x.shape[0]), **cond)
            x = sched.step(out, t, x).prev_sample
        return x

    return sample


def dpmpp_2m(teacher, nfe: int, spacing: str = DEFAULT_TEACHER_SPACING) -> Optional[Sampler]:
    """DPM-Solver++ 2M through diffusers (Lu et al. 2022)."""
    return diffusers_loop(teacher, "DPMSolverMultistepScheduler", nfe, spacing, algorithm_type="dpmsolver++",
                          solver_order=2)


def unipc(teacher, nfe: int, spacing: str = DEFAULT_TEACHER_SPACING) -> Optional[Sampler]:
    """UniPC (bh2, order 2) through diffusers (Zhao et al. 2023)."""
    return diffusers_loop(teacher, "UniPCMultistepScheduler", nfe, spacing, solver_order=2)


def heun_steps(nfe: int) -> int:
    """Heun steps that fit in ``nfe`` evaluations: ``s`` steps cost ``2s - 1``."""
    return max(1, (nfe + 1) // 2)


def heun_karras(teacher, nfe: int, spacing: str = DEFAULT_TEACHER_SPACING) -> Sampler:
    """The teacher's Heun sampler on a Karras grid over its trained range (Karras et al. 2022)."""
    s = heun_steps(nfe)
    if s == 1:  # one step: sigma_max straight to 0, an Euler step (1 evaluation)
        sigmas = torch.tensor([teacher.sigma_max, 0.0])
    else:
        sigmas = append_zero(karras_grid(s, teacher.sigma_min, teacher.sigma_max))
    return lambda z, g, **cond: sample_ode(teacher, z, sigmas, "heun", **cond)


# name -> (builder, evaluations actually used for a budget of n)
BASELINES: dict[str, tuple[Callable[..., Optional[Sampler]], Callable[[int], int]]] = {
    "dpm++2m": (dpmpp_2m, lambda n: n),
    "unipc": (unipc, lambda n: n),
    "heun-karras": (heun_karras, lambda n: 2 * heun_steps(n) - 1),
}


def make_baselines(teacher, nfes: list[int], names: list[str] | None = None,
                   spacing: str = DEFAULT_TEACHER_SPACING) -> list[tuple[str, int, Sampler]]:
    """``(label, nfe, sampler)`` for every baseline and budget that applies to this teacher, labelled
    ``<name>-<nfe>`` with the evaluations it really uses."""
    out = []
    for name in names or list(BASELINES):
        build, used = BASELINES[name]
        for n in nfes:
            fn = build(teacher, n, spacing)
            if fn is not None:
                out.append((f"{name}-{used(n)}", used(n), fn))
    return out
