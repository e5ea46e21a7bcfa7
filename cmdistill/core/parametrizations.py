"""The student's parametrisation: how its network's output becomes ``F(x, sigma)``, the denoiser inside the boundary
condition ``f = c_skip x + c_out F`` (CM eq. 5). Keyed by ``student.parametrization``; stored in the exported
student's ``consistency`` config, so :class:`~cmdistill.export.pipeline.ConsistencyPipeline` rebuilds the same one.

- ``denoiser`` (the default): ``F`` is the teacher adapter's own ``D(x, sigma)`` (LCM, Luo et al. 2023), so the student
  starts exactly as the teacher's one-step denoiser. For an epsilon teacher ``D = x - sigma eps``: an error ``e`` in the
  network's output becomes ``sigma e`` in ``F`` (x157 at the top of google/ddpm-cifar10-32's range).
- ``v``: the network's output ``o`` is read as a velocity (TrigFlow's ``F``, Lu & Song 2024, arXiv:2410.11081), at the
  teacher's own input scaling and time conditioning (its SNR, as sCM/rCM match a teacher):
  ``F = s^2 / (sigma^2 + s^2) x - sigma s / sqrt(sigma^2 + s^2) o`` with ``s`` the adapter's unit
  (:attr:`~cmdistill.core.denoisers.Denoiser.unit_std`: 1 for a VP teacher, ``sigma_data`` for EDM). The factor on
  ``o`` never exceeds ``s``, whatever sigma. For a v-prediction teacher this *is* its denoiser; an epsilon teacher's
  weights start it right at low noise and wrong at high noise (where ``v -> -x0`` but the network outputs ``eps``),
  which training has to undo.
"""
from __future__ import annotations

from typing import Callable

import torch

from .tensors import append_dims


def denoiser_output(denoiser, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
    """``F = D(x, sigma)``: the teacher adapter's mapping of the network output to ``x0``."""
    return denoiser(x, sigma, **cond)


def v_output(denoiser, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
    """``F = s^2 / (sigma^2 + s^2) x - sigma s / sqrt(sigma^2 + s^2) o``, ``o`` the network's output read as v
    (TrigFlow's consistency function, arXiv:2410.11081, written in EDM sigma with ``t = arctan(sigma / s)``)."""
    o = denoiser.net_output(x, sigma, **cond)
    s, sd = append_dims(sigma, x.ndim), denoiser.unit_std
    return sd**2 / (s**2 + sd**2) * x - s * sd / (s**2 + sd**2).sqrt() * o


PARAMETRIZATIONS: dict[str, Callable[..., torch.Tensor]] = {"denoiser": denoiser_output, "v": v_output}
DEFAULT_PARAMETRIZATION = "denoiser"  # a recipe or pipeline config without the key: the student as it always was
