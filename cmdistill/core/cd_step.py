"""One consistency-distillation loss evaluation (CM Algorithm 2, one iteration without the update).

A pure function of its inputs: toy denoisers can drive it in tests, and the training loop calls it without
knowing any diffusion formula.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rng import replay_rng, rng_state
from .solvers import solve
from .tensors import append_dims


@dataclass
class CDOutput:
    loss: torch.Tensor          # scalar, weighted mean over the batch
    per_sample: torch.Tensor    # [B] unweighted distances (detached)
    sigma_hi: torch.Tensor
    sigma_lo: torch.Tensor


def cd_loss(student, target, teacher, x0: torch.Tensor, sigma_hi: torch.Tensor, sigma_lo: torch.Tensor,
            distance, weighting, solver: str = "heun", substeps: int = 1, noise: torch.Tensor | None = None,
            **cond) -> CDOutput:
    """CM Algorithm 2, lines 4-7:

    1. ``x_hi = x0 + sigma_hi z``;
    2. ``x_lo = Phi(x_hi, sigma_hi -> sigma_lo; teacher)`` (one ODE-solver step, no gradient);
    3. ``pred = f_student(x_hi, sigma_hi)``, ``tgt = f_target(x_lo, sigma_lo)`` (no gradient) with the
       same dropout mask (the RNG is replayed);
    4. ``loss = mean(lambda(sigma_hi, sigma_lo) d(pred, tgt))``.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    x_hi = x0 + append_dims(sigma_hi, x0.ndim) * noise
    with torch.no_grad():
        x_lo = solve(teacher, x_hi, sigma_hi, sigma_lo, solver=solver, substeps=substeps, **cond)
    state = rng_state(x0.device)
    pred = student(x_hi, sigma_hi, **cond)
    with torch.no_grad(), replay_rng(state, x0.device):
        tgt = target(x_lo, sigma_lo, **cond)
    dist = distance(pred.float(), tgt.float())
    loss = (weighting(sigma_hi, sigma_lo) * dist).mean()
    return CDOutput(loss, dist.detach(), sigma_hi, sigma_lo)
