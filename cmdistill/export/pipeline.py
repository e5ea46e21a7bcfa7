"""``ConsistencyPipeline``: a scheduler-free diffusers pipeline around a distilled student U-Net.

Its components are the student network (``unet/``), a :class:`ConsistencyConfig` (``consistency_config/``, saved
the way a scheduler is) that holds everything sampling needs -- the teacher adapter (kind + noise table / beta
config + prediction type), the boundary condition (sigma_min, sigma_max, sigma_data) and the default multistep
sigmas -- and, for a student distilled for a range of guidance scales, its guidance embedding
(``guidance_embedding/``). So ``ConsistencyPipeline(**pipe.components)`` and ``from_pipe`` rebuild the same
pipeline, as in diffusers. Needs neither accelerate nor cmdistill's training code.

Loading: ``ConsistencyPipeline.from_pretrained(dir_or_hub_id)``. diffusers' own
``DiffusionPipeline.from_pretrained(dir)`` resolves ``model_index.json``'s ``_class_name`` with
``getattr(diffusers, "ConsistencyPipeline")``, which raises ``AttributeError`` for a class diffusers does not
ship; importing cmdistill registers the class on the ``diffusers`` module (:func:`register_with_diffusers`), so
after ``import cmdistill`` that call returns a ``ConsistencyPipeline`` too, with no remote code. Its own components
(:class:`ConsistencyConfig`, :class:`GuidanceEmbeddingModel`) are recorded in ``model_index.json`` under this
module's path (``["cmdistill.export.pipeline", "ConsistencyConfig"]``), which diffusers imports to load them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import (AutoencoderKL, ConfigMixin, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput,
                       LCMScheduler, ModelMixin, SchedulerMixin, Transformer2DModel, UNet2DConditionModel, UNet2DModel,
                       VQModel)
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

from ..core.consistency import DEFAULT_BOUNDARY, ConsistencyFunction
from ..core.denoisers import build_denoiser
from ..core.guidance import GuidanceEmbedding, NativeGuidanceEmbedding
from ..core.parametrizations import DEFAULT_PARAMETRIZATION
from ..core.sampling import default_multistep_sigmas, sample_consistency
from ..core.autoencoders import decode_latents
from ..core.networks import class_rows, family_of, guidance_input, image_shape, takes_text


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
Generator = Union[torch.Generator, list[torch.Generator], None]


class StudentLoadError(ValueError):
    """A folder that is not a saved ConsistencyPipeline (missing, empty, corrupt, or another pipeline's)."""


def check_student_folder(folder: str | os.PathLike) -> Path:
    """One-line :class:`StudentLoadError` unless ``folder`` holds a ConsistencyPipeline: a ``model_index.json``
    that is JSON, names this class and a ``unet``, a ``unet/`` subfolder and the sampling configuration
    (:func:`config_file`, or the keys of a pre-component folder, :data:`LEGACY_KEYS`). A run folder is pointed to
    its ``student/``."""
    folder = Path(os.path.expanduser(str(folder)))
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise StudentLoadError(f"student folder {str(folder)!r} does not exist")
    if not index.is_file():
        if (folder / "recipe.yaml").is_file():
            hint = (f"; it is a run folder whose student is in {folder / 'student'}" if (folder / "student").is_dir()
                    else "; it is a run folder without a student (the run has not finished; resume it)")
        else:
            hint = " (expected a saved ConsistencyPipeline)"
        raise StudentLoadError(f"{folder} has no model_index.json{hint}")
    try:
        cfg = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudentLoadError(f"{index} is not valid JSON ({type(e).__name__})") from None
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if name != ConsistencyPipeline.__name__:
        raise StudentLoadError(f"{folder} holds a {name or 'unknown'} pipeline, not a ConsistencyPipeline "
                               "(a cmdistill student)")
    if not any(_component(cfg, k) and (folder / k).is_dir() for k in NETWORK_COMPONENTS):
        raise StudentLoadError(f"{folder} is incomplete: no unet/ or transformer/ subfolder")
    if not config_file(folder).is_file() and "adapter" not in cfg:
        raise StudentLoadError(f"{folder} is incomplete: no {config_file(folder).relative_to(folder)}")
    return folder


class ConsistencyConfig(SchedulerMixin, ConfigMixin):
    """What a consistency model samples with besides its networks, as a pipeline component (the role a scheduler
    plays in diffusers' pipelines; CM Algorithm 1 needs no scheduler): the teacher ``adapter`` (``kind`` and the
    teacher's ``scheduler`` config: its noise table and prediction type), the ``consistency`` function's settings
    (boundary condition, sigma_min, sigma_max, sigma_data, parametrisation, guidance) and the default
    ``multistep_sigmas`` (``{"steps": [sigma, ...]}``). Saved as ``consistency_config/consistency_config.json``
    (``save_pretrained``/``from_pretrained`` of diffusers' ``SchedulerMixin``, which the pipeline loader knows how to
    call); ``model_index.json`` records it under this module's path, found once cmdistill is imported."""

    config_name = "consistency_config.json"

    @register_to_config
    def __init__(self, adapter: dict, consistency: Optional[dict] = None, multistep_sigmas: Optional[dict] = None):
        self.register_to_config(consistency=dict(consistency or {}), multistep_sigmas=sigma_table(multistep_sigmas))


def sigma_table(table: Optional[dict]) -> dict[str, list[float]]:
    """A ``{steps: sigmas}`` table as JSON keeps it: ``{"2": [float, float], ...}`` in order of steps."""
    return {str(int(k)): [float(s) for s in v] for k, v in sorted((table or {}).items(), key=lambda kv: int(kv[0]))}


def config_file(folder: str | os.PathLike) -> Path:
    """Where a student folder keeps its :class:`ConsistencyConfig` (the component's subfolder, as a scheduler's)."""
    return Path(folder) / "consistency_config" / ConsistencyConfig.config_name


# where a folder saved before the configuration was a component kept it: in model_index.json
LEGACY_KEYS = ("adapter", "consistency", "multistep_sigmas")


def legacy_config(folder: Path) -> Optional[ConsistencyConfig]:
    """The :class:`ConsistencyConfig` of a student folder saved in the old layout (:data:`LEGACY_KEYS` in
    ``model_index.json``, no ``consistency_config/``); ``None`` for any other folder."""
    if not folder.is_dir() or config_file(folder).is_file():
        return None
    index = json.loads((folder / "model_index.json").read_text())
    return ConsistencyConfig(**{k: index[k] for k in LEGACY_KEYS if k in index}) if "adapter" in index else None


class GuidanceEmbeddingModel(ModelMixin, ConfigMixin):
    """The saved form of a student's :class:`~cmdistill.core.guidance.GuidanceEmbedding` (the guidance scale as an
    input): a diffusers model (``config.json`` + safetensors in the student's ``guidance_embedding/``) that holds the
    embedding, so ``save_pretrained``/``from_pretrained`` carry it with the U-Net. diffusers records it in
    ``model_index.json`` under this module's path and finds it once cmdistill is imported (no remote code)."""

    @register_to_config
    def __init__(self, embedding_dim: int, num_features: int = 64):
        super().__init__()
        self.embedding = GuidanceEmbedding(embedding_dim, num_features)

    @classmethod
    def wrap(cls, embedding: GuidanceEmbedding) -> "GuidanceEmbeddingModel":
        """A model around ``embedding`` itself (shared, not copied)."""
        model = cls(embedding.mlp[-1].out_features, embedding.num_features)
        model.embedding = embedding
        return model

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.embedding(w)


class StepCounted:
    """``f`` that advances a progress bar by one step per call (one network evaluation of CM Algorithm 1), so that
    :func:`~cmdistill.core.sampling.sample_consistency` drives diffusers' ``progress_bar``; the rest of ``f``
    (``sigma_min``, ``prior_mean``) reads through."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __call__(self, *args, **kwargs):
        out = self.f(*args, **kwargs)
        self.bar.update(1)
        return out


NETWORK_COMPONENTS = ("unet", "transformer")  # the denoising network's slot, named as diffusers names it
LCM_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type", "rescale_betas_zero_snr")  # what LCMScheduler takes of the teacher's schedule


def lcm_scheduler_for(student: ConsistencyFunction) -> LCMScheduler:
    """diffusers' ``LCMScheduler`` for a student of the ``lcm_scheduler`` boundary: the teacher's DDPM schedule and
    prediction type, ``timestep_scaling`` the student's ``boundary_scale`` (LCM's other defaults: 50 original
    inference steps), so ``LatentConsistencyModelPipeline`` samples the student as cmdistill does."""
    if student.boundary != "lcm_scheduler":
        raise ValueError(f"an LCMScheduler samples students of the lcm_scheduler boundary, not {student.boundary!r}")
    sched = student.denoiser.adapter_config()["scheduler"]
    return LCMScheduler(**{k: sched[k] for k in LCM_SCHEDULE_KEYS if k in sched},
                        timestep_scaling=student.boundary_scale)


def below_top(student: ConsistencyFunction) -> bool:
    """Whether the student's range stops below its teacher's top timestep (``student.sigma_max``)."""
    return student.sigma_max < float(student.denoiser.sigma_table[-1]) * (1 - 1e-6)


def lcm_timesteps(student: ConsistencyFunction, scheduler: LCMScheduler, steps: int) -> list[int]:
    """The ``steps`` teacher timesteps a ``LatentConsistencyModelPipeline`` samples this student at: ``LCMScheduler``'s
    own (its skipping of 50 original steps, from ``t = 999``) for a student of the teacher's whole range; for a
    student whose range stops lower (``student.sigma_max``), ``steps`` evenly spaced timesteps from its top ``t_max``
    down, which that pipeline takes as ``timesteps=[...]``."""
    if not below_top(student):
        scheduler.set_timesteps(steps)
        return [int(t) for t in scheduler.timesteps]
    top = int((student.denoiser.sigma_table <= student.sigma_max * (1 + 1e-6)).nonzero().max())
    return [int(top - i * (top + 1) // steps) for i in range(steps)]


def lcm_sigmas(student: ConsistencyFunction, scheduler: LCMScheduler, steps: int) -> list[float]:
    """The noise levels of :func:`lcm_timesteps`, in the student's EDM units."""
    return [float(student.denoiser.sigma_table[t]) for t in lcm_timesteps(student, scheduler, steps)]


def timesteps_at(student: ConsistencyFunction, sigmas: Sequence[float]) -> tuple[list[int], bool]:
    """The teacher timesteps nearest (in log sigma) to ``sigmas``, and whether every sigma is exactly one of theirs
    (relative 1e-6): the ``timesteps=[...]`` with which diffusers' ``LatentConsistencyModelPipeline`` samples the
    noise levels ``sigmas`` of an ``lcm_scheduler`` student (LCMScheduler steps on the teacher's integer timesteps
    only)."""
    log_table = student.denoiser.sigma_table.double().log()
    ts = [int((log_table - math.log(float(s))).abs().argmin()) for s in sigmas]
    exact = all(abs(float(log_table[t]) - math.log(float(s))) < 1e-6 for t, s in zip(ts, sigmas))
    return ts, exact


def on_timesteps(student: ConsistencyFunction, sigmas: Sequence[float]) -> list[float]:
    """``sigmas`` moved to the noise levels of their nearest teacher timesteps (:func:`timesteps_at`), order kept,
    repeats dropped: the levels at which an ``LCMScheduler`` can sample an ``lcm_scheduler`` student."""
    table = student.denoiser.sigma_table
    return list(dict.fromkeys(float(table[t]) for t in timesteps_at(student, sigmas)[0]))


def _component(index: dict, name: str) -> bool:
    """Whether a ``model_index.json`` names component ``name`` (diffusers writes ``[null, null]`` for an absent one)."""
    v = index.get(name)
    return isinstance(v, list) and len(v) == 2 and v[1] is not None


class ConsistencyPipeline(DiffusionPipeline):
    """One- or few-step sampling with a consistency model (CM Algorithm 1).

    Components: the student's network as ``unet`` (a ``UNet2DModel`` or ``UNet2DConditionModel``) or ``transformer``
    (a DiT), as diffusers names them; ``consistency_config`` (how its output becomes the consistency function);
    ``guidance_embedding`` for a student that takes the guidance scale as an input through hooks (a text U-Net takes
    it natively, ``time_cond_proj_dim``); ``vae`` for a latent student, whose samples it decodes; ``text_encoder``,
    ``tokenizer`` and ``scheduler`` (an ``LCMScheduler``) for a text student, which makes the folder a
    ``LatentConsistencyModelPipeline`` too.

    >>> pipe = ConsistencyPipeline.from_pretrained("runs/cd/student")
    >>> images = pipe(batch_size=16, num_inference_steps=1, generator=torch.manual_seed(0)).images
    """

    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    # every component has a default (a student has a unet or a transformer), so diffusers must be told they are components
    _optional_components = ["unet", "transformer", "consistency_config", "guidance_embedding", "vae", "text_encoder",
                            "tokenizer", "scheduler"]

    def __init__(self, unet: Optional[Union[UNet2DModel, UNet2DConditionModel]] = None,
                 consistency_config: Optional[ConsistencyConfig] = None,
                 guidance_embedding: Optional[GuidanceEmbeddingModel] = None,
                 transformer: Union[DiTTransformer2DModel, Transformer2DModel, None] = None,
                 vae: Union[AutoencoderKL, VQModel, None] = None, text_encoder: Optional[Any] = None,
                 tokenizer: Optional[Any] = None, scheduler: Optional[LCMScheduler] = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("a ConsistencyPipeline has one network: a unet or a transformer")
        if consistency_config is None:
            raise ValueError("a ConsistencyPipeline needs its consistency_config")
        self.register_modules(unet=unet, transformer=transformer, consistency_config=consistency_config,
                              guidance_embedding=guidance_embedding, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler)

    @property
    def network(self) -> ModelMixin:
        """The student's denoising network (the ``unet`` or the ``transformer`` component)."""
        return self.unet if getattr(self, "unet", None) is not None else self.transformer

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images it returns: the network's, or the autoencoder's pixels for a latent student."""
        c, h, w = image_shape(self.network)
        vae = getattr(self, "vae", None)
        if vae is None:
            return c, h, w
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return int(vae.config.in_channels), h * f, w * f

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """A sample of the network's space as images in about [-1, 1]: decoded by the ``vae`` of a latent student
        (:func:`~cmdistill.core.autoencoders.decode_latents`), as it is for a pixel student."""
        vae = getattr(self, "vae", None)
        return x if vae is None else decode_latents(vae, x)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, after a check of a local folder that gives one clear line
        (:class:`StudentLoadError`) for a missing, empty, corrupt or foreign folder; a folder saved before the
        configuration was a component (:func:`legacy_config`) loads too. Hub ids load as in diffusers."""
        p, legacy = Path(os.path.expanduser(str(pretrained_model_name_or_path))), None
        if p.exists() or str(pretrained_model_name_or_path).startswith((".", "/", "~")) \
                or str(pretrained_model_name_or_path).count("/") != 1:
            check_student_folder(p)
            legacy = None if "consistency_config" in kwargs else legacy_config(p)
        verbosity = diffusers_logging.get_verbosity()
        if legacy is not None:  # diffusers would warn that the old keys, read into `legacy`, are ignored
            kwargs["consistency_config"] = legacy
            diffusers_logging.set_verbosity(max(verbosity, diffusers_logging.ERROR))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            if not p.exists():
                raise
            msg = " ".join(str(e).split())[:300]
            raise StudentLoadError(f"cannot load the student in {p}: {type(e).__name__}: {msg}") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)

    @classmethod
    def from_student(cls, student: ConsistencyFunction, multistep_sigmas: Optional[dict] = None, vae=None,
                     text_encoder=None, tokenizer=None):
        """Build from a trained :class:`ConsistencyFunction` (its network and guidance embedding are shared, not
        copied); ``vae``: a latent student's autoencoder; ``text_encoder`` and ``tokenizer``: a text student's
        (with them comes an ``LCMScheduler`` of the teacher's schedule, :func:`lcm_scheduler_for`, so the folder is
        also a ``LatentConsistencyModelPipeline``)."""
        emb = student.guidance_embedding
        config = ConsistencyConfig(adapter=student.denoiser.adapter_config(), consistency=student.consistency_config(),
                                   multistep_sigmas=multistep_sigmas)
        net = student.denoiser.net
        slot = "unet" if family_of(net).name in ("unet", "unet_text", "module") else "transformer"
        text = {} if text_encoder is None else dict(text_encoder=text_encoder, tokenizer=tokenizer,
                                                    scheduler=lcm_scheduler_for(student))
        return cls(**{slot: net}, consistency_config=config, vae=vae, **text,
                   guidance_embedding=None if not isinstance(emb, GuidanceEmbedding) else
                   GuidanceEmbeddingModel.wrap(emb))

    def _components_now(self) -> tuple:
        """What :attr:`consistency_function` is built from: the components and the config's current (frozen) dict,
        which ``register_to_config`` replaces."""
        return self.network, self.guidance_embedding, self.consistency_config, self.consistency_config.config

    @property
    def consistency_function(self) -> ConsistencyFunction:
        """The student ``f(x, sigma)`` in EDM space around the current network and ``guidance_embedding``, from the
        current ``consistency_config``; rebuilt (about 0.1-0.3 ms) whenever any of them was replaced."""
        key = self._components_now()
        cached = getattr(self, "_fn_cache", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            self._fn_cache = (key, self._build_consistency_function())
        return self._fn_cache[1]

    def _build_consistency_function(self) -> ConsistencyFunction:
        """CM eq. 5's ``f`` from the components: the adapter around the network, the boundary condition and guidance."""
        ad, cc = self.consistency_config.config.adapter, dict(self.consistency_config.config.consistency)
        den = build_denoiser(self.network, ad["scheduler"], ad["kind"], strict_range=False)
        fn = ConsistencyFunction(den, boundary=cc.get("boundary", DEFAULT_BOUNDARY), sigma_min=cc.get("sigma_min"),
                                 sigma_data=cc.get("sigma_data", 0.5), boundary_scale=cc.get("boundary_scale", 10.0),
                                 parametrization=cc.get("parametrization", DEFAULT_PARAMETRIZATION))
        if "sigma_max" in cc:
            fn.sigma_max = float(cc["sigma_max"])
        fn.guidance_scale = cc.get("guidance_scale")
        native = guidance_input(self.network) is not None and "guidance_range" in cc
        if self.guidance_embedding is not None or native:  # a native input (LCM's) has no weights of its own
            fn.guidance_embedding = (NativeGuidanceEmbedding(self.network.config.time_cond_proj_dim) if native else
                                     self.guidance_embedding.embedding)
            fn.guidance_range = tuple(float(w) for w in cc.get("guidance_range", (fn.guidance_scale,) * 2))
        if cc.get("prior_mean") is not None:
            fn.prior_mean = torch.tensor(cc["prior_mean"], dtype=torch.float32)
        return fn

    # ------------------------------------------------------------------ sigmas

    @property
    def multistep_sigmas(self) -> dict[str, list[float]]:
        """The stored ``{"steps": sigmas}`` table of the ``consistency_config`` component."""
        return dict(self.consistency_config.config.multistep_sigmas or {})

    def sigmas_for(self, steps: int) -> list[float]:
        """The stored multistep sigmas for ``steps``, else the default schedule."""
        stored = self.multistep_sigmas
        if str(steps) in stored:
            return [float(s) for s in stored[str(steps)]]
        fn = self.consistency_function
        return default_multistep_sigmas(fn.sigma_min, fn.sigma_max, steps)

    def check_sigmas(self, sigmas: Sequence[float]) -> list[float]:
        """``sigmas`` as floats: non-empty, strictly descending, inside ``(sigma_min, sigma_max]``."""
        fn = self.consistency_function
        sigmas = [float(s) for s in sigmas]
        if not sigmas:
            raise ValueError("sigmas must hold at least one noise level")
        if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be strictly descending, got {sigmas}")
        if sigmas[-1] <= fn.sigma_min or sigmas[0] > fn.sigma_max * (1 + 1e-6):
            raise ValueError(f"sigmas must lie in ({fn.sigma_min:.4g}, {fn.sigma_max:.4g}], got {sigmas}")
        return sigmas

    def set_multistep_sigmas(self, table: dict) -> None:
        """Replace the stored ``{steps: sigmas}`` table (e.g. after ``cmdistill evaluate --search-sigmas``) in the
        ``consistency_config`` component (shared with pipelines built from this one's components, as diffusers
        shares a scheduler); ``save_pretrained`` then writes it to ``consistency_config/consistency_config.json``."""
        merged = self.multistep_sigmas
        for k, v in table.items():
            sig = self.check_sigmas(v)
            if len(sig) != int(k):
                raise ValueError(f"{k}-step sigmas must hold {k} values, got {sig}")
            merged[str(int(k))] = sig
        self.consistency_config.register_to_config(multistep_sigmas=sigma_table(merged))

    # ------------------------------------------------------------------ sampling

    def text_conditioning(self, prompt, prompt_embeds, num_images_per_prompt: int, device) -> dict:
        """``{"encoder_hidden_states": [B, L, D]}`` for a text student, from ``prompt`` (a string or a list, embedded
        by its tokenizer and text encoder as diffusers' Stable Diffusion pipelines do) or ``prompt_embeds``, each
        repeated ``num_images_per_prompt`` times in a row (diffusers' order); ``{}`` for other students."""
        if not takes_text(self.network):
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("this student takes no text: call it without prompt / prompt_embeds")
            return {}
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("this student is text-conditional: pass prompt (a string or a list) or prompt_embeds")
        if prompt_embeds is None:
            from ..prompts import PromptEncoder

            if getattr(self, "text_encoder", None) is None or getattr(self, "tokenizer", None) is None:
                raise ValueError("this student has no text_encoder / tokenizer: pass prompt_embeds")
            prompt_embeds = PromptEncoder(self.tokenizer, self.text_encoder)(prompt)
        emb = prompt_embeds.to(device, torch.float32).repeat_interleave(int(num_images_per_prompt), dim=0)
        return {"encoder_hidden_states": emb}

    def conditioning(self, class_labels, batch_size: int, device) -> dict:
        """``{"class_labels": tensor}`` for a class-conditional student, ``{}`` for an unconditional one; a
        ``ValueError`` (one line) when the labels do not fit the student."""
        n = class_rows(self.network)
        if n is None:
            if class_labels is not None:
                raise ValueError("this student is unconditional: call it without class_labels")
            return {}
        if class_labels is None:
            raise ValueError(f"this student is class-conditional ({n} class embeddings): pass class_labels (an int, "
                             "a list or a tensor)")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"class_labels holds {labels.numel()} labels for {batch_size} images")
        if int(labels.min()) < 0 or int(labels.max()) >= n:
            raise ValueError(f"class_labels must lie in [0, {n - 1}], got {labels.tolist()[:8]}")
        return {"class_labels": labels.to(device)}

    def guidance(self, guidance_scale: Optional[float]) -> dict:
        """``{"guidance_scale": w}`` for a student with a guidance embedding (``None``: its default), ``{}`` for one
        with its scale built in; a ``ValueError`` (one line) for a scale the student was not distilled for."""
        fn = self.consistency_function
        if fn.guidance_embedding is not None:
            lo, hi = fn.guidance_range
            w = fn.guidance_scale if guidance_scale is None else float(guidance_scale)
            if not lo - 1e-6 <= w <= hi + 1e-6:
                raise ValueError(f"this student was distilled for guidance scales in [{lo:g}, {hi:g}]; it cannot "
                                 f"sample at guidance_scale={w:g}")
            return {"guidance_scale": w}
        if guidance_scale is not None and guidance_scale != (fn.guidance_scale or 1.0):
            built_in = (f"was distilled at guidance scale {fn.guidance_scale:g}" if fn.guidance_scale is not None
                        else "has no guidance built in")
            raise ValueError(f"this student {built_in}; it cannot sample at guidance_scale={guidance_scale:g}")
        return {}

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' property walks every module for offloading hooks on each call (about 1-3 ms on CPU for these
        U-Nets: 5 % of a small 1-step batch); the walk only matters when weights may be offloaded, i.e. when they
        sit on the CPU or the meta device while an accelerator exists, so only then is it taken."""
        p = next(self.network.parameters(), None)
        if p is not None and not hasattr(self.network, "_hf_hook"):
            if p.device.type not in ("cpu", "meta"):
                return p.device
            has_acc = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
            if p.device.type == "cpu" and not has_acc:
                return p.device
        return super()._execution_device

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, sigmas: Optional[Sequence[float]] = None,
                 generator: Generator = None, latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True, clip_denoised: bool = False,
                 class_labels: Union[int, Sequence[int], torch.Tensor, None] = None,
                 guidance_scale: Optional[float] = None, prompt: Union[str, list[str], None] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, num_images_per_prompt: int = 1,
                 negative_prompt: Union[str, list[str], None] = None):
        """Sample ``batch_size`` images in ``num_inference_steps`` network evaluations (CM Algorithm 1).

        ``sigmas`` (descending, ``sigmas[0]`` usually ``sigma_max``) overrides the stored schedule and sets the
        number of steps. ``latents``: the unit-Gaussian starting noise ``z`` (``[B, C, H, W]``); default drawn
        from ``generator`` (a generator or one per image, as in diffusers). ``output_type``: ``"pil"`` (list of
        PIL images), ``"np"`` (NHWC float in [0, 1]), ``"pt"`` (NCHW float in [0, 1]) or ``"latent"`` (the raw
        NCHW sample in the network's space: pixels nominally in [-1, 1], or a latent student's latents, undecoded). ``clip_denoised``: clamp each intermediate
        sample to [-1, 1] before it is noised again, as CM's code and diffusers' ``CMStochasticIterativeScheduler``
        do; off by default, since it made the digits student's 2-4-step FIDs worse
        (:func:`~cmdistill.core.sampling.sample_consistency`). ``class_labels``: for a class-conditional student,
        one int for the whole batch, or one label per image (a list or a tensor), as diffusers' ``DiTPipeline``;
        ``None`` for an unconditional student. ``guidance_scale``: the teacher's classifier-free guidance scale
        ``w``. A student distilled at one ``w`` has it built in and refuses any other; a student distilled for a range
        of ``w`` (a guidance embedding) samples at any ``w`` of that range; ``None``: the student's default.
        ``prompt`` / ``prompt_embeds`` / ``num_images_per_prompt``: a text student's condition, as in diffusers'
        Stable Diffusion and LCM pipelines (``batch_size`` is then the number of prompts times
        ``num_images_per_prompt``; the guidance scale is the student's input, as LCM's: a ``negative_prompt``, which
        would need the second, unconditional pass that distillation removed, is refused in one line).
        Progress: diffusers' ``progress_bar``, one step per network evaluation (``set_progress_bar_config``).
        """
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if negative_prompt is not None:
            raise ValueError("a consistency student has classifier-free guidance distilled in (one pass per step, as "
                             "LCM): it takes no negative_prompt")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        fn = self.consistency_function
        guidance = self.guidance(guidance_scale)
        sigmas = self.check_sigmas(sigmas if sigmas is not None else self.sigmas_for(num_inference_steps))
        device = self._execution_device
        text = self.text_conditioning(prompt, prompt_embeds, num_images_per_prompt, device)
        if text:
            batch_size = text["encoder_hidden_states"].shape[0]
        if latents is None:
            latents = randn_tensor((batch_size, *image_shape(self.network)), generator=generator, device=device,
                                   dtype=torch.float32)

        def noise(shape, dtype, dev):
            return randn_tensor(shape, generator=generator, device=dev, dtype=dtype)

        cond = {**self.conditioning(class_labels, latents.shape[0], device), **text, **guidance}
        with self.progress_bar(total=len(sigmas)) as bar:
            x = sample_consistency(StepCounted(fn, bar), latents.to(device, torch.float32), sigmas, noise_fn=noise,
                                   clip_denoised=clip_denoised, **cond)
        if output_type == "latent":
            out: Any = x
        else:
            images = (self.decode(x) / 2 + 0.5).clamp(0, 1)
            out = images if output_type == "pt" else images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def save_student(fn: ConsistencyFunction, folder: str | os.PathLike, multistep_sigmas: Optional[dict] = None,
                 card: Optional[dict] = None, vae=None, text_encoder=None, tokenizer=None) -> Path:
    """Save a trained consistency function as a ``ConsistencyPipeline`` folder with a model card (``README.md``,
    :func:`write_model_card`; ``card`` holds what the card says about the teacher and the run), atomically: written
    into a temporary sibling folder, then moved into place. Default multistep sigmas for 2-4 steps are stored unless
    given."""
    from ..files import make_readable, replace_dir

    folder = Path(folder)
    if multistep_sigmas is None and fn.boundary == "lcm_scheduler":  # LCMScheduler's own timesteps
        multistep_sigmas = {k: lcm_sigmas(fn, lcm_scheduler_for(fn), k) for k in (2, 3, 4)}
    if multistep_sigmas is None:
        multistep_sigmas = {k: default_multistep_sigmas(fn.sigma_min, fn.sigma_max, k) for k in (2, 3, 4)}
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = ConsistencyPipeline.from_student(fn, multistep_sigmas, vae, text_encoder, tokenizer)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    write_model_card(tmp, pipe, **(card or {}))
    make_readable(tmp)
    replace_dir(tmp, folder)
    return folder


CARD_EVALUATION = "## Evaluation"


def lcm_timesteps_note(fn: ConsistencyFunction, sigmas: dict[int, list[float]]) -> str:
    """For an ``lcm_scheduler`` student sampled at other noise levels than ``LCMScheduler``'s own (``sigmas``,
    ``{steps: [...]}``: a range below the teacher's top, or levels found by ``evaluate --search-sigmas``): the
    ``timesteps`` to pass diffusers' pipeline; "" when its own are the same."""
    if fn.boundary != "lcm_scheduler":
        return ""
    sched, chosen, exact, lower = lcm_scheduler_for(fn), {}, True, below_top(fn)
    for k, sig in sorted(sigmas.items()):
        chosen[k], on_table = timesteps_at(fn, sig)
        exact = exact and on_table
    if not lower and all(ts == lcm_timesteps(fn, sched, k) for k, ts in chosen.items()):
        return ""
    steps = "; ".join(f"{k} step{'s' if k > 1 else ''} `timesteps={ts}`" for k, ts in chosen.items())
    why = (f"it was distilled below the teacher's top, up to sigma {fn.sigma_max:.4g}" if lower else
           "its stored noise levels are not LCMScheduler's own")
    near = "" if exact else " (the nearest timesteps: some stored noise levels lie between two)"
    return f" when given the timesteps it is sampled at ({why}){near}: {steps}"


def write_model_card(folder: str | os.PathLike, pipe: "ConsistencyPipeline", teacher: str = "unknown",
                     recipe: str = "unknown", steps: Optional[int] = None, evaluation: Optional[str] = None) -> Path:
    """``README.md`` of a student folder, as diffusers / Hub repositories have: what the model is, its teacher and
    recipe, how to load it (``import cmdistill`` registers the class with diffusers) and the evaluation table
    (``evaluation``: markdown, or a note that the run was not evaluated)."""
    fn = pipe.consistency_function
    c, h, w = pipe.image_shape
    stored = pipe.multistep_sigmas
    conditional = class_rows(pipe.network) is not None
    text = takes_text(pipe.network)
    tag = ("text-to-image" if text else "class-conditional-image-generation" if conditional
           else "unconditional-image-generation")
    call = ("prompt=\"a photo of a sneaker\", num_images_per_prompt=4, num_inference_steps=1" if text else
            "batch_size=16, num_inference_steps=1" + (", class_labels=3" if conditional else ""))
    if fn.guidance_range is not None:
        call += f", guidance_scale={fn.guidance_scale:g}"
        about_w = (f" It takes the classifier-free guidance scale as an input: any `guidance_scale` in "
                   f"[{fn.guidance_range[0]:g}, {fn.guidance_range[1]:g}] (default {fn.guidance_scale:g}).")
    elif fn.guidance_scale is not None:
        about_w = f" Classifier-free guidance at w = {fn.guidance_scale:g} is built in."
    else:
        about_w = ""
    lines = [
        "---", "library_name: diffusers", f"tags: [consistency-model, cmdistill, {tag}]", "---",
        "", f"# Consistency model distilled from `{teacher}`", "",
        f"A 1-4 step consistency model (Song et al. 2023, \"Consistency Models\", Algorithm 2) distilled with "
        f"cmdistill from the diffusers teacher `{teacher}` with the recipe `{recipe}`"
        + (f" for {steps} optimiser steps" if steps else "") + ". It generates "
        f"{c}x{h}x{w} images; its noise range is sigma in ({fn.sigma_min:.4g}, {fn.sigma_max:.4g}] "
        f"(EDM units), boundary `{fn.boundary}`"
        + (", sampling starts from the data mean plus noise" if fn.prior_mean is not None else "") + "."
        + (" It is class-conditional (`class_labels`: one int, a list or a tensor)." if conditional else "")
        + (" It is text-conditional (`prompt` or `prompt_embeds`); the same folder loads in diffusers' "
           "`LatentConsistencyModelPipeline` (with `safety_checker=None, feature_extractor=None, "
           "requires_safety_checker=False`), which samples it the same way"
           + lcm_timesteps_note(fn, {k: pipe.sigmas_for(k) for k in (1, 2, 3, 4)}) + "."
           if text else "")
        + about_w, "",
        "## Use", "", "```python", "import cmdistill  # registers ConsistencyPipeline with diffusers",
        "from diffusers import DiffusionPipeline", "",
        "pipe = DiffusionPipeline.from_pretrained(\"path/to/this/folder\")",
        f"images = pipe({call}).images  # 1-4 steps", "```", "",
        "Stored multistep noise levels: "
        + ("; ".join(f"{k} steps {[round(float(s), 4) for s in v]}" for k, v in stored.items()) or "defaults") + ".",
        "", CARD_EVALUATION, "",
        evaluation or "Not evaluated yet: `cmdistill evaluate RUN_DIR` measures it against its teacher.", "",
    ]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path


def register_with_diffusers() -> None:
    """Expose the class as ``diffusers.ConsistencyPipeline`` so ``DiffusionPipeline.from_pretrained(dir)`` finds
    it (diffusers looks ``_class_name`` up on its own module); never overrides a class diffusers ships."""
    import diffusers

    try:
        getattr(diffusers, ConsistencyPipeline.__name__)
    except (AttributeError, ImportError, RuntimeError):
        setattr(diffusers, ConsistencyPipeline.__name__, ConsistencyPipeline)


register_with_diffusers()
