"""The autoencoder seam of latent teachers (Rombach et al. 2022, "High-resolution image synthesis with latent
diffusion models", Sec. 3): images to the latents a teacher denoises, and back, for each diffusers autoencoder family.

- ``AutoencoderKL``: ``z = (mean of q(z|x) - shift_factor) * scaling_factor``; decoding inverts the affine map. The
  posterior **mean**, not a sample: the latents are computed once into a cache that every later run reuses, and one
  frozen draw of the encoder's noise is no more faithful than its mean; with a KL-regularised encoder its std is small
  next to the latents' spread (``cmdistill.latents`` records which one a cache holds).
- ``VQModel`` (``LDMPipeline``): ``z = encoder output (before quantisation) * scaling_factor``; the decoder
  quantises, as diffusers' ``VQModel.decode`` does by default.

Pure torch around the diffusers modules: no files (the cache is :mod:`cmdistill.latents`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _kl_encode(vae, x):
    return vae.encode(x).latent_dist.mean


def _kl_decode(vae, z):
    return vae.decode(z).sample


def _vq_encode(vae, x):
    return vae.encode(x).latents


def _vq_decode(vae, z):
    return vae.decode(z).sample


@dataclass(frozen=True)
class AutoencoderFamily:
    """How one diffusers autoencoder class encodes (before the scaling) and decodes (after it)."""

    encode: Callable
    decode: Callable
    posterior: str  # what the encoder's output is taken as (recorded with a latent cache)


AUTOENCODERS: dict[str, AutoencoderFamily] = {
    "AutoencoderKL": AutoencoderFamily(_kl_encode, _kl_decode, "mean"),
    "VQModel": AutoencoderFamily(_vq_encode, _vq_decode, "pre-quantisation"),
}


def autoencoder_family(vae) -> AutoencoderFamily:
    """The :class:`AutoencoderFamily` of ``vae`` by class name; a ``ValueError`` naming an unknown class."""
    for c in type(vae).__mro__:
        if c.__name__ in AUTOENCODERS:
            return AUTOENCODERS[c.__name__]
    raise ValueError(f"cmdistill does not know how to encode with a {type(vae).__name__} (it reads "
                     f"{', '.join(sorted(AUTOENCODERS))})")


def latent_affine(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of ``vae``'s config (diffusers' defaults: 0.18215 and 0)."""
    cfg = vae.config
    return float(getattr(cfg, "scaling_factor", None) or 1.0), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to the teacher's latents (fp32)."""
    scale, shift = latent_affine(vae)
    p = next(vae.parameters())
    return ((autoencoder_family(vae).encode(vae, x.to(p.device, p.dtype)).float() - shift) * scale)


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The teacher's latents to images (fp32, about [-1, 1]; not clamped)."""
    scale, shift = latent_affine(vae)
    p = next(vae.parameters())
    return autoencoder_family(vae).decode(vae, (z.float() / scale + shift).to(p.device, p.dtype)).float()


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Images through the autoencoder and back (encode then decode): what a latent model's best sample looks like."""
    with torch.no_grad():
        return decode_latents(vae, encode_latents(vae, x))
