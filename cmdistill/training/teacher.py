"""Train a small DDPM teacher (Ho et al. 2020, "Denoising diffusion probabilistic models", Algorithm 1) as a task of
the one training loop (:mod:`.loop`), and export it as a diffusers pipeline folder.

This is how the shipped teachers were made: a diffusers ``UNet2DModel`` (``model: unet``; exported as a
``DDPMPipeline``) or a class-conditional ``DiTTransformer2DModel`` (``model: dit``, Peebles & Xie 2023) on the latents
of a package-made autoencoder (``latent.vae``, encoded once through :mod:`cmdistill.latents`; exported as a
``DiTPipeline`` with the autoencoder and a ``DDIMScheduler``), trained to predict ``epsilon`` (or ``v`` / ``x0``) under
a ``DDPMScheduler``, with an ema-pytorch EMA of its weights, which is what gets exported. Its recipe is
:class:`cmdistill.config.TeacherRecipe`, read by the same strict loader as the distillation recipe; ``model:
autoencoder`` trains the autoencoder itself (:mod:`.autoencoder`).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..config import ConfigError, NoiseConfig, TeacherRecipe, TextEncoderConfig, TransformerConfig, UNetConfig
from ..core.networks import call_network, class_rows, image_shape, null_class, prepare_network
from ..data import check_fits, make_dataset, num_labels, random_hflip
from ..images import save_grid
from .ema import make_eval_ema
from .optim import make_lr_schedule, make_optimizer


def build_unet(cls, section: str, kw: dict):
    """``cls(**kw)`` for a diffusers U-Net of a recipe section (``out_channels`` = ``in_channels``, block lists as
    tuples); a shape error is one recipe line naming ``section``."""
    kw = {**kw, "out_channels": kw["in_channels"]}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        kw[k] = tuple(kw[k])
    try:
        return cls(**kw)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"bad '{section}' section: {e}") from None


def make_unet(cfg: UNetConfig):
    """A fresh ``UNet2DModel`` from the recipe (shape errors become one-line recipe errors)."""
    from diffusers import UNet2DModel

    return build_unet(UNet2DModel, "unet", dataclasses.asdict(cfg))


def make_dit(cfg: TransformerConfig):
    """A fresh class-conditional ``DiTTransformer2DModel`` from the recipe (``learn_sigma``: 2C output channels)."""
    from diffusers import DiTTransformer2DModel

    kw = dataclasses.asdict(cfg)
    kw["out_channels"] = kw["in_channels"] * (2 if kw.pop("learn_sigma") else 1)
    try:
        return DiTTransformer2DModel(**kw)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"bad 'transformer' section: {e}") from None


def make_text_unet(r: TeacherRecipe):
    """A fresh ``UNet2DConditionModel`` from ``text_unet``, cross-attending to the text encoder's width."""
    from diffusers import UNet2DConditionModel

    return build_unet(UNet2DConditionModel, "text_unet",
                      {**dataclasses.asdict(r.text_unet), "cross_attention_dim": r.text_encoder.hidden_size})


def make_prompt_encoder(cfg: TextEncoderConfig, words: list[str], folder: Path):
    """The frozen text encoder of ``model: sd``: a tokenizer of ``words`` (:func:`~cmdistill.tokenizer.write_clip_tokenizer`)
    and a ``CLIPTextModel`` at its ``cfg.seed`` random initialisation, written to ``folder`` (``tokenizer/``,
    ``text_encoder/``: what the latent cache fingerprints) and returned as a
    :class:`~cmdistill.prompts.PromptEncoder`. The same words, config and seed give the same files."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..prompts import TEXT_ENCODER, TOKENIZER, PromptEncoder
    from ..tokenizer import write_clip_tokenizer

    tok = write_clip_tokenizer(folder / TOKENIZER, words, cfg.max_length)
    with torch.random.fork_rng():  # its own seed, the training's global RNG untouched
        torch.manual_seed(cfg.seed)
        enc = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            max_position_embeddings=cfg.max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
    enc.save_pretrained(folder / TEXT_ENCODER, safe_serialization=True)
    return PromptEncoder.from_pretrained(folder)


# the denoising network of model: unet | dit | sd, made from its recipe section
NETWORKS: dict[str, Callable] = {"unet": lambda r: make_unet(r.unet), "dit": lambda r: make_dit(r.transformer),
                                 "sd": make_text_unet}


def make_scheduler(cfg: NoiseConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**dataclasses.asdict(cfg))


# what the network regresses onto, keyed by the scheduler's prediction_type (x0, noise, t -> target)
TARGETS: dict[str, Callable] = {
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}


def ddpm_loss(unet, sched, x0: torch.Tensor, **cond) -> torch.Tensor:
    """Ho et al. (2020) Algorithm 1: ``t ~ U{0..T-1}``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``,
    mean squared error between the network output and the prediction target. Draws from the global RNG, which
    the training loop checkpoints and restores like every other stream. ``cond`` (``class_labels``) goes to the
    network, which is called through its family (:func:`~cmdistill.core.networks.call_network`)."""
    noise = torch.randn(x0.shape).to(x0.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],)).to(x0.device)
    x_t = sched.add_noise(x0, noise, t)
    out = call_network(unet, x_t, t, cond)
    tgt = TARGETS[sched.config.prediction_type](sched, x0, noise, t)
    return torch.nn.functional.mse_loss(out.float(), tgt.float())


@torch.no_grad()
def sample_teacher_grid(unet, sched, n: int, steps: int, seed: int = 0, classes: int | None = None,
                        vae=None, text: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` deterministic DDIM samples of ``unet`` through the package's own teacher adapter and sampler; a
    class-conditional ``unet`` draws class ``i % classes`` for image ``i``, a text ``unet`` caption ``i % len(text)``
    (``text``: their text-encoder states); a latent teacher's samples are decoded by its ``vae``."""
    from ..core.autoencoders import decode_latents
    from ..core.denoisers import build_denoiser
    from ..core.sampling import sample_ode, teacher_sigmas

    den = build_denoiser(unet, dict(sched.config), "ddpm")
    device = next(unet.parameters()).device
    noise = torch.randn(n, *image_shape(unet), generator=torch.Generator().manual_seed(seed))
    cond = {"class_labels": (torch.arange(n) % classes).to(device)} if classes else {}
    if text is not None:
        cond = {"encoder_hidden_states": text[torch.arange(n) % len(text)].to(device)}
    x = sample_ode(den, noise.to(device), teacher_sigmas(den, steps, spacing=None), "ddim", **cond)
    return x if vae is None else decode_latents(vae, x)


class TeacherTraining:
    """DDPM Algorithm 1 for :func:`cmdistill.training.loop.train`: the U-Net trained, its EMA sampled and exported."""

    name = "teacher"
    CHECKPOINT_MODULES = ("ema",)
    OUTPUTS = ("pipeline",)

    def __init__(self, recipe: TeacherRecipe, accelerator, dataset: Dataset | None = None):
        self.recipe, self.acc = recipe, accelerator
        tc = recipe.train
        unet = NETWORKS[recipe.model](recipe).to(accelerator.device)
        prepare_network(unet)
        channels, side, _ = image_shape(unet)
        self.vae, self.prompt_encoder, self.prompt_embeds = None, None, None
        if dataset is None:
            dataset = self.training_data(channels, side)
        self.dataset = dataset
        rows = class_rows(unet)
        self.num_classes = num_labels(dataset) if rows else None
        if self.num_classes and self.num_classes + (tc.label_dropout > 0) > rows:
            raise ConfigError(f"the {recipe.model} network's class table has {rows} rows: it must hold the data's "
                              f"{self.num_classes} classes" + (" and the null class of label dropout"
                                                               if tc.label_dropout > 0 else ""))
        self.null = null_class(unet) if self.num_classes else None  # the label dropped labels become
        self.scheduler = make_scheduler(recipe.scheduler)
        self.ema = make_eval_ema(unet, tc.ema_decay, 0, tc.ema_power).to(accelerator.device)
        opt = make_optimizer(unet.parameters(), recipe.optim)
        self.lr_scheduler = make_lr_schedule(opt, recipe.optim, tc.max_steps)
        self.model, self.optimizer = accelerator.prepare(unet, opt)
        self.flip_gen = torch.Generator().manual_seed(tc.seed + 1 + accelerator.process_index)
        self.modules = {"ema": self.ema}
        self.generators = {"flip": self.flip_gen}
        self.batches = None
        if self.prompt_encoder is not None:  # every caption's states (the cache's table) and the empty prompt's: the null one
            self.prompt_embeds = dataset.prompt_embeds.to(accelerator.device)
            self.null_embed = self.prompt_encoder.null().to(accelerator.device)

    def training_data(self, channels: int, side: int) -> Dataset:
        """The recipe's images (``model: unet`` in pixels), or their latents under ``latent.vae`` (encoded once into
        the verified cache, :func:`cmdistill.latents.latent_dataset`), checked against the network's input."""
        from ..latents import latent_dataset, load_vae

        r, dc = self.recipe, self.recipe.data
        if r.latent.vae is None:
            if dc.resolution is not None and dc.resolution != side:
                raise ConfigError(f"'data.resolution' ({dc.resolution}) must be null or the network's sample_size "
                                  f"({side})")
            ds = make_dataset(dc.name, dc.root, side, channels)
            check_fits(ds, side, channels, dc.name)
            return ds
        if r.model not in ("dit", "sd"):
            raise ConfigError("a latent teacher (latent.vae) is trained as 'model: dit' (exported as a DiTPipeline) "
                              "or 'model: sd' (a StableDiffusionPipeline)")
        if dc.hflip:
            raise ConfigError("'data.hflip' would mirror latents, not images: set it false for a latent teacher")
        self.vae = load_vae(r.latent.vae, self.acc.device)
        pixels = make_dataset(dc.name, dc.root, dc.resolution or self.vae.config.sample_size,
                              self.vae.config.in_channels, dc.caption_column)
        text = {}
        if r.model == "sd":
            text = self.text_components(pixels)
        ds, folder = latent_dataset(pixels, r.latent.vae, dc.latent_cache, self.acc.device,
                                    self.acc.is_main_process, self.acc.wait_for_everyone, self.acc.print, vae=self.vae,
                                    **text)
        check_fits(ds, side, channels, f"{dc.name} latents ({folder})")
        return ds

    def text_components(self, pixels: Dataset) -> dict:
        """``model: sd``: the frozen prompt encoder over the captions' words, written to a folder of its own (made
        again, identically, by a resumed run) for the latent cache to fingerprint and embed the captions with."""
        import atexit
        import shutil
        import tempfile

        if getattr(pixels, "prompts", None) is None:
            raise ConfigError(f"'model: sd' learns from captions: data {self.recipe.data.name!r} has none (use "
                              "fashion_captions, captions or hf_disk)")
        words = sorted({w for p in pixels.prompts for w in p.lower().split()})
        folder = Path(tempfile.mkdtemp(prefix="cmdistill-text-"))
        atexit.register(shutil.rmtree, folder, True)
        try:
            self.prompt_encoder = make_prompt_encoder(self.recipe.text_encoder, words, folder)
        except ValueError as e:  # the tokenizer's check of the captions' words, or a text_encoder shape error
            raise ConfigError(f"'model: sd' text encoder and tokenizer: {e}") from None
        self.prompt_encoder.text_encoder.to(self.acc.device)
        return {"text_encoder": self.prompt_encoder, "text_folder": folder}

    def describe(self) -> list[str]:
        """The run's header: network, noise schedule, data."""
        r = self.recipe
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        sc = r.scheduler
        c, h, w = image_shape(self.ema.ema_model)
        space = f"latents of {r.latent.vae}" if r.latent.vae else "pixels"
        return [f"{type(self.ema.ema_model).__name__}: {n_params:.2f} M parameters, {c}x{h}x{w} ({space})",
                f"noise: DDPM {sc.num_train_timesteps} steps, {sc.beta_schedule} betas, predicts {sc.prediction_type}",
                f"data: {r.data.name}, {len(self.dataset)} images" + (", hflip" if r.data.hflip else ""),
                f"export: {r.train.export_dir or Path(r.train.output_dir) / 'pipeline'}"]

    def loss(self, step: int) -> torch.Tensor:
        """DDPM Algorithm 1 on the next micro-batch; a class-conditional U-Net sees the labels, each replaced by the
        null class (:func:`~cmdistill.core.guidance.null_class`) with probability ``train.label_dropout``
        (classifier-free guidance training, Ho & Salimans 2022)."""
        batch = next(self.batches)
        x0 = batch[0].to(self.acc.device)
        x0 = random_hflip(x0, self.flip_gen) if self.recipe.data.hflip else x0
        cond = {}
        if self.num_classes:
            labels = batch[1]
            drop = torch.rand(labels.shape[0]) < self.recipe.train.label_dropout
            labels = torch.where(drop, self.null, labels)
            cond = {"class_labels": labels.to(self.acc.device)}
        if self.prompt_embeds is not None:  # the caption's states, dropped to the empty prompt's as labels are
            emb = self.prompt_embeds[batch[2].to(self.acc.device)]
            drop = (torch.rand(emb.shape[0]) < self.recipe.train.label_dropout).to(self.acc.device)
            cond = {"encoder_hidden_states": torch.where(drop[:, None, None], self.null_embed, emb)}
        return ddpm_loss(self.model, self.scheduler, x0, **cond)

    def after_update(self) -> None:
        self.ema.update()

    def finite_modules(self):
        return self.model, self.ema

    def save_samples(self, path: Path) -> None:
        tc = self.recipe.train
        with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
            save_grid(sample_teacher_grid(self.ema.ema_model, self.scheduler, tc.num_sample_images, tc.sample_steps,
                                          tc.seed, self.num_classes, self.vae, self.prompt_embeds), path)


def export_pipeline(unet, sched, folder: Path) -> Path:
    """Write a ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/; safetensors). Other subfolders
    already there (e.g. a shipped ``classifier/``) are left alone."""
    from diffusers import DDPMPipeline

    folder.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(folder), safe_serialization=True)
    return folder


def ddim_for(sched):
    """The exported teacher's ``DDIMScheduler``: the training schedule's betas, ``clip_sample`` off. (DDPMScheduler's
    default clips every predicted x0 to [-1, 1], which on latents of unit std would change what diffusers' pipelines
    sample; cmdistill's ODE never clips, so the teacher would be two teachers.)"""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(sched.config, clip_sample=False)


def export_dit_pipeline(transformer, vae, sched, folder: Path) -> Path:
    """Write a ``DiTPipeline`` folder (transformer/, vae/, scheduler/ as a ``DDIMScheduler`` of the same betas;
    safetensors)."""
    from diffusers import DiTPipeline

    folder.mkdir(parents=True, exist_ok=True)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=ddim_for(sched)).save_pretrained(
        str(folder), safe_serialization=True)
    return folder


def export_sd_pipeline(unet, vae, prompt_encoder, sched, folder: Path) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ as a
    ``DDIMScheduler`` of the same betas; no safety checker; safetensors)."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline(vae=vae, text_encoder=prompt_encoder.text_encoder, tokenizer=prompt_encoder.tokenizer,
                            unet=unet, scheduler=ddim_for(sched), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(
        str(folder), safe_serialization=True)
    return folder


def export_teacher(task: TeacherTraining, out: Path) -> Path:
    """The EMA weights in ``train.export_dir`` (default ``<output_dir>/pipeline``): a ``DDPMPipeline`` of a pixel
    U-Net, a ``DiTPipeline`` of a latent DiT, a ``StableDiffusionPipeline`` of a text U-Net."""
    tc = task.recipe.train
    folder = Path(tc.export_dir) if tc.export_dir else out / "pipeline"
    net = copy.deepcopy(task.ema.ema_model).eval()
    if task.prompt_encoder is not None:
        return export_sd_pipeline(net, task.vae, task.prompt_encoder, task.scheduler, folder)
    if task.vae is not None:
        return export_dit_pipeline(net, task.vae, task.scheduler, folder)
    return export_pipeline(net, task.scheduler, folder)


def teacher_tasks() -> dict:
    """``model`` -> (task, export): the registry behind ``train-teacher``'s ``model`` key."""
    from .autoencoder import AutoencoderTraining, export_autoencoder

    return {"unet": (TeacherTraining, export_teacher), "dit": (TeacherTraining, export_teacher),
            "sd": (TeacherTraining, export_teacher),
            "autoencoder": (AutoencoderTraining, export_autoencoder)}
