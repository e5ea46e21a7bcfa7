"""Consistency distances ``d(pred, target) -> [B]`` and weightings ``lambda(sigma_hi, sigma_lo) -> [B]``."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def l2_distance(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (CM's ``l2``)."""
    return (pred - tgt).float().pow(2).flatten(1).mean(1)


def l1_distance(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample (CM's ``l1``)."""
    return (pred - tgt).float().abs().flatten(1).mean(1)


class PseudoHuber(nn.Module):
    """iCT pseudo-Huber (Song & Dhariwal 2023, eq. 7): ``sqrt(||d||^2 + c^2) - c``, ``c = 0.00054 sqrt(dim)``."""

    def __init__(self, c: float | None = None):
        super().__init__()
        self.c = c

    def forward(self, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        d = (pred - tgt).float().flatten(1)
        c = self.c if self.c is not None else 0.00054 * math.sqrt(d.shape[1])
        return (d.pow(2).sum(1) + c**2).sqrt() - c


class LPIPSDistance(nn.Module):
    """LPIPS through the ``lpips`` package (CM used VGG LPIPS): inputs mapped from [-1, 1] to [0, 1],
    grey images repeated to 3 channels, bilinearly upsampled to ``resize`` when smaller (CM: 224)."""

    def __init__(self, net: str = "vgg", resize: int | None = 224, pretrained_backbone: bool = True):
        super().__init__()
        import lpips

        try:
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        except Exception as e:  # torchvision downloads the backbone weights on first use
            raise RuntimeError(
                f"cannot load the LPIPS {net} backbone weights ({type(e).__name__}); they are downloaded by "
                "torchvision on first use: run once with network access, or choose loss.distance l2/pseudo_huber"
            ) from e
        self.lpips.eval().requires_grad_(False)
        self.resize = resize

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.resize and x.shape[-1] < self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def forward(self, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.lpips(self.prepare(pred), self.prepare(tgt), normalize=True).flatten()


LPIPS_NETS = ("vgg", "alex")

# recipe name -> builder of the distance callable (``loss.*`` keys as keyword arguments; each takes what it needs)
DISTANCES: dict[str, Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "lpips": lambda lpips_net="vgg", lpips_resize=224, lpips_pretrained_backbone=True, **_: LPIPSDistance(
        lpips_net, lpips_resize, lpips_pretrained_backbone),
    "l2": lambda **_: l2_distance,
    "l1": lambda **_: l1_distance,
    "pseudo_huber": lambda huber_c=None, **_: PseudoHuber(huber_c),
}


def make_distance(name: str, **kw) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distance named ``name`` (:data:`DISTANCES`: ``lpips``, ``l2``, ``l1``, ``pseudo_huber``)."""
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; choose one of {sorted(DISTANCES)}")
    return DISTANCES[name](**kw)


class DecodedDistance(nn.Module):
    """``d(decode(a), decode(b))``: a pixel distance (LPIPS) for a latent student, through the frozen autoencoder's
    decoder (its gradients reach the student; its weights do not train). Costs a decoder forward and backward on both
    arguments every step."""

    def __init__(self, distance: Callable, vae: nn.Module, decode: Callable):
        super().__init__()
        self.distance, self.vae, self._decode = distance, vae, decode

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(self._decode(self.vae, a), self._decode(self.vae, b))


def uniform_weight(sigma_hi: torch.Tensor, sigma_lo: torch.Tensor) -> torch.Tensor:
    """``lambda = 1`` (CM's CD)."""
    return torch.ones_like(sigma_hi)


def inv_delta_weight(sigma_hi: torch.Tensor, sigma_lo: torch.Tensor) -> torch.Tensor:
    """``lambda = 1 / (sigma_hi - sigma_lo)`` (iCT, Sec. 3.4)."""
    return 1.0 / (sigma_hi - sigma_lo)


WEIGHTINGS: dict[str, Callable] = {"uniform": uniform_weight, "inv_delta": inv_delta_weight}


def get_weighting(name: str) -> Callable:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name]

