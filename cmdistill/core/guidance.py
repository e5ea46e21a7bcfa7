"""Classifier-free guidance as a denoiser (Ho & Salimans 2022, "Classifier-free diffusion guidance", eq. 6, in x0
form): ``D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))``.

The guided teacher satisfies the denoiser contract, so the ODE solvers that make the distillation pairs use it
unchanged (LCM's guided distillation, Luo et al. 2023, Sec. 4.2). Both halves run in one batched network call.
``w = 1`` is the conditional teacher; ``w = 0`` the unconditional one. The null class is one extra label of the
teacher's class embedding (the label the teacher saw when its label was dropped in training).
"""
from __future__ import annotations

import torch
from torch import nn

from .tensors import append_dims, as_sigma, promote


class GuidedDenoiser(nn.Module):
    """A class-conditional denoiser with classifier-free guidance at scale ``w`` (a float, or one per sample)."""

    def __init__(self, denoiser: nn.Module, null_class: int, guidance_scale: float = 1.0):
        super().__init__()
        self.denoiser, self.null_class, self.guidance_scale = denoiser, int(null_class), float(guidance_scale)
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.sigma_data = getattr(denoiser, "sigma_data", 0.5)

    def check_range(self, sigma: torch.Tensor) -> None:
        self.denoiser.check_range(sigma)

    def prior_std(self, sigma: float) -> float:
        return self.denoiser.prior_std(sigma) if hasattr(self.denoiser, "prior_std") else float(sigma)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor, guidance_scale=None) -> torch.Tensor:
        x = promote(x)
        sigma = as_sigma(sigma, x)
        labels = torch.as_tensor(class_labels, device=x.device).reshape(-1).expand(x.shape[0])
        null = torch.full_like(labels, self.null_class)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([labels, null]))
        d_cond, d_uncond = both.chunk(2)
        w = torch.as_tensor(self.guidance_scale if guidance_scale is None else guidance_scale, device=x.device,
                            dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return d_uncond + append_dims(w, x.ndim) * (d_cond - d_uncond)
