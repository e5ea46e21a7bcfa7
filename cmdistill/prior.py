"""Where 1-step sampling starts: the noise distribution at the student's ``sigma_max``.

CM Algorithm 1 starts from ``x = sigma_max z``, i.e. it approximates the marginal
``p_sigma = p_data * N(0, sigma^2 I)`` at ``sigma_max`` by ``N(0, sigma_max^2 I)``. That is exact only as
``sigma_max / ||data|| -> infinity``. A student whose range stops lower (``student.sigma_max``, useful for
epsilon teachers) needs the next moment: ``N(mu, sigma_max^2 I)`` with ``mu`` the per-pixel mean of the
training images, the Gaussian prior of truncated diffusion (Zheng et al. 2023, "Truncated diffusion
probabilistic models"; Lyu et al. 2022, "Accelerating diffusion models via early stop"). On the digits teacher,
its own Heun ODE started at sigma 10 from ``10 z`` gives FID 3.56, from ``mu + 10 z`` 2.15, the same as from its
full range, 2.16 (``benchmarks/bench_prior.py``, docs/benchmarks.md).

Recipe key ``student.prior``: ``zero`` (CM) or ``data_mean``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset


def zero_mean(ds: Dataset, hflip: bool = False, batch_size: int = 1024) -> None:
    """CM's prior ``N(0, sigma_max^2 I)``: no mean to store."""
    return None


@torch.no_grad()
def data_mean(ds: Dataset, hflip: bool = False, batch_size: int = 1024) -> torch.Tensor:
    """Per-pixel mean ``[C, H, W]`` (float32) of the training images as the training loop sees them: with random
    horizontal flips, the mean of an image and its mirror."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    total, n = None, 0
    for (x, *_) in loader:
        s = x.double().sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
    mean = (total / n).float()
    return (mean + mean.flip(-1)) / 2 if hflip else mean


PRIORS: dict[str, Callable[..., Optional[torch.Tensor]]] = {"zero": zero_mean, "data_mean": data_mean}


def prior_mean(name: str, ds: Dataset, hflip: bool = False) -> Optional[torch.Tensor]:
    """The mean of the starting distribution named by ``student.prior`` (``None`` for a zero mean)."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    return PRIORS[name](ds, hflip)


def start_sample(z: torch.Tensor, sigma: float, mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first input of CM Algorithm 1: ``x = mu + sigma z`` (``mu = 0`` when ``mean`` is ``None``)."""
    x = z * sigma
    return x if mean is None else x + mean.to(x.device, x.dtype)
