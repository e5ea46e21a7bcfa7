"""Speed options of the training step (docs/benchmarks.md, "Speed"): recipe keys ``train.channels_last``,
``train.compile`` and ``train.gradient_checkpointing`` (host-to-device copies that do not sync are
:func:`cmdistill.core.tensors.to_device`).

None of them changes the math: preconditioning and solver arithmetic stay in fp32 (Karras et al. 2022 run
the preconditioning in fp32 too), the options only
change how the U-Nets run. Parameters keep their default (NCHW, contiguous) layout, so checkpoints and the
exported student are byte-for-byte what they would be without the options.
"""
from __future__ import annotations

import torch
from torch import nn


def _to_channels_last(module: nn.Module, args: tuple):
    """Forward pre-hook: hand the network its 4-D input in channels-last (NHWC) memory format."""
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def use_channels_last(net: nn.Module) -> None:
    """Run ``net`` on NHWC activations: convolutions follow their input's memory format, so converting the input
    once makes every activation channels-last, while the parameters stay NCHW-contiguous (safetensors refuses
    non-contiguous tensors, so converting the weights would break checkpoints and exports)."""
    if not getattr(net, "_cmdistill_channels_last", False):
        net.register_forward_pre_hook(_to_channels_last)
        net._cmdistill_channels_last = True


def configure_networks(teacher, student, target, *, channels_last: bool = False, compile: bool = False,
                       gradient_checkpointing: bool = False) -> None:
    """Apply the speed options to the U-Nets inside the teacher adapter, the student and the target.

    * ``channels_last``: NHWC activations (:func:`use_channels_last`); helps tensor-core convolutions on GPU.
    * ``compile``: ``nn.Module.compile()`` on each U-Net (in place: state_dict keys are unchanged, no
      ``_orig_mod.`` prefix); the adapters and the boundary condition stay eager, in fp32.
    * ``gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing()`` on the student's U-Net only
      (the teacher and the target run without gradients). Recomputation replays the RNG, so dropout masks,
      losses and gradients are the same as without it.

    Call before ``accelerator.prepare`` (so DDP wraps the configured student); the evaluation EMA is left alone.
    """
    nets = list({id(n): n for n in (teacher.net, student.denoiser.net, target.denoiser.net)}.values())
    if gradient_checkpointing:
        if not getattr(student.denoiser.net, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(student.denoiser.net).__name__} does not support gradient checkpointing")
        student.denoiser.net.enable_gradient_checkpointing()
    for net in nets:
        if channels_last:
            use_channels_last(net)
        if compile:
            net.compile()
