"""Classifier-free guidance as a denoiser (Ho & Salimans 2022, "Classifier-free diffusion guidance", eq. 6, in x0
form): ``D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))``.

The guided teacher satisfies the denoiser contract, so the ODE solvers that make the distillation pairs use it
unchanged (LCM's guided distillation, Luo et al. 2023, Sec. 4.2). Both halves run in one batched network call.
``w = 1`` is the conditional teacher; ``w = 0`` the unconditional one. The null condition is the network family's
(:mod:`.networks`): for class-conditional teachers one extra label of the class table, the label the teacher saw
when its label was dropped in training (:func:`~cmdistill.core.networks.null_class`).
The recipe's guidance section reaches the networks through :func:`guided_teacher` (the pairs' teacher) and
:func:`attach_guidance` (the student), the one way for training, evaluation and sampling alike.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .networks import embedding_width, guidance_input, is_conditional, null_condition, with_guidance_input
from .tensors import append_dims, as_sigma, promote


class GuidedDenoiser(nn.Module):
    """A conditional denoiser with classifier-free guidance at scale ``w`` (a float, or one per sample).

    ``null_condition``: the condition dict that stands for "no condition" for one sample (the null class,
    :func:`~cmdistill.core.networks.null_condition`), broadcast to the batch; each call's condition dict (e.g.
    ``class_labels``) has the same keys. It also guides the raw network output (:meth:`run_net`), which is what
    diffusers' scheduler loops call: the output is affine in ``D`` with the same coefficients for both halves, so
    guiding it is guiding ``D``."""

    def __init__(self, denoiser: nn.Module, null_condition: dict, guidance_scale: float = 1.0):
        super().__init__()
        self.denoiser, self.guidance_scale = denoiser, float(guidance_scale)
        self.null_condition = dict(null_condition)
        self.net = denoiser.net  # shared, not copied: what image_shape and the samplers read
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.sigma_data = getattr(denoiser, "sigma_data", 0.5)
        for name in ("kind", "prediction_type", "scheduler_config", "sigma_table", "native_sigmas"):
            if hasattr(denoiser, name):
                setattr(self, name, getattr(denoiser, name))

    def check_range(self, sigma: torch.Tensor) -> None:
        self.denoiser.check_range(sigma)

    def prior_std(self, sigma: float) -> float:
        return self.denoiser.prior_std(sigma) if hasattr(self.denoiser, "prior_std") else float(sigma)

    def _doubled(self, cond: dict, batch: int, device) -> dict:
        """The conditional half then the null half of every condition, each broadcast to ``batch``."""
        if set(cond) != set(self.null_condition):
            raise ValueError(f"guidance needs the conditions {sorted(self.null_condition)}, got {sorted(cond)}")
        return {k: torch.cat([batched(v, batch, device), batched(self.null_condition[k], batch, device)])
                for k, v in cond.items()}

    def _guide(self, call, x: torch.Tensor, extra: torch.Tensor, cond: dict, guidance_scale) -> torch.Tensor:
        """``call(x2, extra2, cond2)`` once on the conditional and null halves, combined at scale ``w``."""
        both = self._doubled(cond, x.shape[0], x.device)
        out_cond, out_null = call(torch.cat([x, x]), torch.cat([extra, extra]), both).chunk(2)
        w = torch.as_tensor(self.guidance_scale if guidance_scale is None else guidance_scale, device=x.device,
                            dtype=out_cond.dtype).reshape(-1).expand(x.shape[0])
        return out_null + append_dims(w, x.ndim) * (out_cond - out_null)

    def forward(self, x: torch.Tensor, sigma, guidance_scale=None, **cond) -> torch.Tensor:
        x = promote(x)
        return self._guide(lambda x2, s2, c2: self.denoiser(x2, s2, **c2), x, as_sigma(sigma, x), cond,
                           guidance_scale)

    def run_net(self, x_in: torch.Tensor, t: torch.Tensor, guidance_scale=None, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_in.device).reshape(-1).expand(x_in.shape[0])
        return self._guide(lambda x2, t2, c2: self.denoiser.run_net(x2, t2, **c2), x_in, t, cond, guidance_scale)


def batched(v, batch: int, device) -> torch.Tensor:
    """A condition for one sample (a scalar label, a ``[1, ...]`` embedding) or for each, as a ``[batch, ...]``
    tensor on ``device``."""
    v = torch.as_tensor(v, device=device)
    if v.ndim == 0:
        return v.reshape(1).expand(batch)
    return v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v


def scale_features(w: torch.Tensor, num_features: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(1000 w f_i), sin(1000 w f_i)]`` of the guidance scale, ``f_i`` geometric from 1 to
    ``1 / max_period`` (the transformer / DDPM timestep embedding applied to ``1000 w``, as LCM embeds its
    ``w``: Luo et al. 2023, Sec. 4.2)."""
    half = num_features // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=w.device, dtype=torch.float32) / half)
    args = 1000.0 * w.float().reshape(-1, 1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=1)


class GuidanceEmbedding(nn.Module):
    """The guidance scale ``w`` as a vector added to the U-Net's time embedding (LCM's ``w``-conditioning, Luo et
    al. 2023, Sec. 4.2; sCM's guidance embedding), for a student that samples at any ``w`` of its range.

    ``w -> Linear(num_features, dim) -> SiLU -> Linear(dim, dim)`` on :func:`scale_features`. The last layer starts at
    zero, so a new embedding adds nothing and the student still starts as the teacher (the ControlNet "zero
    convolution" start); training then moves it. diffusers' ``UNet2DModel`` and DiT have no ``time_cond_proj_dim``, so
    the vector enters through forward hooks on the embeddings the network family names (the U-Net's time embedding,
    each DiT block's conditioning embedding: :func:`~cmdistill.core.networks.added_to_embedding`)."""

    def __init__(self, embedding_dim: int, num_features: int = 64):
        super().__init__()
        self.num_features = int(num_features)
        self.mlp = nn.Sequential(nn.Linear(self.num_features, embedding_dim), nn.SiLU(),
                                 nn.Linear(embedding_dim, embedding_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @classmethod
    def for_net(cls, net: nn.Module, num_features: int = 64) -> "GuidanceEmbedding":
        """A zero-started embedding as wide as ``net``'s embedding sites (:func:`~cmdistill.core.networks.embedding_width`)."""
        dim = embedding_width(net)
        first = next(net.parameters())
        return cls(dim, num_features).to(first.device)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        p = self.mlp[0].weight
        return self.mlp(scale_features(w, self.num_features).to(p.device, p.dtype))


def lcm_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' guidance-scale embedding of LCM (``LatentConsistencyModelPipeline.get_guidance_scale_embedding``):
    ``[sin(1000 w f_i), cos(1000 w f_i)]``, ``f_i = 10000^(-i / (dim/2 - 1))``, zero-padded to an odd ``dim``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=w.device, dtype=torch.float32) / (half - 1))
    args = 1000.0 * w.float().reshape(-1, 1) * freqs
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class NativeGuidanceEmbedding(nn.Module):
    """The guidance scale through a network's own input (a U-Net's ``time_cond_proj_dim`` / ``timestep_cond``): no
    weights of its own (they are the network's ``cond_proj``), only LCM's convention, which embeds ``w - 1``
    (LCM writes guidance as ``eps_null + (1 + omega)(eps_c - eps_null)``, so its ``omega`` is Ho & Salimans' ``w - 1``;
    diffusers' ``LatentConsistencyModelPipeline(guidance_scale=w)`` embeds ``w - 1``). cmdistill's ``w`` is Ho &
    Salimans' everywhere, so a student sampled at ``w`` by either pipeline gives the same images."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lcm_scale_embedding(w - 1.0, self.dim)


def guided_teacher(teacher: nn.Module, guidance_scale: float | None, null: int | None = None,
                   per_sample: bool = False) -> nn.Module:
    """The teacher with classifier-free guidance at ``guidance_scale`` (LCM's guided distillation; with
    ``per_sample`` a ``guidance_scale`` given to each call, one ``w`` per sample, defaulting to this one), or the
    teacher itself, one network call a step, at a fixed scale of 1 (or ``None``). ``null``: the null class
    (:func:`~cmdistill.core.networks.null_class`). A ``ValueError`` when guidance is asked of an unconditional
    teacher."""
    if not per_sample and (guidance_scale is None or float(guidance_scale) == 1.0):
        return teacher
    if not is_conditional(teacher.net):
        raise ValueError("classifier-free guidance needs a conditional teacher (class labels or a text condition)")
    if null is None:  # a text teacher's null condition is the empty prompt's embedding, computed when it was loaded
        null = getattr(teacher, "empty_condition", None)
    return GuidedDenoiser(teacher, null_condition(teacher.net, null), 1.0 if guidance_scale is None else guidance_scale)


NATIVE_GUIDANCE_DIM = 256  # time_cond_proj_dim given to a text U-Net student (LCM's SD students use 256)


def attach_guidance(student: nn.Module, guidance_scale: float, w_range: tuple[float, float] | None = None) -> None:
    """What a consistency function knows of guidance, set before its target and EMA are copied from it: for a range
    ``w_range`` of scales ``w`` becomes an input (``guidance_scale`` its default) through the network's native input
    where its family has one (a text U-Net student gets ``time_cond_proj_dim``, its projection zero-started:
    :class:`NativeGuidanceEmbedding`, LCM's form), else a zero-started :class:`GuidanceEmbedding` added to its
    embeddings; without a range a fixed ``guidance_scale`` other than 1 built in (nothing for 1). A ``ValueError``
    for a network without an embedding to add ``w`` to."""
    if w_range is not None:
        den = student.denoiser
        den.net = with_guidance_input(den.net, NATIVE_GUIDANCE_DIM)  # a native input where the family has one
        dim = getattr(den.net.config, "time_cond_proj_dim", None) if guidance_input(den.net) else None
        student.guidance_embedding = (NativeGuidanceEmbedding(dim) if dim else
                                      GuidanceEmbedding.for_net(den.net))
        student.guidance_range = (float(w_range[0]), float(w_range[1]))
    if w_range is not None or guidance_scale != 1.0:
        student.guidance_scale = float(guidance_scale)
