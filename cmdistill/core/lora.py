"""LoRA students (Hu et al. 2022, "LoRA: Low-rank adaptation of large language models"; Luo et al. 2023,
"LCM-LoRA"): low-rank adapters, through peft, on the teacher's *own* network.

One copy of the base weights serves every network of the distillation: the teacher is the base with the adapters
off, and the student, the CD target and the evaluation EMA are three adapters of the same rank on the same layers
(``student``, ``target``, ``ema``), each switched on for its own calls by its denoiser (:func:`adapter_active`, which
:meth:`~cmdistill.core.denoisers.Denoiser.run_net` enters). Only the student's adapter trains; the target and the EMA
follow it over the adapter tensors alone (:func:`adapter_tensors`), so they cost two adapters' memory, not two
networks'. :func:`merged_network` folds one adapter into a plain copy of the network (the exported student).
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .tensors import lerp_toward

ADAPTERS = ("student", "target", "ema")
# LCM-LoRA's layers (diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py): attention
# projections, feed-forwards, the ResNet convolutions and time projections, down- and upsamplers
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                          "time_emb_proj")


@dataclass(frozen=True)
class LoraSpec:
    """The adapters' shape: ``rank`` r, ``alpha`` (the update is scaled by alpha / r), the layers they wrap."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          init_lora_weights=True)


def add_adapters(net: nn.Module, spec: LoraSpec, names=ADAPTERS) -> nn.Module:
    """Wrap ``spec.target_modules`` of ``net`` (in place) with one LoRA adapter per name, all in fp32 and starting as
    the first (peft's init: ``A`` random, ``B`` zero, so every adapter starts as the base network); the base weights
    are frozen, the first adapter trains and is the one switched on outside :func:`adapter_active`, the others do
    not train. A ``ValueError`` names layers that match nothing."""
    from peft import inject_adapter_in_model

    net.requires_grad_(False)
    for name in names:
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                inject_adapter_in_model(spec.peft_config(), net, adapter_name=name)
        except ValueError as e:
            raise ValueError(f"LoRA target modules {list(spec.target_modules)} fit no layer of "
                             f"{type(net).__name__}: {str(e).splitlines()[0]}") from None
    with torch.no_grad():
        for name in names:  # peft creates them in the base's dtype: fp32 master weights whatever the base's
            for t in adapter_tensors(net, name):
                t.data = t.data.float()
        first = adapter_tensors(net, names[0])
        for name in names[1:]:
            torch._foreach_copy_(adapter_tensors(net, name), first)
    for layer in _tuner_layers(net):  # at rest the student's adapter is on (peft leaves the last one injected on):
        layer.set_adapter(names[0])   # what gradient checkpointing's recomputation in backward runs with
    for name in names:
        for t in adapter_tensors(net, name):
            t.requires_grad_(name == names[0])
    return net


def has_adapters(net: nn.Module) -> bool:
    """Whether peft injected adapters into ``net``."""
    return getattr(net, "peft_config", None) is not None


def _tuner_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The parameters of adapter ``name`` by their names in ``net``, in module order (a fixed order: the lerps of
    target and EMA pair them)."""
    marker = f".{name}."
    return {n: p for n, p in net.named_parameters() if "lora_" in n and marker in f".{n}."}


def adapter_tensors(net: nn.Module, name: str) -> list[torch.Tensor]:
    """:func:`adapter_parameters` as a list."""
    return list(adapter_parameters(net, name).values())


@contextmanager
def adapter_active(net: nn.Module, name: str | None):
    """Within the block ``net`` computes with adapter ``name`` only, or with none (``None``: the base, the
    teacher). peft's switches also set ``requires_grad``; the flags are put back on leaving, so the student's
    adapter still receives its gradient when another view ran between its forward and backward passes."""
    layers = _tuner_layers(net)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    before = [(layer.active_adapters, layer.disable_adapters) for layer in layers]
    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    try:
        yield
    finally:
        for layer, (active, disabled) in zip(layers, before):
            layer.enable_adapters(True)
            layer.set_adapter(active)
            if disabled:
                layer.enable_adapters(False)
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def follow_adapter(net: nn.Module, dst: str, src: str, mu: float) -> None:
    """``dst <- mu dst + (1 - mu) src`` over the two adapters' tensors (a copy at ``mu = 0``): CM's target update and
    the evaluation EMA, on the adapters alone."""
    lerp_toward(adapter_tensors(net, dst), [t.detach() for t in adapter_tensors(net, src)], mu)


def adapter_state_dict(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under peft's names without the adapter name (``...to_q.lora_A.weight``), as
    ``peft.get_peft_model_state_dict`` gives them and diffusers' LoRA files store them (with a component prefix)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(net, adapter_name=name).items()}


def merged_network(net: nn.Module, name: str) -> nn.Module:
    """A plain fp32 copy of ``net`` (its own class, no peft layers) with adapter ``name`` folded into its weights
    (``W + (alpha / r) B A``, peft's merge, in fp32); ``net`` is untouched."""
    work = copy.deepcopy(net).float()  # merged in fp32: a small update would round away on an fp16 weight
    for layer in _tuner_layers(work):
        if name in layer.lora_A:
            layer.merge(adapter_names=[name])
    state = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    if not hasattr(net, "from_config"):
        raise ValueError(f"cannot rebuild a plain {type(net).__name__} (no from_config) to merge a LoRA into")
    plain = type(net).from_config(net.config)
    plain.load_state_dict(state, strict=True)
    first = next(net.parameters())
    return nn.Module.to(plain, first.device).train(net.training).requires_grad_(False)
