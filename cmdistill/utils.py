"""Small tensor helpers shared by the numerical core."""
from __future__ import annotations

import torch


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample ``[B]`` tensor broadcasts over ``[B, ...]``."""
    missing = ndim - t.ndim
    if missing < 0:
        raise ValueError(f"tensor has {t.ndim} dims, more than target {ndim}")
    return t[(...,) + (None,) * missing]


def promote(x: torch.Tensor) -> torch.Tensor:
    """Preconditioning precision: at least fp32 (fp16/bf16 inputs are upcast, float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Return ``sigma`` as a tensor of shape ``[B]`` on ``x``'s device, in ``x``'s (promoted) precision."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma
