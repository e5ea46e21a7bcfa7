"""The evaluation EMA (what is sampled and exported), through ema-pytorch. The target network's update, CM
Algorithm 2's last line, is :func:`cmdistill.core.consistency.update_target`."""
from __future__ import annotations

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


def make_eval_ema(model: nn.Module, beta: float = 0.9999, update_after_step: int = 0, power: float = 2 / 3):
    """The evaluation EMA (what gets sampled and exported), through ema-pytorch with foreach updates and
    counters on the CPU (:class:`EvalEMA`: no host sync per update).

    ema-pytorch ramps the decay up with a warm-up ``1 - (1 + step)^-power`` capped at ``beta``.
    """
    return EvalEMA(model, beta=beta, update_after_step=update_after_step, update_every=1, power=power,
                   include_online_model=False, use_foreach=True)


def effective_decay(beta: float, step: int, power: float = 2 / 3, update_after_step: int = 0) -> float:
    """The decay ema-pytorch applies at update ``step``: ``min(beta, 1 - (1 + t)^-power)`` with
    ``t = step - update_after_step - 1`` (0 before the warm-up starts). A short run never reaches ``beta``: with
    ``power = 2/3`` the warm-up passes 0.999 only after about 31,600 updates (0.9999: a million)."""
    t = step - update_after_step - 1
    return 0.0 if t <= 0 else min(beta, 1 - (1 + t) ** -power)
