"""Optimisers and learning-rate schedules shared by ``cmdistill distill`` and ``cmdistill train-teacher``: the
optimiser named by ``optim.name``; a linear warm-up over ``optim.warmup_steps`` optimiser steps, then the shape named
by ``optim.lr_schedule``; the gradient norm the loop clips and checks."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..core.schedules import scaled_to_run


def constant_after_warmup(frac: float) -> float:
    """The learning rate as set (CM)."""
    return 1.0


@scaled_to_run
def cosine_after_warmup(frac: float) -> float:
    """Cosine decay from the set learning rate to zero at ``max_steps`` (``frac``: progress after the warm-up)."""
    return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """RAdam (CM's CIFAR-10 choice), Adam or AdamW, keyed by ``cfg.name`` (``optim.name``)."""
    return OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of ``grads`` (one fused foreach pass, no host sync)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def grad_norm(accelerator, params, clip: float | None, check: bool) -> torch.Tensor | None:
    """The total gradient norm (clipping to ``clip`` when set); ``None`` when neither clipping nor the non-finite
    check needs it."""
    if clip:
        return accelerator.clip_grad_norm_(params, clip)
    if check:
        return total_norm([p.grad for p in params if p.grad is not None])
    return None


LR_SCHEDULES: dict[str, Callable[[float], float]] = {"constant": constant_after_warmup, "cosine": cosine_after_warmup}


def make_lr_lambda(cfg, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at each optimiser step: ``(step + 1) / warmup`` during the warm-up, then
    ``LR_SCHEDULES[cfg.lr_schedule]`` of the progress after it. ``cfg`` has ``warmup_steps`` and ``lr_schedule``."""
    shape = LR_SCHEDULES[cfg.lr_schedule]

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return shape((step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))

    return f


def make_lr_schedule(opt: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :func:`make_lr_lambda` (its state is saved with every checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(cfg, max_steps))
