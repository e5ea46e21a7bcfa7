"""Small tensor helpers shared by the numerical core: broadcasting, precision, host-sync switches, shapes."""
from __future__ import annotations

import contextlib
import threading

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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # recipe names of weight dtypes

_checks = threading.local()


def sync_checks_enabled() -> bool:
    """Whether argument checks that read device values on the host (a GPU sync each) run; on by default."""
    return getattr(_checks, "enabled", True)


@contextlib.contextmanager
def skip_sync_checks():
    """Skip the per-call sigma checks that read device tensors on the host (the teacher's range check, Heun's
    ``sigma_lo == 0`` test): each is a host sync on a GPU. For the training hot path only, whose sigmas come
    from a grid checked once, on the host, to lie inside the teacher's range; everything else keeps them."""
    before = sync_checks_enabled()
    _checks.enabled = False
    try:
        yield
    finally:
        _checks.enabled = before


def compute_dtype(net: torch.nn.Module) -> torch.dtype | None:
    """The dtype ``net``'s first layer with weights computes in: under diffusers' layerwise casting
    (``enable_layerwise_casting``) its hook's ``compute_dtype``, else the weights' dtype (``None``: no weights).
    diffusers' ``ModelMixin.dtype`` applies the same rule by walking every module (0.6 ms a call on a 288-module
    U-Net); this walk stops at that first layer."""
    for m in net.modules():  # pre-order: the root (a hook on the whole model), down to the first layer
        hooks = getattr(m, "_diffusers_hook", None)
        hook = hooks.get_hook("layerwise_casting") if hooks is not None else None
        p = next(m.parameters(recurse=False), None)
        if hook is not None or p is not None:
            return hook.compute_dtype if hook is not None else p.dtype
    return None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor (sigmas, flip masks) to ``device`` without a host sync: a pageable copy to a GPU
    waits for the stream, a pinned one with ``non_blocking=True`` does not."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def lerp_toward(dst: list[torch.Tensor], src: list[torch.Tensor], mu: float) -> None:
    """``dst <- mu dst + (1 - mu) src`` in place with fused foreach ops; ``mu = 0`` copies ``src`` exactly (the
    target update of CM Algorithm 2 and its LoRA form)."""
    if mu == 0.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_lerp_(dst, src, 1.0 - mu)
