"""The network seam: how each diffusers model family is called, what its output means, which conditions it takes and
what "no condition" is, and where a guidance-scale embedding enters it (k-diffusion's ``external.py`` idea: the
adapter, not the sampler, owns the model call).

Everything above this module speaks the denoiser contract ``D(x, sigma, **cond)``; the teacher adapters
(:mod:`.denoisers`) turn ``sigma`` into the network's input scaling and timestep and hand the call to the
:class:`Family` of the network, found by its class name in :data:`FAMILIES`. Solvers, the consistency loss and the
samplers never see any of it. A family this module does not know is refused in one line naming the class.

- ``UNet2DModel`` (DDPM, ADM-style pixel U-Nets): ``net(x, t, class_labels=y)``; class labels through
  ``num_class_embeds``; a guidance embedding is added to ``net.time_embedding``'s output.
- ``DiTTransformer2DModel`` and the DiT form of ``Transformer2DModel`` (Peebles & Xie 2023, "Scalable diffusion
  models with transformers"): ``net(x, timestep=t, class_labels=y)``; ``num_embeds_ada_norm`` classes and one extra
  row, the null class, that diffusers' ``DiTPipeline`` uses for guidance; a learned-variance output (``2C`` channels
  for ``C``, Nichol & Dhariwal 2021) is cut to its first ``C`` channels as ``DiTPipeline`` does; a guidance embedding
  is added to every block's conditioning embedding (``norm1.emb``, time + class), which also feeds the output layer.
- ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x, Rombach et al. 2022): ``net(x, t, encoder_hidden_states=c)``
  with ``c`` the prompt's text-encoder states; "no condition" is the empty prompt's embedding, which only the
  teacher's text encoder can compute (the caller passes it as ``null``). The guidance scale enters through the
  network's **native** input when it has one: ``time_cond_proj_dim`` takes ``timestep_cond``, diffusers' guidance-scale
  embedding (as LCM's students do, so diffusers' ``LatentConsistencyModelPipeline`` runs them); else it is added
  to the time embedding as for ``UNet2DModel``. SDXL (``addition_embed_type: text_time``, two text encoders) is refused
  in one line.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class UnsupportedNetwork(ValueError):
    """A network whose family the seam does not know (named in one line)."""


def _config(net):
    return getattr(net, "config", None)


def _unet_call(net, x, t, cond):
    return net(x, t, **cond)


def _dit_call(net, x, t, cond):
    return net(x, timestep=t, **cond)


def _unet_class_rows(net) -> int | None:
    n = getattr(_config(net), "num_class_embeds", None)
    return int(n) if n else None


def _dit_class_rows(net) -> int | None:
    """``num_embeds_ada_norm`` classes plus the null row of diffusers' ``LabelEmbedding`` (present when its label
    dropout was non-zero at construction, as diffusers always builds DiT)."""
    table = _dit_label_tables(net)
    return int(table[0].embedding_table.num_embeddings) if table else None


def _dit_label_tables(net) -> list[nn.Module]:
    return [m.class_embedder for m in _dit_sites(net) if getattr(m, "class_embedder", None) is not None]


def _unet_sites(net) -> list[nn.Module]:
    emb = getattr(net, "time_embedding", None)
    return [emb] if emb is not None else []


def _dit_sites(net) -> list[nn.Module]:
    blocks = getattr(net, "transformer_blocks", None) or []
    return [b.norm1.emb for b in blocks if getattr(getattr(b, "norm1", None), "emb", None) is not None]


def _site_width(site: nn.Module) -> int:
    """Width of an embedding's output: its last ``nn.Linear`` (``linear_2`` of diffusers' ``TimestepEmbedding``)."""
    last = getattr(site, "linear_2", None) or getattr(getattr(site, "timestep_embedder", None), "linear_2", None)
    if not isinstance(last, nn.Linear):
        raise UnsupportedNetwork(f"cannot read the width of {type(site).__name__}")
    return last.out_features


def _dit_refusal(net) -> str | None:
    cfg = _config(net)
    if getattr(cfg, "norm_type", "ada_norm_zero") != "ada_norm_zero" or getattr(cfg, "patch_size", None) is None:
        return (f"{type(net).__name__} with norm_type={getattr(cfg, 'norm_type', None)!r}, "
                f"patch_size={getattr(cfg, 'patch_size', None)!r} is not a DiT (patched, ada_norm_zero); cmdistill "
                "reads class-conditional DiT transformers")
    if getattr(cfg, "cross_attention_dim", None):
        return f"{type(net).__name__} with cross-attention is a text-conditional model, which cmdistill does not read"
    return None


def _no_label_dropout(net) -> None:
    """Turn off diffusers' in-network label dropout (``LabelEmbedding`` drops labels at random in train mode): the
    caller drops labels itself, from the RNG the training loop checkpoints, and a student in train mode must see the
    labels it is given. The null row stays (it is sized at construction)."""
    for table in _dit_label_tables(net):
        table.dropout_prob = 0.0


def _class_condition_keys(net) -> tuple[str, ...]:
    return ("class_labels",) if _family_rows(net) is not None else ()


def _class_null_condition(net, null: int | None = None) -> dict:
    return {"class_labels": torch.tensor(null_class(net, null))}


def _text_refusal(net) -> str | None:
    cfg = _config(net)
    if getattr(cfg, "addition_embed_type", None):
        return (f"{type(net).__name__} with addition_embed_type={cfg.addition_embed_type!r} (SDXL-style added "
                "conditions: pooled text embeddings and size/crop ids) is not read yet; cmdistill reads Stable "
                "Diffusion 1.x / 2.x U-Nets (cross-attention on one text encoder's states)")
    if not getattr(cfg, "cross_attention_dim", None):
        return f"{type(net).__name__} without cross_attention_dim has no text condition to read"
    return None


def _text_condition_keys(net) -> tuple[str, ...]:
    return ("encoder_hidden_states",) + _class_condition_keys(net)


def _text_null_condition(net, null=None) -> dict:
    """The empty prompt's text-encoder states (``null``: a ``[1, L, D]`` tensor, or a dict with them), as diffusers'
    Stable Diffusion pipelines embed ``""`` for classifier-free guidance."""
    if isinstance(null, dict):
        null = null.get("encoder_hidden_states")
    if not torch.is_tensor(null) or null.ndim != 3:
        raise ValueError(f"the null condition of a text-conditional {type(net).__name__} is the empty prompt's "
                         "embedding ([1, L, D], from the teacher's text encoder): pass it as null")
    return {"encoder_hidden_states": null}


def _native_guidance_input(net) -> str | None:
    """``timestep_cond`` for a U-Net built with ``time_cond_proj_dim`` (diffusers' guidance-scale embedding enters
    its time embedding through ``cond_proj``), else ``None``."""
    return "timestep_cond" if getattr(_config(net), "time_cond_proj_dim", None) else None


def _text_unet_with_guidance_input(net, dim: int):
    """A copy of a text U-Net built with ``time_cond_proj_dim = dim`` and the same weights, its new ``cond_proj``
    zero (so it computes what ``net`` computes until training moves it: the ControlNet zero start); ``net`` itself
    when it already has the input."""
    if getattr(net.config, "time_cond_proj_dim", None):
        return net
    new = type(net).from_config({**dict(net.config), "time_cond_proj_dim": int(dim)})
    missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise ValueError(f"cannot add time_cond_proj_dim to {type(net).__name__}: keys {missing or unexpected}")
    nn.init.zeros_(new.time_embedding.cond_proj.weight)
    first = next(net.parameters())
    nn.Module.to(new, first.device, first.dtype)  # torch's own: diffusers' override warns of fp32-kept modules
    return new.train(net.training).requires_grad_(first.requires_grad)


def _family_rows(net):
    return family_of(net).class_rows(net)


@dataclass(frozen=True)
class Family:
    """One diffusers model family as the seam knows it."""

    name: str
    classes: frozenset[str]
    call: Callable  # (net, x, t, cond) -> raw output (a diffusers output, tuple or tensor)
    class_rows: Callable  # net -> rows of its class-label table (classes + null), None when unconditional
    sites: Callable  # net -> the modules whose output a guidance-scale embedding is added to
    refusal: Callable = lambda net: None  # net -> why this member of the family is not read (None: read)
    prepare: Callable = lambda net: None  # net -> None: make the network fit for the seam's training (in place)
    condition_keys: Callable = _class_condition_keys  # net -> the condition keywords it takes beyond x and t
    null_condition: Callable = _class_null_condition  # (net, null) -> the one-sample condition of "no condition"
    guidance_input: Callable = lambda net: None  # net -> the keyword of a native guidance-scale input, if it has one
    add_guidance_input: Callable = lambda net, dim: net  # (net, dim) -> the network with a native input, if it can


FAMILIES: dict[str, Family] = {
    "unet": Family("unet", frozenset({"UNet2DModel"}), _unet_call, _unet_class_rows, _unet_sites),
    "dit": Family("dit", frozenset({"DiTTransformer2DModel", "Transformer2DModel"}), _dit_call, _dit_class_rows,
                  _dit_sites, _dit_refusal, _no_label_dropout),
    "unet_text": Family("unet_text", frozenset({"UNet2DConditionModel"}), _unet_call, _unet_class_rows, _unet_sites,
                        _text_refusal, condition_keys=_text_condition_keys, null_condition=_text_null_condition,
                        guidance_input=_native_guidance_input, add_guidance_input=_text_unet_with_guidance_input),
    # a torch module of one's own (not a diffusers model): called as ``net(x, t, **cond)``, as a UNet2DModel is
    "module": Family("module", frozenset(), _unet_call, _unet_class_rows, _unet_sites),
}


def family_of(net) -> Family:
    """The :class:`Family` of ``net`` by its class name (a subclass counts as its diffusers base; a torch module that
    is not a diffusers model is the ``module`` family); an :class:`UnsupportedNetwork` naming the class for a
    diffusers model of no known family, or one its family refuses."""
    names = [c.__name__ for c in type(net).__mro__]
    for fam in FAMILIES.values():
        if any(n in fam.classes for n in names):
            reason = fam.refusal(net)
            if reason:
                raise UnsupportedNetwork(reason)
            return fam
    if "ModelMixin" not in names:
        return FAMILIES["module"]
    known = ", ".join(sorted(c for f in FAMILIES.values() for c in f.classes))
    raise UnsupportedNetwork(f"cmdistill does not know how to call a {type(net).__name__} (it reads {known})")


def call_network(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The network's prediction for ``x`` at timestep ``t``: its family's call, the tensor out of diffusers' output,
    and of a learned-variance output the first ``C`` channels (the mean's parametrisation; the variance is unused by
    deterministic samplers). A DistributedDataParallel wrapper is called as the model it wraps is."""
    out = family_of(getattr(net, "module", net)).call(net, x, t, cond)
    out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
    c = x.shape[1]
    return out[:, :c] if out.shape[1] == 2 * c else out


def class_rows(net) -> int | None:
    """Rows of ``net``'s class-label table (its classes and the null class), ``None`` for an unconditional network
    or a model of an unknown family."""
    try:
        return family_of(net).class_rows(net)
    except UnsupportedNetwork:
        return None


def condition_keys(net) -> tuple[str, ...]:
    """The condition keyword arguments ``net`` takes beyond ``x`` and ``t`` (its family's)."""
    return family_of(net).condition_keys(net)


def null_condition(net, null: int | None = None) -> dict:
    """The condition that stands for "no condition" as one sample's dict (its family's: for class-conditional
    networks the null class, :func:`null_class`, ``null`` overriding it)."""
    return family_of(net).null_condition(net, null)


def null_class(net: nn.Module, null: int | None = None) -> int:
    """The label that stands for "no class" in a class-conditional network: ``null`` when given, else the last row of
    its class table (the label its training substituted when it dropped a label, cmdistill's ``train.label_dropout``;
    diffusers' ``DiTPipeline`` uses the same convention, class 1000 of 1001). The one place this convention lives."""
    n = class_rows(net)
    if n is None:
        raise ValueError(f"{type(net).__name__} is not class-conditional (no class embedding table): it has no null "
                         "class")
    null = n - 1 if null is None else int(null)
    if not 0 <= null < n:
        raise ValueError(f"the null class must lie in [0, {n - 1}], got {null}")
    return null


def embedding_width(net) -> int:
    """Width of the vector a guidance-scale embedding adds (the output of the family's embedding sites)."""
    sites = family_of(net).sites(net)
    if not sites:
        raise ValueError(f"a guidance embedding needs a time or conditioning embedding in {type(net).__name__}")
    return _site_width(sites[0])


def guidance_input(net) -> str | None:
    """The keyword of ``net``'s native guidance-scale input (``timestep_cond`` of a U-Net with
    ``time_cond_proj_dim``), ``None`` when a guidance embedding must be added to its embeddings instead."""
    return family_of(net).guidance_input(net)


def with_guidance_input(net, dim: int):
    """``net`` with a native guidance-scale input of width ``dim`` where its family can add one (a text U-Net:
    ``time_cond_proj_dim``), else ``net`` unchanged."""
    return family_of(net).add_guidance_input(net, dim)


def takes_text(net) -> bool:
    """Whether ``net`` cross-attends to text: its condition is ``encoder_hidden_states`` (a text encoder's states)."""
    return "encoder_hidden_states" in condition_keys(net)


def is_conditional(net) -> bool:
    """Whether ``net`` takes a condition (class labels, text states) that classifier-free guidance can drop."""
    try:
        return bool(family_of(net).condition_keys(net))
    except UnsupportedNetwork:
        return False


@contextmanager
def guidance_entered(net: nn.Module, embedding: torch.Tensor):
    """Within the block ``net`` sees the guidance-scale ``embedding``: the block yields the extra condition to pass
    (``{"timestep_cond": embedding}`` for a native input), or ``{}`` while the embedding is added to every
    embedding site (:func:`added_to_embedding`)."""
    key = guidance_input(net)
    if key is not None:
        yield {key: embedding}
        return
    with added_to_embedding(net, embedding):
        yield {}


@contextmanager
def added_to_embedding(net: nn.Module, extra: torch.Tensor):
    """Within the block, every embedding site of ``net`` (the U-Net's time embedding, each DiT block's conditioning
    embedding) returns its output plus ``extra`` (``[B, width]``)."""
    hook = lambda module, args, out: out + extra.to(out.device, out.dtype)  # noqa: E731
    handles = [site.register_forward_hook(hook) for site in family_of(net).sites(net)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def prepare_network(net) -> None:
    """Make ``net`` fit for training under the seam (in place; see each family's ``prepare``)."""
    family_of(net).prepare(net)


def image_shape(net) -> tuple[int, int, int]:
    """``(C, H, W)`` a diffusers image network works at (its ``sample_size`` is an int or an ``(H, W)`` pair)."""
    cfg = net.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return int(cfg.in_channels), int(size), int(size)
