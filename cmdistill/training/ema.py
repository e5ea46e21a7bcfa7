"""The evaluation EMA (what is sampled and exported), through ema-pytorch. The target network's update, CM
Algorithm 2's last line, is :func:`cmdistill.core.consistency.update_target`."""
from __future__ import annotations

import torch
from ema_pytorch import EMA
from torch import nn


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


class AdapterWeights(nn.Module):
    """One LoRA adapter of a shared network as a checkpoint module (:mod:`cmdistill.core.lora`): its state is that
    adapter's tensors (and a step counter), not the base network that ``view`` computes with."""

    def __init__(self, view: nn.Module, adapter: str):
        super().__init__()
        self.adapter = adapter
        self.step = 0  # a host integer: no device sync per update
        self._view = (view,)  # a tuple: not a submodule (the network is not this module's)

    def _tensors(self) -> dict[str, torch.Tensor]:
        from ..core.lora import adapter_parameters

        return adapter_parameters(self._view[0].denoiser.net, self.adapter)

    def state_dict(self, *args, **kwargs):
        return {"step": torch.tensor(self.step), **{f"lora.{k}": v.detach() for k, v in self._tensors().items()}}

    @torch.no_grad()
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {f"lora.{k}": t for k, t in self._tensors().items()}
        missing = [k for k in ["step", *own] if k not in state_dict]
        unexpected = [k for k in state_dict if k != "step" and k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"{self.adapter} adapter state: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if "step" in state_dict:
            self.step = int(state_dict["step"])
        for k, t in own.items():
            if k in state_dict:
                t.copy_(state_dict[k])
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


class AdapterEMA(AdapterWeights):
    """The evaluation EMA of a LoRA student: the shared network's ``ema`` adapter follows the ``student`` adapter
    with ema-pytorch's decay and warm-up (:func:`effective_decay`), over the adapter tensors alone; ``ema_model`` is
    the student's view through the ``ema`` adapter."""

    def __init__(self, model: nn.Module, beta: float, update_after_step: int, power: float):
        from ..core.consistency import shared_view

        super().__init__(shared_view(model, "ema"), "ema")
        self.beta, self.update_after_step, self.power = beta, update_after_step, power

    @property
    def ema_model(self) -> nn.Module:
        return self._view[0]

    def update(self) -> None:
        from ..core.lora import follow_adapter

        self.step += 1
        decay = effective_decay(self.beta, self.step, self.power, self.update_after_step)
        follow_adapter(self.ema_model.denoiser.net, "ema", "student", decay)


def make_eval_ema(model: nn.Module, beta: float = 0.9999, update_after_step: int = 0, power: float = 2 / 3):
    """The evaluation EMA (what gets sampled and exported), through ema-pytorch with foreach updates and
    counters on the CPU (:class:`EvalEMA`: no host sync per update); for a LoRA student, over its adapter alone
    (:class:`AdapterEMA`).

    ema-pytorch ramps the decay up with a warm-up ``1 - (1 + step)^-power`` capped at ``beta``.
    """
    if getattr(getattr(model, "denoiser", None), "adapter", None) is not None:
        return AdapterEMA(model, beta, update_after_step, power)
    return EvalEMA(model, beta=beta, update_after_step=update_after_step, update_every=1, power=power,
                   include_online_model=False, use_foreach=True)


def effective_decay(beta: float, step: int, power: float = 2 / 3, update_after_step: int = 0) -> float:
    """The decay ema-pytorch applies at update ``step``: ``min(beta, 1 - (1 + t)^-power)`` with
    ``t = step - update_after_step - 1`` (0 before the warm-up starts). A short run never reaches ``beta``: with
    ``power = 2/3`` the warm-up passes 0.999 only after about 31,600 updates (0.9999: a million)."""
    t = step - update_after_step - 1
    return 0.0 if t <= 0 else min(beta, 1 - (1 + t) ** -power)
