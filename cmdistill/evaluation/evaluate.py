"""``cmdistill evaluate RUN_DIR``: the student at 1…K steps against its teacher and the teacher's best
training-free few-step samplers.

Every sampler starts from the same unit noise: the student (CM Algorithm 1) at 1…K steps, the teacher's DDIM at
1…K and 50 steps, and the training-free baselines (:mod:`.baselines`: DPM-Solver++ 2M, UniPC, Heun on a Karras
grid) at the recipe's NFE budgets. For each: FID, precision and recall (:mod:`.metrics`) in one feature space,
paired distances (MSE, PSNR, LPIPS where its weights are available) to the teacher-50 samples from the same noise,
images per second; the headline rows (:func:`.report.headline`); ``report.json``, ``report.md`` and
``side_by_side.png`` in the run folder. ``--seeds N`` repeats everything over N noise seeds (mean ± std).

Measuring never modifies the run: ``--search-sigmas`` picks the 2…K-step taus by FID (CM's greedy search) on noise
disjoint from the evaluation's and uses them for this report; only ``--store`` writes them into ``<run>/student``.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.schedules import DEFAULT_TEACHER_SPACING, karras_grid
from ..core.networks import class_rows, image_shape, takes_text
from ..export.pipeline import config_file, on_timesteps
from ..machine import machine_fingerprint
from .baselines import make_baselines, student_start, teacher_start
from .baselines import teacher_sampler as start_sampler
from .features import CLASSIFIERS, FIDMeter, accuracy, classifier_data, find_classifier, load_classifier, real_vs_real
from .generate import initial_noise, latent_decoder, load_student, run_batches, student_fn, teacher_fn
from .real_images import RealImages
from .report import headline, headline_table, report_table, side_by_side, write_report

FLOOR_MAX_IMAGES = 20_000   # real-vs-real FID floor: among the first 20k real images (digits: all 1797)
REAL_MAX_IMAGES = 50_000    # FID reference statistics: the first 50k training images (CIFAR-10: all)
KEPT_IMAGES = 16            # samples kept per non-reference sampler after scoring: the side-by-side's most columns
SEARCH_SEED_OFFSET = 1000   # the sigma search draws its noise from seed + 1000: disjoint from evaluation_seeds
PROMPT_ORDER_SEED = 0       # the fixed random order in which a text run's samples take the eval data's captions
MAX_SEEDS = 100


def evaluation_seeds(seed: int, n: int) -> list[int]:
    """The noise seeds of ``--seeds n``: seed ``s`` draws the initial noise, ``s + 1`` the student's extra multistep
    noise, so consecutive evaluations use ``seed, seed + 2, ...``; all below ``seed + SEARCH_SEED_OFFSET``."""
    if not 1 <= n <= MAX_SEEDS:
        raise EvalError(f"--seeds must be between 1 and {MAX_SEEDS}, got {n}")
    return [seed + 2 * i for i in range(n)]


def search_seeds(seed: int) -> list[int]:
    """The seeds the sigma search draws from (initial and multistep noise), disjoint from every evaluation seed."""
    return [seed + SEARCH_SEED_OFFSET, seed + SEARCH_SEED_OFFSET + 1]


class EvalError(RuntimeError):
    """A run folder that cannot be evaluated."""


# --------------------------------------------------------------------------- metrics


def paired_distances(x: torch.Tensor, ref: torch.Tensor, lpips: nn.Module | None = None,
                     batch_size: int = 250) -> dict:
    """Per-pair distances between two sample sets in [-1, 1] made from the same noise: MSE and PSNR on [0, 1]
    pixels (PSNR = 10 log10(1 / MSE) of the whole set; ``None`` when identical), mean LPIPS when available."""
    mse = float(((x.float() - ref.float()) / 2).pow(2).mean())
    out = {"mse": mse, "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else None, "lpips": None}
    if lpips is not None:
        dev = next(lpips.parameters()).device if isinstance(lpips, nn.Module) else x.device
        with torch.no_grad():
            d = [lpips(x[i:i + batch_size].to(dev), ref[i:i + batch_size].to(dev)).cpu()
                 for i in range(0, len(x), batch_size)]
        out["lpips"] = float(torch.cat(d).mean())
    return out


def load_lpips(net: str = "vgg", device="cpu") -> tuple[nn.Module | None, str]:
    """LPIPS (CM's VGG variant) when torchvision's backbone weights are already cached; never downloads."""
    try:
        import torchvision.models as tvm
    except ImportError as e:
        return None, f"unavailable: torchvision cannot be imported ({type(e).__name__})"

    weights = {"vgg": tvm.VGG16_Weights.IMAGENET1K_V1, "alex": tvm.AlexNet_Weights.IMAGENET1K_V1}[net]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        model = {"vgg": "vgg16", "alex": "alexnet"}[net]
        return None, (f"unavailable: {net} backbone weights not in {cached.parent}; download them once, with network "
                      f"access: python -c \"import torchvision; torchvision.models.{model}(weights='IMAGENET1K_V1')\"")
    from ..core.losses import LPIPSDistance

    try:
        return LPIPSDistance(net, resize=224).to(device), f"lpips-{net}"
    except Exception as e:
        return None, f"unavailable: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- multistep sigma search


def candidate_taus(sigma_min: float, sigma_max: float, n: int = 12) -> list[float]:
    """``n`` candidate intermediate noise levels: the interior of a Karras grid (rho = 7), descending."""
    return karras_grid(n + 2, sigma_min, sigma_max).tolist()[1:-1]


def search_multistep_sigmas(score: Callable[[list[float]], float], sigma_max: float, candidates: Sequence[float],
                            max_steps: int = 4, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Greedy search (CM, Sec. 6: the taus are "pinpointed one at a time" to minimise FID): start from
    ``[sigma_max]``; for k = 2…max_steps insert each unused candidate into the k-1 taus found so far (kept
    descending), keep the insertion with the lowest score. Returns ``{"sigmas": {k: [...]}, "fid": {k: best},
    "trace": [[sigmas, fid], ...]}``."""
    taus, result = [float(sigma_max)], {"sigmas": {}, "fid": {}, "trace": []}
    for k in range(2, max_steps + 1):
        trials = [sorted(taus + [float(c)], reverse=True) for c in candidates if float(c) not in taus and c < sigma_max]
        if not trials:
            break
        scores = []
        for t in trials:
            scores.append(score(t))
            result["trace"].append([t, scores[-1]])
            progress(f"  search {k}-step {['%.4g' % s for s in t]}: FID {scores[-1]:.3f}")
        best = int(np.nanargmin(scores))
        taus = trials[best]
        result["sigmas"][k], result["fid"][k] = taus, scores[best]
    return result


def store_multistep_sigmas(pipe, table: dict, student_dir: Path) -> None:
    """Write the new sigmas into the student's ``consistency_config/consistency_config.json``
    (:func:`~cmdistill.export.pipeline.config_file`), atomically (:func:`cmdistill.files.write_atomic`; the weights
    are not rewritten). A folder of the old layout (the sigmas in ``model_index.json``) then gets the index that
    names the component, once the component is in place."""
    from ..files import write_atomic

    pipe.set_multistep_sigmas(table)
    target = config_file(student_dir)
    legacy = not target.is_file()
    target.parent.mkdir(exist_ok=True)
    write_atomic(target, pipe.consistency_config.to_json_string())
    if legacy:
        with tempfile.TemporaryDirectory(dir=student_dir.parent) as tmp:
            pipe.save_config(tmp)
            write_atomic(student_dir / "model_index.json", (Path(tmp) / "model_index.json").read_bytes())


# --------------------------------------------------------------------------- the evaluation


@dataclass
class EvalRun:
    """What an evaluation needs from a run folder."""

    run_dir: Path
    recipe: Any
    pipe: Any            # ConsistencyPipeline
    teacher: nn.Module   # the teacher's EDM denoiser
    teacher_path: str
    shape: tuple         # (C, H, W)
    real: RealImages     # real images in [-1, 1] (read on demand; a tensor of images also serves)
    device: torch.device
    classes: int | None = None            # class-conditional: the data's classes, sampled in turn
    guidance_scale: float | None = None   # class-conditional: the classifier-free guidance scale w evaluated
    guided: nn.Module | None = None       # the teacher the training-free samplers run: CFG at w (else: teacher)
    vae: nn.Module | None = None          # a latent teacher's autoencoder: every sample is decoded to pixels
    prompts: "PromptSet | None" = None    # a text-conditional run's prompts (sample i gets one of them)

    def labels(self, num: int) -> torch.Tensor | None:
        """The class each of ``num`` samples is asked for: ``0, 1, …, classes - 1, 0, 1, …`` (balanced) in a
        class-conditional run, the class of its prompt in a text run whose prompts all have one; else ``None``."""
        if self.prompts is not None:
            return self.prompts.labels(num)
        return None if self.classes is None else torch.arange(num) % self.classes

    def conditions(self, num: int) -> dict | None:
        """Each of ``num`` samples' condition, by diffusers' argument name: ``class_labels`` (class-conditional),
        ``encoder_hidden_states`` (text: its prompt's text-encoder states); ``None`` when unconditional."""
        if self.prompts is not None:
            return {"encoder_hidden_states": self.prompts.states(num)}
        labels = self.labels(num)
        return None if labels is None else {"class_labels": labels}


class Gathered:
    """Rows ``table[index[i]]`` of a table, gathered only when a slice is asked for (:func:`.generate.run_batches`
    takes a batch at a time), so a large prompt set never becomes one ``[num, L, D]`` tensor."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index = table, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, sl) -> torch.Tensor:
        return self.table[self.index[sl].to(self.table.device)]


@dataclass
class PromptSet:
    """The prompts of a text-conditional evaluation: ``texts``, the prompt of each sample (``order``, indices into
    ``texts``, cycled), each prompt's class where the data give one (``classes``: ``None`` entries for prompts of no
    single class; ``None`` when the data have no classes) and the ``encoder`` that embeds the prompts used, once."""

    texts: list[str]
    order: torch.Tensor
    classes: list[int | None] | None
    source: str
    encoder: Callable
    _embedded: dict = field(default_factory=dict)

    def index(self, num: int) -> torch.Tensor:
        return self.order[torch.arange(num) % len(self.order)]

    def states(self, num: int) -> Gathered:
        """The text-encoder states of each of ``num`` samples' prompts (only the distinct prompts used are embedded,
        64 at a time), gathered batch by batch."""
        idx = self.index(num)
        if num not in self._embedded:
            used = torch.unique(idx)
            with torch.no_grad():
                rows = [self.encoder([self.texts[int(i)] for i in used[j:j + 64]]) for j in range(0, len(used), 64)]
            self._embedded[num] = (used, torch.cat(rows))
        used, table = self._embedded[num]
        return Gathered(table, torch.searchsorted(used, idx))

    def labels(self, num: int) -> torch.Tensor | None:
        """Each sample's prompt class (``None`` unless every prompt has one: agreement needs them all)."""
        if self.classes is None or any(c is None for c in self.classes):
            return None
        return torch.tensor(self.classes)[self.index(num)]

    def describe(self) -> dict:
        return {"source": self.source, "count": len(self.texts), "examples": self.texts[:5],
                "with_classes": self.classes is not None and all(c is not None for c in self.classes)}


@dataclass
class Sampler:
    name: str
    kind: str            # student | teacher | baseline (teacher and baseline are training-free)
    steps: int
    nfe: int
    fn: Callable         # (z, generator) -> x
    sigmas: list | None = None
    start: str = "teacher"  # where it starts (baselines.Start.name): teacher | student
    ref: str | None = None  # the reference sampler of the same start its samples are paired with (None: itself)


def load_run(run_dir: Path, teacher_path: str | None, device, need_student: bool = True,
             guidance_scale: float | None = None, prompts: str | None = None) -> EvalRun:
    """Recipe, student pipeline, teacher and real images of a run (one-line errors for anything missing). Without
    ``need_student`` a run whose student is not exported yet loads with ``pipe = None``. A class-conditional or text
    run is evaluated at ``guidance_scale`` (default: the student's own, else the recipe's ``guidance.scale``); a text
    run on the prompts of the file ``prompts`` (one per line), else on the captions of its data
    (:func:`prompt_set`)."""
    from ..config import read_recipe
    from ..data import make_dataset, num_labels
    from ..latents import load_teacher_vae
    from ..teachers import load_teacher
    from .recipe_rules import EVALUATION_RULES

    if not (run_dir / "recipe.yaml").is_file():
        raise EvalError(f"{run_dir} is not a cmdistill run folder (no recipe.yaml)")
    recipe = read_recipe(run_dir / "recipe.yaml", rules=(EVALUATION_RULES,))
    teacher_path = teacher_path or recipe.teacher.path
    has_student = (run_dir / "student" / "model_index.json").is_file()
    # the run's student/, or one line saying the run has none
    pipe = load_student(run_dir, device) if need_student or has_student else None
    teacher = load_teacher(teacher_path, recipe.teacher.kind).to(device)
    shape = image_shape(teacher.net)
    if pipe is not None and image_shape(pipe.network) != shape:
        raise EvalError(f"the student's network works at {image_shape(pipe.network)}, the teacher's at {shape}")
    vae = load_teacher_vae(str(teacher_path), device)
    channels, side = (shape[0], shape[1]) if vae is None else (vae.config.in_channels, vae.config.sample_size)
    ds = make_dataset(reference_data(recipe), recipe.data.root, recipe.data.resolution or side, channels,
                      recipe.data.caption_column)
    real = RealImages(ds, REAL_MAX_IMAGES)  # read batch by batch when features are computed, never all at once
    run = EvalRun(run_dir, recipe, pipe, teacher, str(teacher_path), shape, real, device, guided=teacher, vae=vae)
    if takes_text(teacher.net):
        text_run(run, ds, guidance_scale, prompts)
    elif prompts is not None:
        raise EvalError("--prompts applies to a text-conditional run; this teacher takes no text")
    elif class_rows(teacher.net) is not None:
        condition_run(run, num_labels(ds), guidance_scale)
    elif guidance_scale is not None:
        raise EvalError("--guidance-scale applies to a conditional run; this teacher is unconditional")
    return run


def reference_data(recipe) -> str:
    """The data set the samples are compared with: ``eval.data``, else the training data; a data-free run
    (``data.name: teacher``) must name one (its training images are the teacher's own samples)."""
    name = recipe.eval.data or recipe.data.name
    if name == "teacher":
        raise EvalError("this run is data-free (data.name: teacher): name the real images to compare with as "
                        "eval.data in its recipe.yaml (digits, cifar10, or imagefolder with data.root)")
    return name


def evaluated_scale(run: EvalRun, guidance_scale: float | None) -> float:
    """The guidance scale ``w`` a conditional run is evaluated at: ``guidance_scale``, else the student's own, else the
    recipe's ``guidance.scale``; one line when the student cannot sample it."""
    fn = run.pipe.consistency_function if run.pipe is not None else None
    w = guidance_scale if guidance_scale is not None else (fn.guidance_scale if fn is not None else None)
    w = float(w if w is not None else run.recipe.guidance.scale)
    if run.pipe is not None:
        try:
            run.pipe.guidance(w)
        except ValueError as e:
            raise EvalError(str(e)) from None
    return w


def condition_run(run: EvalRun, classes: int, guidance_scale: float | None) -> None:
    """Set up a class-conditional run: its classes, the guidance scale ``w`` evaluated and the teacher with
    classifier-free guidance at ``w`` (one-line errors for a student that cannot sample it)."""
    from ..core.guidance import guided_teacher

    if run.pipe is not None and class_rows(run.pipe.network) is None:
        raise EvalError("the teacher is class-conditional but the student is not; evaluate it with its own teacher "
                        "(--teacher)")
    w = evaluated_scale(run, guidance_scale)
    run.classes, run.guidance_scale = classes, w
    run.guided = guided_teacher(run.teacher, w, run.recipe.guidance.null_class)


def text_run(run: EvalRun, ds, guidance_scale: float | None, prompts: str | None) -> None:
    """Set up a text-conditional run: its prompt set (:func:`prompt_set`), the guidance scale ``w`` evaluated and
    the teacher with classifier-free guidance at ``w`` against the empty prompt (one-line errors for a student that
    cannot sample it)."""
    from ..core.guidance import guided_teacher
    from ..teachers import text_encoder

    if run.pipe is not None and not takes_text(run.pipe.network):
        raise EvalError("the teacher is text-conditional but the student is not; evaluate it with its own teacher "
                        "(--teacher)")
    w = evaluated_scale(run, guidance_scale)
    run.prompts = prompt_set(ds, text_encoder(run.teacher_path, run.device), prompts)
    run.guidance_scale = w
    run.guided = guided_teacher(run.teacher, w)


def prompt_set(ds, encoder, path: str | None = None) -> PromptSet:
    """The prompts a text run is evaluated on: the lines of the file ``path`` (blank lines skipped), taken in turn,
    or else the captions of the data's images in order (sample ``i`` gets image ``i``'s caption, so the prompts
    follow the data's own caption and class frequencies). A prompt's class is the label of the data's images
    captioned with it when they all share one and the data have more than one class (what the prompt agreement
    needs); ``encoder`` embeds each distinct prompt once."""
    captions = getattr(ds, "prompts", None)
    ids = getattr(ds, "prompt_ids", None)
    owner = caption_classes(ds) if captions is not None else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise EvalError(f"--prompts {path!r}: no such file (one prompt per line)")
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise EvalError(f"--prompts {path!r} has no prompts (one per line)")
        order, source = torch.arange(len(texts)), f"file {path}"
    elif captions is None:
        raise EvalError("a text-conditional run is evaluated on prompts: give captioned eval data (eval.data) or "
                        "--prompts FILE (one prompt per line)")
    else:  # the images in a seeded random order: a folder sorted by class would otherwise give one class first
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(PROMPT_ORDER_SEED))
        texts, order, source = list(captions), ids[perm], "the captions of the eval data's images in a fixed random order"
    classes = [owner.get(t) for t in texts] if owner else None
    return PromptSet(texts, order, classes, source, encoder)


def caption_classes(ds) -> dict[str, int]:
    """Caption -> class for a captioned data set's captions whose images all have one label (one pass); empty when
    the data have one class only (a folder without a ``label`` column)."""
    seen: dict[int, set] = {}
    for pid, label in zip(ds.prompt_ids.tolist(), ds.labels):
        seen.setdefault(pid, set()).add(int(label))
    if len(set().union(*seen.values())) < 2:
        return {}
    return {ds.prompts[pid]: next(iter(ls)) for pid, ls in seen.items() if len(ls) == 1}


def load_run_without_student(run_dir: Path, device, guidance_scale: float | None = None) -> EvalRun:
    """:func:`load_run` for scoring checkpoints: the run's teacher and data; its student when exported."""
    return load_run(run_dir, None, device, need_student=False, guidance_scale=guidance_scale)


def feature_facts(feature_net, run: EvalRun, seed: int, search: list, num: int | None = None) -> dict:
    """Name of the feature network, the digits classifier's test accuracy, the real-vs-real floor of every metric
    (``num`` real images against the rest where the data allow, as the samplers score ``num`` samples:
    :func:`~cmdistill.evaluation.features.floor_sizes`)."""
    facts = {"feature_net": feature_net if isinstance(feature_net, str) else type(feature_net).__name__}
    if isinstance(feature_net, str) and feature_net in CLASSIFIERS:
        folder = find_classifier(feature_net, search)
        facts["feature_net_test_accuracy"] = load_classifier(folder)[1].get("test_accuracy") if folder else None
    rr = real_vs_real(feature_net, run.real[:FLOOR_MAX_IMAGES], seed, run.device, search, num)
    facts["real_vs_real"] = rr
    facts["fid_floor_real_vs_real"] = rr["fid"] if rr else None
    if run.vae is not None:  # every sample passes the decoder: the reconstructions of real images bound them
        from ..core.autoencoders import reconstruct

        facts["vae_reconstruction"] = real_vs_real(feature_net, run.real[:FLOOR_MAX_IMAGES], seed, run.device, search,
                                                   num, lambda x: reconstruct(run.vae, x))
    return facts


def sigma_search(run: EvalRun, fid: FIDMeter, max_steps: int, num: int, candidates: int, seed: int,
                 batch_size: int, store: bool, echo) -> dict:
    """:func:`search_multistep_sigmas` with student FID as the score, on its own noise (:func:`search_seeds`); an
    ``lcm_scheduler`` student's candidates are moved onto the teacher's timesteps (:func:`on_timesteps`). The taus
    found are used for this evaluation; with ``store`` they are also written into ``<run>/student``."""
    fn = run.pipe.consistency_function
    echo(f"searching 2…{max_steps}-step sigmas by FID on {num} samples")
    z_seed, _ = search_seeds(seed)

    def score(sig):
        z, g = initial_noise(num, run.shape, z_seed)
        return fid(run_batches(student_fn(run.pipe, sig, guidance_scale=run.guidance_scale), z, g, batch_size,
                               run.device, "search", False, run.conditions(num), latent_decoder(run.vae))[0])

    taus = candidate_taus(fn.sigma_min, fn.sigma_max, candidates)
    if fn.boundary == "lcm_scheduler":  # levels diffusers' LCM pipeline can sample too (timesteps=[...])
        taus = [s for s in on_timesteps(fn, taus) if s < fn.sigma_max * (1 - 1e-6)]
    res = search_multistep_sigmas(score, fn.sigma_max, taus, max_steps, echo)
    if store:
        store_multistep_sigmas(run.pipe, res["sigmas"], run.run_dir / "student")
        echo(f"stored the searched sigmas in {config_file(run.run_dir / 'student')}")
    else:
        run.pipe.set_multistep_sigmas(res["sigmas"])  # in memory only: this report uses them
        echo("using the searched sigmas for this report only (add --store to write them into the student)")
    return {"num_samples": num, "sigmas": {str(k): v for k, v in res["sigmas"].items()},
            "fid": {str(k): v for k, v in res["fid"].items()}, "trace": res["trace"], "stored": store}


def make_samplers(run: EvalRun, max_steps: int, teacher_sampler: str, teacher_steps: int, spacing: str,
                  baseline_nfe: list[int], baselines: list[str]) -> list[Sampler]:
    """The reference teacher sampler first, then the student and the teacher's DDIM at 1…max_steps, then the
    training-free baselines at each NFE budget, all from the teacher's start (its sigma_max, noise alone); and when
    the student starts elsewhere (``student.sigma_max`` below the teacher's, or a data-mean prior) the same teacher
    samplers again from the student's own start (labels ending in ``@student``, :mod:`.baselines`), with their own
    reference. Each sampler is paired with the reference of its start (``ref``): paired distances compare samples
    from one noise and one starting point only. The teacher's samplers run ``run.guided`` (classifier-free guidance
    at the run's ``w`` for a conditional run: NFE counts network evaluations of one batch, as in diffusers' guided
    pipelines, though each is a batch of twice the images)."""
    from ..core.solvers import SOLVERS

    teacher, w = run.guided or run.teacher, run.guidance_scale
    fn = run.pipe.consistency_function
    starts = run_starts(run)
    nfe = SOLVERS[teacher_sampler].sampler_nfe(teacher_steps)
    refs = {st.name: f"teacher-{teacher_sampler}-{teacher_steps}{st.suffix}" for st in starts}
    out = [Sampler(refs["teacher"], "teacher", teacher_steps, nfe,
                   teacher_fn(teacher, teacher_sampler, teacher_steps, spacing))]
    out += [Sampler(refs[st.name], "teacher", teacher_steps, nfe,
                    start_sampler(teacher, teacher_sampler, teacher_steps, st, spacing), start=st.name)
            for st in starts[1:]]
    student_at = starts[-1].name
    for k in range(1, max_steps + 1):
        sig = run.pipe.sigmas_for(k)
        out.append(Sampler(f"student-{k}", "student", k, k, student_fn(run.pipe, sig, guidance_scale=w), sig,
                           start=student_at, ref=refs[student_at]))
    for st in starts:
        out += [Sampler(f"teacher-ddim-{k}{st.suffix}", "teacher", k, k,
                        start_sampler(teacher, "ddim", k, st, spacing), start=st.name, ref=refs[st.name])
                for k in range(1, max_steps + 1) if f"teacher-ddim-{k}{st.suffix}" != refs[st.name]]
        out += [Sampler(name, "baseline", n, n, f, start=st.name, ref=refs[st.name])
                for name, n, f in make_baselines(teacher, baseline_nfe, baselines, spacing, st)]
    if any(smp.fn is None for smp in out if smp.name in refs.values()):
        raise EvalError(f"the student's start, sigma {fn.sigma_max:.4g}, leaves fewer than {teacher_steps} of the "
                        f"teacher's timesteps for its {teacher_steps}-step reference; lower --teacher-steps")
    seen, unique = set(), []
    for smp in out:  # a sampler twice (DDIM-k as the reference) once; none with more steps than its range holds
        if smp.name not in seen and smp.fn is not None:
            seen.add(smp.name)
            unique.append(smp)
    return unique


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else None)


def measure(samplers: list[Sampler], run: EvalRun, fid: FIDMeter, lpips, num: int, seeds: list[int],
            batch_size: int, echo, progress: bool, classifier: nn.Module | None = None) -> tuple[dict, dict]:
    """Every sampler from the same initial noise, for each noise seed ``s`` (initial noise from ``s``, the student's
    multistep noise from ``s + 1``): FID, precision and recall (mean and std over seeds), for a conditional run the
    class accuracy (the share of samples ``classifier`` assigns to the class asked for), paired distances to the
    reference sampler of the same start (``Sampler.ref``) and images per second (first seed). Returns
    ``(entries, images of the first seed)``: all of a reference's, the first :data:`KEPT_IMAGES` of the others' (the
    side-by-side's columns), so memory holds the references and one sampler's set, not every sampler's."""
    entries, images = {}, {}
    labels, conditions = run.labels(num), run.conditions(num)
    refs = {s.ref for s in samplers if s.ref}
    for s in samplers:
        scores, speeds = [], []
        for i, seed in enumerate(seeds):
            z, _ = initial_noise(num, run.shape, seed)
            x, ips = run_batches(s.fn, z, torch.Generator().manual_seed(seed + 1), batch_size, run.device,
                                 s.name, progress, conditions, latent_decoder(run.vae))
            scores.append(fid.score(x))
            if labels is not None and classifier is not None:
                scores[-1]["class_accuracy"] = accuracy(classifier, x, labels)
            speeds.append(ips)
            if i == 0:
                images[s.name] = x
        ref = s.ref or s.name
        e = {"kind": s.kind, "steps": s.steps, "nfe": s.nfe, "sigmas": s.sigmas, "images_per_s": speeds[0],
             "start": s.start, "ref": ref, "vs_teacher_ref": paired_distances(images[s.name], images[ref], lpips)}
        for key in ("fid", "precision", "recall", "class_accuracy"):
            if key in scores[0]:
                e[key], std = _mean_std([sc[key] for sc in scores])
                if std is not None:
                    e[f"{key}_std"] = std
        entries[s.name] = e
        if s.name not in refs:
            images[s.name] = images[s.name][:KEPT_IMAGES].clone()
        acc = f", class accuracy {e['class_accuracy']:.3f}" if "class_accuracy" in e else ""
        echo(f"{s.name:>18}: FID {e['fid']:.3f}, precision {e['precision']:.3f}, recall {e['recall']:.3f}{acc}, "
             f"{speeds[0]:.1f} img/s")
    return entries, images


def evaluate(run_dir: str | Path, num_samples: int | None = None, batch_size: int | None = None,
             max_steps: int = 4, teacher_steps: int = 50, teacher_sampler: str = "ddim",
             teacher_spacing: str = DEFAULT_TEACHER_SPACING, feature_net: str | nn.Module | None = None,
             teacher_path: str | None = None, search_sigmas: bool = False, search_num: int | None = None,
             search_candidates: int = 12, seed: int = 0, device=None, use_lpips: bool = True,
             echo: Callable[[str], None] = print, progress: bool = True, store_sigmas: bool = False,
             seeds: int | None = None, baseline_nfe: list[int] | None = None,
             baselines: list[str] | None = None, guidance_scale: float | None = None,
             prompts: str | None = None) -> dict:
    """Evaluate the run in ``run_dir`` (its ``recipe.yaml`` names the teacher, data and eval settings; arguments
    left ``None`` come from there). Writes ``report.json``, ``report.md`` and ``side_by_side.png``; returns the
    report. Nothing else in the run changes, unless ``search_sigmas`` and ``store_sigmas`` are both set.
    ``feature_net``: ``inception``, ``digits`` or an ``nn.Module`` (images in [0, 1] -> features).

    A class-conditional run samples the classes in turn (balanced), runs the teacher's samplers with classifier-free
    guidance at ``guidance_scale`` (default: the student's own ``w``), adds the class accuracy of every sampler
    (digits data: the shipped digits classifier) and shows one column per class in ``side_by_side.png``. An explicit
    ``guidance_scale`` writes ``report-w<W>.json``/``.md`` and ``side_by_side-w<W>.png`` instead, so a sweep over
    ``w`` keeps the run's own report.

    A text-conditional run samples a prompt set (:func:`prompt_set`: the file ``prompts``, one per line, else the
    captions of the eval data image by image), with the teacher's samplers guided against the empty prompt, and where
    every prompt has a class of the data reports the prompt agreement: the share of samples the data's classifier
    assigns to their prompt's class (the ``class_accuracy`` column)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # 1. the run, its eval settings, the real features
    run = load_run(Path(run_dir), teacher_path, device, guidance_scale=guidance_scale, prompts=prompts)
    suffix = f"-w{run.guidance_scale:g}" if guidance_scale is not None else ""
    ec = run.recipe.eval
    num, batch_size = num_samples or ec.num_samples, batch_size or ec.batch_size
    feature_net = ec.feature_net if feature_net is None else feature_net
    seed_list = evaluation_seeds(seed, seeds or ec.seeds)
    baseline_nfe = list(ec.baseline_nfe if baseline_nfe is None else baseline_nfe)
    baselines = list(ec.baselines if baselines is None else baselines)
    search = [Path(run.teacher_path) / "classifier"]
    fid = FIDMeter(feature_net, device, batch_size, search).add_real(run.real)
    report: dict = {"run_dir": str(run.run_dir), "teacher": run.teacher_path, "device": str(device),
                    "num_samples": num, "num_real": len(run.real), "seed": seed, "seeds": len(seed_list),
                    "teacher_spacing": teacher_spacing, "baselines": baselines, "baseline_nfe": baseline_nfe,
                    **feature_facts(feature_net, run, seed, search, num), "machine": machine_fingerprint(device)}
    classifier = None
    if run.classes is not None or run.prompts is not None:
        classifier = class_classifier(run, search) if run.labels(2) is not None else None
        report.update(classes=run.classes, guidance_scale=run.guidance_scale,
                      class_accuracy_by=(f"{classifier_data(reference_data(run.recipe))} classifier"
                                         if classifier is not None else None))
    if run.prompts is not None:
        report["prompts"] = run.prompts.describe()
    # 2. optional multistep-sigma search (stored only when asked)
    if search_sigmas:
        report["sigma_search"] = sigma_search(run, fid, max_steps, search_num or min(num, 500), search_candidates,
                                              seed, batch_size, store_sigmas, echo)
    # 3. every sampler from the same noise
    samplers = make_samplers(run, max_steps, teacher_sampler, teacher_steps, teacher_spacing, baseline_nfe,
                             baselines)
    lpips, report["lpips"] = load_lpips(run.recipe.loss.lpips_net, device) if use_lpips else (None, "disabled")
    report["reference"] = samplers[0].name
    report["starts"] = start_facts(run)
    report["samplers"], images = measure(samplers, run, fid, lpips, num, seed_list, batch_size, echo, progress,
                                         classifier)
    report["headline"] = headline(report["samplers"], [k for k in (1, 2, 4) if k <= max_steps])
    # 4. pictures and report
    sd = report["samplers"]
    at4 = [n for n, e in sd.items() if e["kind"] == "baseline" and e["nfe"] <= 4]
    best4 = [min(at4, key=lambda n: sd[n]["fid"])] if at4 else []
    refs = list(dict.fromkeys(s.ref or s.name for s in samplers if s.kind == "student"))
    rows = list(dict.fromkeys([samplers[0].name, *refs] + [f"student-{k}" for k in (1, 2, 4) if k <= max_steps]
                              + best4))
    columns = {} if run.classes is None else {"ncol": min(run.classes, KEPT_IMAGES), "column_label": "class {i}"}
    report["side_by_side"] = f"side_by_side{suffix}.png"
    side_by_side({f"{n} | NFE {sd[n]['nfe']} | FID {sd[n]['fid']:.2f}": images[n] for n in rows},
                 run.run_dir / report["side_by_side"], **columns)
    write_report(report, run.run_dir, suffix)
    echo(headline_table(report))
    echo(report_table(report))
    echo(f"report written to {run.run_dir / f'report{suffix}.json'} and {run.run_dir / f'report{suffix}.md'}")
    return report


def run_starts(run: EvalRun) -> list:
    """Where the run's training-free samplers start: the teacher's own start and, when it differs, the student's
    (:func:`~.baselines.student_start`)."""
    teacher = run.guided or run.teacher
    fn = run.pipe.consistency_function
    return [teacher_start(teacher)] + [s for s in [student_start(teacher, fn.sigma_max, fn.prior_mean)] if s]


def start_facts(run: EvalRun) -> dict:
    """Where the samplers start, for the report: the teacher's start and, when it differs, the student's."""
    return {s.name: s.describe() for s in run_starts(run)}


def class_classifier(run: EvalRun, search: list) -> nn.Module | None:
    """The classifier that judges a conditional run's classes: the shipped one of its data set (digits,
    Fashion-MNIST: :data:`~cmdistill.evaluation.features.CLASSIFIERS`), ``None`` (no class accuracy) for other data,
    for which cmdistill ships none, and for images of another size than the classifier's."""
    name = classifier_data(reference_data(run.recipe))
    if name not in CLASSIFIERS or CLASSIFIERS[name].side != run.real.shape[-1]:
        return None
    folder = find_classifier(name, search)
    return load_classifier(folder)[0] if folder is not None else None


__all__ = ["evaluate", "EvalError", "paired_distances", "search_multistep_sigmas", "candidate_taus",
           "evaluation_seeds", "search_seeds"]
