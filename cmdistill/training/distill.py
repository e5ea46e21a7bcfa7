"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) as a task of the one training
loop (:mod:`.loop`). Orchestration only: every diffusion formula lives in :mod:`cmdistill.core`.

Phases, each a short function: :func:`build_models` (teacher adapter, student, target, evaluation EMA),
:func:`build_data` (the dataset, checked against the teacher, and the 1-step prior mean), :func:`build_loss`,
:func:`build_pairs` (the pair schedule, checked once against the teacher's range), then the task's per-step
:meth:`Distillation.loss` (CM Algorithm 2, lines 3-7, through :func:`cmdistill.core.cd_step.cd_loss`), its
updates and sample grids. What it trains, the evaluation-EMA consistency function ``Distillation.ema.ema_model``,
is exported by the caller (:func:`cmdistill.commands.distill` through :mod:`cmdistill.export`): training never
imports the export or evaluation layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..config import ConfigError, Recipe
from ..core.autoencoders import decode_latents
from ..core.cd_step import cd_loss
from ..core.consistency import make_student, make_target, update_target
from ..core.guidance import attach_guidance, guided_teacher
from ..core.lora import LoraSpec
from ..core.losses import DecodedDistance, get_weighting, make_distance
from ..core.networks import class_rows, image_shape, is_conditional, null_class, takes_text
from ..core.sampling import sample_consistency
from ..core.schedules import SUBSTEP_SCHEDULES, PairSchedule
from ..core.tensors import DTYPES, to_device
from ..data import DataError, check_fits, make_dataset, num_labels, prior_mean, random_hflip
from ..images import save_grid
from ..latents import load_teacher_vae
from ..teachers import load_teacher, teacher_autoencoder, text_encoder
from .bank import bank_dataset
from .checkpoint import save_trainable_only
from .ema import AdapterWeights, make_eval_ema
from .optim import make_lr_schedule, make_optimizer
from .speed import configure_networks


def build_models(recipe: Recipe, device):
    """Teacher adapter, student (copy of the teacher network + boundary condition), target and evaluation EMA.

    The student is copied from the teacher loaded in fp32, so it starts from the teacher's full-precision weights and
    trains in fp32 master weights; a teacher of another ``teacher.dtype`` is then loaded in that dtype
    (``from_pretrained(torch_dtype=...)``, which keeps the modules a model marks as fp32 in fp32; casting with
    ``to()`` would not)."""
    sc, dtype = recipe.student, DTYPES[recipe.teacher.dtype]
    lora = sc.lora.rank > 0
    # fp32: the student's start; a LoRA student's base is the teacher itself, loaded once in its dtype
    teacher = load_teacher(recipe.teacher.path, recipe.teacher.kind, **({"dtype": dtype} if lora else {})).to(device)
    if sc.sigma_max is not None and not teacher.sigma_min < sc.sigma_max <= teacher.sigma_max:
        raise ConfigError(f"'student.sigma_max' must lie in the teacher's range ({teacher.sigma_min:.4g}, "
                          f"{teacher.sigma_max:.4g}], got {sc.sigma_max}")
    try:
        student = make_student(teacher, sc.boundary, sc.sigma_data, sc.boundary_scale, sc.sigma_max,
                               sc.parametrization, lora_spec(recipe, teacher)).to(device)
    except ValueError as e:
        if not lora or isinstance(e, ConfigError):
            raise
        raise ConfigError(f"'student.lora.target_modules': {e}") from None
    guidance_of(recipe, teacher, student)
    if dtype != torch.float32 and not lora:  # no gradients flow through the teacher: loaded in its dtype
        teacher = load_teacher(recipe.teacher.path, recipe.teacher.kind, dtype=dtype).to(device)
    target = make_target(student, sc.target_decay)  # mu = 0: the student itself (one network fewer)
    ema = make_eval_ema(student, sc.ema_decay, sc.ema_update_after_step, sc.ema_power).to(device)
    return teacher, student, target, ema


def lora_spec(recipe: Recipe, teacher) -> LoraSpec | None:
    """The recipe's ``student.lora`` as a :class:`~cmdistill.core.lora.LoraSpec` (``None`` for a full student); a
    LoRA student is built for text-conditional U-Nets, whose LoRA files diffusers' pipelines load
    (``load_lora_weights``), and refused in one line for other teachers."""
    lc = recipe.student.lora
    if not lc.rank:
        return None
    if not takes_text(teacher.net):
        raise ConfigError(f"LoRA students (student.lora) are built for text-conditional U-Nets (Stable Diffusion "
                          f"family), whose LoRA files diffusers loads with load_lora_weights; the teacher "
                          f"{recipe.teacher.path!r} is a {type(teacher.net).__name__}: set student.lora.rank: 0")
    sc = recipe.student
    differs = [f"student.{k}: {v!r}" for k, v, lcm in (
        ("boundary", sc.boundary, sc.boundary in ("auto", "lcm_scheduler")), ("boundary_scale", sc.boundary_scale,
        sc.boundary_scale == 10.0), ("parametrization", sc.parametrization, sc.parametrization == "denoiser"),
        ("prior", sc.prior, sc.prior == "zero")) if not lcm]
    if differs:  # what the LoRA file's users run is LCMScheduler over the base: the student must be that sampler's
        raise ConfigError(f"a LoRA student is sampled by diffusers' LCMScheduler on its teacher ({differs[0]} would "
                          "sample differently there): keep student.boundary auto, boundary_scale 10, parametrization "
                          "denoiser and prior zero")
    return LoraSpec(lc.rank, float(lc.alpha if lc.alpha is not None else lc.rank), tuple(lc.target_modules))


def build_data(recipe: Recipe, teacher, vae=None, acc=None, prompts=None) -> Dataset:
    """The training images, checked against the teacher's channels and resolution; for a latent teacher (``vae``:
    its autoencoder) their latents, encoded once into the verified cache in ``data.latent_cache``
    (:func:`cmdistill.latents.latent_dataset`; ``acc``: the accelerator whose main process writes it), with a text
    teacher's ``prompts`` encoder the captions' text-encoder states too."""
    channels, resolution, _ = image_shape(teacher.net)
    dc = recipe.data
    if vae is not None:
        return latent_data(recipe, teacher, vae, acc, prompts)
    if takes_text(teacher.net):
        raise DataError(f"the text-conditional teacher {recipe.teacher.path!r} has no vae/: cmdistill reads text "
                        "teachers in the StableDiffusionPipeline layout (unet, vae, text_encoder, tokenizer, scheduler)")
    if dc.resolution is not None and dc.resolution != resolution:
        raise DataError(f"data.resolution is {dc.resolution} but the teacher {recipe.teacher.path!r} works at "
                        f"{resolution}x{resolution}; set data.resolution to {resolution} or null")
    ds = make_dataset(dc.name, dc.root, dc.resolution or resolution, channels, dc.caption_column)
    check_fits(ds, resolution, channels, dc.name)
    return ds


def latent_data(recipe: Recipe, teacher, vae, acc, prompts=None) -> Dataset:
    """A latent teacher's training data: the recipe's images at its autoencoder's resolution, encoded once."""
    from ..latents import latent_dataset

    dc = recipe.data
    if dc.hflip:
        raise ConfigError("'data.hflip' would mirror latents, not images: set it false for a latent teacher")
    pixels = make_dataset(dc.name, dc.root, dc.resolution or vae.config.sample_size, vae.config.in_channels,
                          dc.caption_column)
    main, wait, echo = (True, lambda: None, print) if acc is None else (acc.is_main_process, acc.wait_for_everyone,
                                                                        acc.print)
    device = next(vae.parameters()).device
    texts = takes_text(teacher.net)
    if texts != (getattr(pixels, "prompts", None) is not None):
        raise DataError(f"the teacher {recipe.teacher.path!r} is text-conditional: it needs captioned data "
                        "(data.name captions, hf_disk or fashion_captions)" if texts else
                        f"data {dc.name!r} is captioned but the teacher {recipe.teacher.path!r} takes no text")
    text_kw = dict(text_encoder=prompts, text_folder=teacher_autoencoder(recipe.teacher.path).parent) if texts else {}
    ds, folder = latent_dataset(pixels, teacher_autoencoder(recipe.teacher.path), dc.latent_cache, device, main,
                                wait, echo, vae=vae, **text_kw)
    channels, side, _ = image_shape(teacher.net)
    check_fits(ds, side, channels, f"{dc.name} latents ({folder})")
    return ds


def build_loss(lc, device, vae=None):
    """The distance ``d`` and weighting ``lambda`` of CM Algorithm 2, line 7, keyed by ``loss.*``. A latent student's
    distance is taken on latents (l2, l1, pseudo-Huber), or with ``loss.decode`` on the pixels its autoencoder
    decodes (any distance; LPIPS needs it)."""
    if vae is None and lc.decode:
        raise ConfigError("'loss.decode' applies to latent teachers (with an autoencoder); this teacher works in pixels")
    if vae is not None and lc.distance == "lpips" and not lc.decode:
        raise ConfigError("LPIPS compares images, not latents: for a latent teacher use loss.distance l2 or "
                          "pseudo_huber, or set loss.decode: true (LPIPS on decoded pixels, a decoder pass per step)")
    distance = make_distance(lc.distance, lpips_net=lc.lpips_net, lpips_resize=lc.lpips_resize, huber_c=lc.huber_c,
                             lpips_pretrained_backbone=lc.lpips_pretrained)
    if vae is not None and lc.decode:
        distance = DecodedDistance(distance, vae, decode_latents)
    if isinstance(distance, torch.nn.Module):
        distance.to(device)
    return distance, get_weighting(lc.weighting)


def build_pairs(recipe: Recipe, teacher, student) -> PairSchedule:
    """The pair schedule over the *student's* range, checked once, on the host, to lie inside the teacher's trained
    range (so the step runs without per-call checks, each a host sync on a GPU)."""
    sch, steps = recipe.schedule, recipe.train.max_steps
    pairs = PairSchedule(sch.grid, teacher.sigma_min, student.sigma_max, sch.num_scales, sch.rho, sch.curriculum,
                         sch.num_scales_start, steps, sch.pairs, sch.p_mean, sch.p_std,
                         getattr(teacher, "sigma_table", None), sch.skip, sch.gap, sch.gap_start)
    for at in (0, steps):
        teacher.check_range(pairs.grid_and_probs(at)[0])
    return pairs


def guidance_of(recipe: Recipe, teacher, student=None):
    """The recipe's ``guidance`` section applied through :mod:`cmdistill.core.guidance`: the teacher the ODE pairs
    come from (classifier-free guidance at ``guidance.scale``, per sample when w is drawn from ``[w_min, w_max]``;
    the teacher itself at a fixed scale of 1), and, given a ``student``, what it learns of w
    (:func:`~cmdistill.core.guidance.attach_guidance`). A recipe that does not fit the teacher is one
    :class:`ConfigError` line."""
    gc = recipe.guidance
    w_range = gc.w_range
    guided = gc.scale != 1.0 or w_range is not None
    if guided and not is_conditional(teacher.net):
        what = "'guidance.w_min'/'w_max' are set" if w_range else f"'guidance.scale' is {gc.scale:g}"
        raise ConfigError(f"{what} but the teacher {recipe.teacher.path!r} is not conditional; set "
                          "guidance.scale to 1 and leave w_min/w_max unset")
    try:  # a class teacher's null class; a text teacher's null is the empty prompt, embedded when it was loaded
        null = null_class(teacher.net, gc.null_class) if guided and class_rows(teacher.net) is not None else None
    except ValueError as e:
        raise ConfigError(f"'guidance.null_class': {e}") from None
    if student is not None:
        try:
            attach_guidance(student, gc.scale, w_range)
        except ValueError as e:  # a network without a diffusers time embedding to add w to
            raise ConfigError(f"'guidance.w_min'/'w_max' need a w embedding: {e}") from None
    pair_teacher = guided_teacher(teacher, gc.scale, null, per_sample=w_range is not None)
    return pair_teacher


class Distillation:
    """CM Algorithm 2 for :func:`cmdistill.training.loop.train`. ``dataset`` replaces the recipe's data (the step
    benchmark feeds random images through the very same step)."""

    name = "distill"
    CHECKPOINT_MODULES = ("ema",)  # and "target", saved when it is a network of its own (target_decay > 0)
    OUTPUTS = ("student", "lora")

    def __init__(self, recipe: Recipe, accelerator, dataset: Dataset | None = None):
        self.recipe, self.acc = recipe, accelerator
        device, tc = accelerator.device, recipe.train
        self.teacher, self.student, self.target, self.ema = build_models(recipe, device)
        self.vae = load_teacher_vae(recipe.teacher.path, device)  # a latent teacher's: encodes data, decodes grids
        # a text teacher's tokenizer + text encoder: embed the captions once, and travel with the exported student
        self.prompt_encoder = text_encoder(recipe.teacher.path, device) if takes_text(self.teacher.net) else None
        if self.student.denoiser.adapter is not None and recipe.eval.curve:
            raise ConfigError("the checkpoint curve of LoRA students is not built yet: set eval.curve: false "
                              "(eval.at_end evaluates the exported student)")
        self.distance, self.weighting = build_loss(recipe.loss, device, self.vae)  # refused before any data is read
        configure_networks(self.teacher, self.student, self.target, channels_last=tc.channels_last,
                           compile=tc.compile, gradient_checkpointing=tc.gradient_checkpointing)
        self.pair_teacher = guidance_of(recipe, self.teacher)  # the teacher the ODE pairs come from
        # data-free: the bank's x0 are the data (a conditional teacher's classes: all its labels below the null one)
        classes = null_class(self.teacher.net) if class_rows(self.teacher.net) is not None else None
        self.bank = self.load_bank(None, classes) if recipe.data.name == "teacher" else None
        self.dataset = dataset if dataset is not None else (bank_dataset(self.bank) if self.bank is not None else
                                                            build_data(recipe, self.teacher, self.vae, accelerator,
                                                                       self.prompt_encoder))
        mean = prior_mean(recipe.student.prior, self.dataset, recipe.data.hflip)  # where 1-step sampling starts
        for fn in (self.student, self.target, self.ema.ema_model):
            fn.prior_mean = None if mean is None else mean.to(device)
        if self.bank is None and recipe.bank.count:
            self.bank = self.load_bank(mean, None if classes is None else num_labels(self.dataset))
        self.pairs = build_pairs(recipe, self.teacher, self.student)
        opt = make_optimizer([p for p in self.student.parameters() if p.requires_grad], recipe.optim)
        self.lr_scheduler = make_lr_schedule(opt, recipe.optim, tc.max_steps)
        self.model, self.optimizer = accelerator.prepare(self.student, opt)
        if self.student.denoiser.adapter is not None:  # the base is the teacher's file: checkpoint the adapters
            save_trainable_only(accelerator, self.model)
        self.flip_gen = torch.Generator().manual_seed(tc.seed + 1 + accelerator.process_index)
        self.modules = {"ema": self.ema}
        if self.target is not self.student:  # a LoRA student's target is saved as its adapter alone
            lora = self.student.denoiser.adapter is not None
            self.modules = {"target": AdapterWeights(self.target, "target") if lora else self.target, **self.modules}
        self.generators = {"flip": self.flip_gen}
        c, h, w = image_shape(self.teacher.net)
        self.sample_noise = torch.randn(tc.num_sample_images, c, h, w,
                                        generator=torch.Generator().manual_seed(tc.seed)).to(device)
        self.batches = None
        self.conditional = class_rows(self.teacher.net) is not None
        self.text = self.prompt_encoder is not None
        self.sample_cond = {}
        if self.text:  # a text student's grids: one distinct caption per column, cycling through them
            table = self.dataset.prompt_embeds
            self.prompt_embeds = table.to(device)
            self.sample_cond = {"encoder_hidden_states": self.prompt_embeds[torch.arange(tc.num_sample_images)
                                                                            % len(table)]}
        if self.conditional:
            classes, embeds = num_labels(self.dataset), class_rows(self.teacher.net)
            if classes > embeds:
                raise DataError(f"dataset {recipe.data.name!r} has {classes} classes but the teacher embeds {embeds}")
            # sample grids of a conditional student: one class per column, cycling through the data's classes
            self.sample_cond = {"class_labels": (torch.arange(tc.num_sample_images) % classes).to(device)}

    def bank_spec(self, mean, classes: int | None):
        """What the recipe's trajectory bank must hold (:class:`~cmdistill.training.bank.BankSpec`)."""
        from .bank import BankSpec, teacher_fingerprint, tensor_sha256

        r, bc = self.recipe, self.recipe.bank
        null = {k: v.tolist() for k, v in getattr(self.pair_teacher, "null_condition", {}).items()} or None
        return BankSpec(teacher=str(r.teacher.path), teacher_fingerprint=teacher_fingerprint(self.teacher, null),
                        start=bc.start, solver=bc.solver, num_scales=bc.num_scales or r.schedule.num_scales,
                        rho=float(r.schedule.rho), sigma_min=float(self.student.sigma_min),
                        sigma_max=float(self.student.sigma_max),
                        prior_mean_sha256=tensor_sha256(mean) if bc.start == "student" else None,
                        guidance_scale=float(r.guidance.scale) if self.pair_teacher is not self.teacher else None,
                        classes=classes, seed=bc.seed, count=bc.count)

    def load_bank(self, mean, classes: int | None) -> dict:
        """The recipe's trajectory bank (made with the pair teacher: guided at ``guidance.scale`` when guided): made
        by the main process when missing (the others wait, then read it), reused when its manifest matches, refused
        in one line when it does not."""
        from .bank import bank_folder, load_or_build_bank

        spec = self.bank_spec(mean, classes)
        folder = bank_folder(self.recipe.bank.path, spec)
        bank = None
        if self.acc.is_main_process:
            bank = load_or_build_bank(folder, self.pair_teacher, spec, mean, self.acc.device, echo=self.acc.print)
        self.acc.wait_for_everyone()
        if bank is None:
            bank = load_or_build_bank(folder, self.pair_teacher, spec, mean, self.acc.device, echo=lambda s: None)
        return bank

    def describe(self) -> list[str]:
        """The run's header: teacher, data, student range and loss."""
        r, t, fn = self.recipe, self.teacher, self.student
        c, h, w = image_shape(t.net)
        n_params = sum(p.numel() for p in t.net.parameters()) / 1e6
        sch = r.schedule
        return [f"teacher: {r.teacher.path} ({t.kind}, {getattr(t, 'prediction_type', '?')}, sigma "
                f"{t.sigma_min:.4g}..{t.sigma_max:.4g}, {n_params:.2f} M parameters, {r.teacher.dtype})",
                f"data: {r.data.name}, {len(self.dataset)} images of {c}x{h}x{w}" + (", hflip" if r.data.hflip else ""),
                f"student: sigma ({fn.sigma_min:.4g}, {fn.sigma_max:.4g}], boundary {fn.boundary}, F "
                f"{fn.parametrization}, prior {r.student.prior}; pairs from a {sch.grid} grid of {sch.num_scales} "
                f"points (gap {sch.gap}), {r.solver.name} teacher steps ({r.solver.substeps} per pair, "
                f"{r.solver.substep_schedule}); loss {r.loss.distance} ({r.loss.weighting}); {r.optim.name} "
                f"lr {r.optim.lr:g}"
                + (f"; class-conditional, guidance scale {self.guidance_text()}" if self.conditional else "")
                + (f"; text-conditional ({len(self.prompt_embeds)} distinct captions), guidance scale "
                   f"{self.guidance_text()}" if self.text else "") + self.lora_text(),
                self.ema_text()]

    def lora_text(self) -> str:
        """A LoRA student's adapters: rank, alpha and trainable share of the network."""
        lc = self.recipe.student.lora
        if not lc.rank:
            return ""
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in self.teacher.net.named_parameters() if "lora_" not in n)
        return (f"; LoRA rank {lc.rank}, alpha {lc.alpha if lc.alpha is not None else lc.rank:g}: "
                f"{trainable / 1e6:.2f} M trainable parameters on a {total / 1e6:.2f} M base shared with the teacher")

    def ema_text(self) -> str:
        """What the evaluation EMA's decay really is at the end of the run (ema-pytorch's warm-up)."""
        from .ema import effective_decay

        sc, steps = self.recipe.student, self.recipe.train.max_steps
        eff = effective_decay(sc.ema_decay, steps, sc.ema_power, sc.ema_update_after_step)
        return (f"evaluation EMA: decay {sc.ema_decay:g}, ema-pytorch warm-up 1 - (1 + t)^-{sc.ema_power:.4g}: "
                f"{eff:.4f} at the last step" + ("" if eff >= sc.ema_decay else
                                                  " (student.ema_power sets how fast the warm-up reaches the decay)"))

    def guidance_text(self) -> str:
        gc = self.recipe.guidance
        if gc.w_min is None:
            return f"{gc.scale:g}"
        return f"drawn from [{gc.w_min:g}, {gc.w_max:g}] (an input of the student, default {gc.scale:g})"

    def next_batch(self) -> tuple[torch.Tensor, dict]:
        """The next micro-batch ``x0``, randomly mirrored when ``data.hflip``, and its conditioning: the class labels
        when the teacher is class-conditional (``class_labels``, diffusers' argument name), the caption's text-encoder
        states for a text teacher (``encoder_hidden_states``), and with a range of
        guidance scales one ``w ~ U[w_min, w_max]`` per sample (``guidance_scale``, LCM), else nothing."""
        batch = next(self.batches)
        x0 = batch[0].to(self.acc.device, non_blocking=True)
        x0 = random_hflip(x0, self.flip_gen) if self.recipe.data.hflip else x0
        cond = {}
        if self.conditional and len(batch) > 1:
            cond["class_labels"] = batch[1].to(self.acc.device, non_blocking=True)
        if self.text:  # each image's caption, as its text-encoder states from the cache's table
            cond["encoder_hidden_states"] = self.prompt_embeds[batch[2].to(self.acc.device)]
        gc = self.recipe.guidance
        if gc.w_min is not None:
            cond["guidance_scale"] = (gc.w_min + (gc.w_max - gc.w_min) * torch.rand(x0.shape[0])).to(self.acc.device)
        return x0, cond

    def loss(self, step: int) -> torch.Tensor:
        """CM Algorithm 2, lines 3-7 on the next micro-batch: pair ``(sigma_hi, sigma_lo)``, teacher ODE step, student
        and target outputs, weighted distance; the batch's class labels reach all three networks."""
        x0, cond = self.next_batch()
        sigma_hi, sigma_lo = (to_device(t, self.acc.device) for t in self.pairs.sample(x0.shape[0], step))
        loss = cd_loss(self.model, self.target, self.pair_teacher, x0, sigma_hi, sigma_lo, self.distance,
                       self.weighting, self.recipe.solver.name, self.substeps(step), **cond).loss
        weight = self.regression_weight(step)
        if weight > 0:
            loss = loss + weight * self.regression_loss(x0.shape[0])
        return loss

    def substeps(self, step: int) -> int:
        """The teacher's sub-steps for this step's pairs: ``solver.substep_schedule`` of ``solver.substeps``, times
        the pair gap (a pair ``k`` intervals apart is solved with ``k`` times the sub-steps of an adjacent one)."""
        sc = self.recipe.solver
        per_pair = SUBSTEP_SCHEDULES[sc.substep_schedule](step, self.recipe.train.max_steps, sc.substeps)
        return per_pair * self.pairs.gap_at(step)

    def regression_weight(self, step: int) -> float:
        """``loss.regression_weight`` times its schedule at this step."""
        from .bank import REGRESSION_SCHEDULES

        lc = self.recipe.loss
        return lc.regression_weight * REGRESSION_SCHEDULES[lc.regression_schedule](step / self.recipe.train.max_steps)

    def regression_loss(self, micro_batch: int) -> torch.Tensor:
        """Endpoint regression on the trajectory bank (knowledge distillation, Luhman & Luhman 2021; SFD):
        ``mean d(f(x_start, sigma_max), x0)`` over bank entries drawn with the global (checkpointed) RNG; a student
        for a range of w is asked at the bank's w (``guidance.scale``)."""
        from .bank import regression_batch

        x_start, x0, cond = regression_batch(self.bank, self.recipe.loss.regression_batch or micro_batch,
                                             self.acc.device)
        if self.student.guidance_embedding is not None:
            cond["guidance_scale"] = self.recipe.guidance.scale
        # the unwrapped student: under DDP a second call of the wrapper before backward would mark every parameter
        # ready twice; through the shared parameters autograd sums both terms' gradients into one reduction
        pred = self.student(x_start, torch.full((x_start.shape[0],), self.student.sigma_max, device=x_start.device),
                            **cond)
        return self.distance(pred.float(), x0.float()).mean()

    def after_update(self) -> None:
        update_target(self.target, self.student, self.recipe.student.target_decay)
        self.ema.update()

    def finite_modules(self):
        return (self.student, self.ema) if self.target is self.student else (self.student, self.target, self.ema)

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        """1-step samples of the evaluation EMA in eval mode, on a forked RNG (training draws are not disturbed)."""
        fn, device = self.ema.ema_model, self.acc.device
        was_training = fn.training
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.acc.autocast():
            fn.eval()
            try:
                x = sample_consistency(fn, self.sample_noise, [fn.sigma_max], **self.sample_cond)
            finally:
                fn.train(was_training)
            x = x if self.vae is None else decode_latents(self.vae, x)
        save_grid(x, path)
