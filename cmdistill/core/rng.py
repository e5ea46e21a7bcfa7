"""Random-number-generator state: capture, restore and replay.

Two users: the CD step replays the RNG so that the online and target passes draw the same dropout mask
(CM Algorithm 2 evaluates ``f_theta`` and ``f_theta^-`` on one sample; the upstream CM code restores only the CPU
state, which leaves CUDA dropout masks unshared), and checkpoints capture every generator a run draws from so a
resumed run continues the very same streams.
"""
from __future__ import annotations

import contextlib

import torch


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global CPU RNG state and, on a CUDA device, that device's."""
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


@contextlib.contextmanager
def replay_rng(state: dict[str, torch.Tensor], device: torch.device):
    """Run the block from ``state`` (so dropout masks repeat), then continue the stream where it was."""
    after = rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(after, device)
