"""Target-network and evaluation-EMA updates (CM Algorithm 2, last line; DESIGN §2)."""
from __future__ import annotations

import contextlib

import torch
from ema_pytorch import EMA
from torch import nn


def _pairs(target: nn.Module, online: nn.Module):
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameter lists")
    return t_params, o_params


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, mu: float) -> None:
    """``theta^- <- stopgrad(mu theta^- + (1 - mu) theta)`` with fused foreach ops.

    ``mu = 0`` copies the online weights exactly (a stop-gradient copy, as CM's CIFAR-10 CD and iCT use).
    Buffers are copied as they are.
    """
    t_params, o_params = _pairs(target, online)
    if mu == 0.0:
        torch._foreach_copy_(t_params, o_params)
    else:
        torch._foreach_lerp_(t_params, o_params, 1.0 - mu)
    t_bufs, o_bufs = list(target.buffers()), list(online.buffers())
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)


# ema-pytorch's counters: EMA.update() reads them with .item() every call
EMA_COUNTERS = ("step", "initted")


class EvalEMA(EMA):
    """ema-pytorch's ``EMA`` whose two counter buffers (``step``, ``initted``) always stay on the CPU.

    ``EMA.update()`` calls ``.item()`` on them (and on the decay computed from ``step``) every update; on a GPU
    each such call is a host sync that stalls the training step. Kept on the CPU, the counters cost no sync,
    while the weights (moved by ``.to(device)`` as usual) are updated with one fused ``_foreach_lerp_``.
    Saving and loading are unchanged (same state_dict keys; loading copies into the CPU buffers).
    """

    def _apply(self, fn, *args, **kwargs):
        order = list(self._buffers)
        held = {name: self._buffers.pop(name) for name in EMA_COUNTERS if name in self._buffers}
        try:  # .to() / .cuda() / .half() reach everything but the counters
            return super()._apply(fn, *args, **kwargs)
        finally:
            merged = {k: held[k] if k in held else self._buffers[k] for k in order}
            self._buffers.clear()
            self._buffers.update(merged)


def make_eval_ema(model: nn.Module, beta: float = 0.9999, update_after_step: int = 0, power: float = 2 / 3):
    """The evaluation EMA (what gets sampled and exported), through ema-pytorch with foreach updates and
    counters on the CPU (:class:`EvalEMA`: no host sync per update).

    ema-pytorch ramps the decay up with a warm-up ``1 - (1 + step)^-power`` capped at ``beta``.
    """
    return EvalEMA(model, beta=beta, update_after_step=update_after_step, update_every=1, power=power,
                   include_online_model=False, use_foreach=True)


def rng_state(device: torch.device) -> dict:
    """CPU and (where used) CUDA RNG state; the upstream CM code restores only the CPU half."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def replay_rng(state: dict, device: torch.device):
    """Run the block from ``state`` (so dropout masks repeat), then continue the stream where it was."""
    after = rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(after, device)
