"""Command line: ``cmdistill distill``, ``train-teacher``, ``sample``, ``evaluate``, ``train-classifier`` (click).

Parsing only: each command calls the Python function that does the work (:mod:`cmdistill.commands`, the
evaluation layer). Errors a user can fix (bad recipe, teacher, data or student folder, output folder conflicts, bad
checkpoints) are printed as one line on stderr with exit status 2; ``--debug`` shows the traceback. A run stopped
by a non-finite loss (``train.on_nonfinite: stop``) exits with status 1. See docs/reliability.md.
"""
from __future__ import annotations

import functools
import os
import sys

import click

from .config import ConfigError, dump_recipe

# Choices shown by --help, written here so that --help imports neither torch nor diffusers (it answers in a fraction
# of a second); tests/test_cli_help.py checks that they equal the registries they stand for. A value is checked
# against the registry itself (RegistryChoice), so an entry registered from Python is accepted too.
SOLVER_CHOICES = ("heun", "euler", "ddim")            # cmdistill.core.solvers.SOLVERS
SPACING_CHOICES = ("trailing", "leading", "linspace")  # cmdistill.core.schedules.TIMESTEP_SPACINGS
DEFAULT_TEACHER_SPACING = "trailing"                   # cmdistill.core.schedules.DEFAULT_TEACHER_SPACING
FEATURE_NET_CHOICES = ("inception", "digits", "fashion_mnist")  # cmdistill.evaluation.features.feature_net_names()


class RegistryChoice(click.Choice):
    """A choice among the keys of a registry, read when a value is given (after ``--help`` has been answered): the
    help lists the built-in names, and any name registered from Python is accepted as well."""

    def __init__(self, shown: tuple[str, ...], registry: str):
        super().__init__(shown)
        self.registry = registry  # "module:NAME"

    def convert(self, value, param, ctx):
        import importlib

        module, name = self.registry.split(":")
        self.choices = tuple(getattr(importlib.import_module(module), name))
        return super().convert(value, param, ctx)


SOLVER_TYPE = RegistryChoice(SOLVER_CHOICES, "cmdistill.core.solvers:SOLVERS")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that means "bad input", printed as one line (imported here, not at start-up)."""
    from .data import DataError
    from .evaluation.evaluate import EvalError
    from .evaluation.features import FeatureNetError
    from .evaluation.generate import SampleError
    from .export.pipeline import StudentLoadError
    from .teachers import TeacherLoadError
    from .training.checkpoint import CheckpointError
    from .training.loop import RunError

    return (ConfigError, TeacherLoadError, DataError, CheckpointError, SampleError, EvalError, FeatureNetError,
            StudentLoadError, RunError)


def _is_main_process() -> bool:
    """Under ``accelerate launch`` / ``torchrun`` only rank 0 prints an error; the others exit quietly."""
    return os.environ.get("RANK", "0") in ("", "0")


def friendly_errors(fn):
    """Turn user-fixable errors into one line on stderr and exit status 2 (unless ``--debug``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            if debug:
                raise
            if _is_main_process():
                msg = " ".join(str(e).split())  # always one line
                click.echo(f"cmdistill: error: {msg}", err=True)
            sys.exit(getattr(e, "exit_code", 2))

    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(wrapper)


class OneLineErrors(click.Group):
    """Usage errors (a bad option value, a missing argument) as one line on stderr with exit status 2, like every
    other error a user can fix; ``--help`` names the options."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            cmd = f" {e.ctx.info_name}" if getattr(e, "ctx", None) is not None and e.ctx.parent else ""
            hint = f" (see cmdistill{cmd} --help)" if isinstance(e, click.UsageError) else ""
            if _is_main_process():
                click.echo(f"cmdistill: error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="cmdistill")
def main():
    """cmdistill: distil a diffusers teacher into a 1-4 step consistency model.

    \b
    Typical use:
      cmdistill distill recipes/digits.yaml        # train a student (CPU, minutes)
      cmdistill sample --steps 1                   # sample the most recent student
      accelerate launch -m cmdistill distill recipes/cifar.yaml   # many GPUs
    """


# options both training commands take
def _training_options(fn):
    for opt in reversed([
        click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=None, show_default=True,
                     help="Run folder (default: train.output_dir of the recipe)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", show_default=True,
                     help="Override a recipe value, e.g. --set train.max_steps=100 (repeatable; VALUE is YAML)."),
        click.option("--resume", default=None, metavar="latest|PATH", show_default=True,
                     help="Continue from the newest checkpoint of the run folder, or from a checkpoint folder."),
        click.option("--overwrite", is_flag=True, help="Replace a different run already in the output folder."),
        click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit."),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_training_options
@click.option("--steps", type=click.IntRange(min=1), default=None, metavar="N", show_default=True,
              help="Optimiser steps to train for (default: train.max_steps of the recipe).")
@friendly_errors
def distill(recipe, output_dir, overrides, resume, overwrite, dry_run, steps):
    """Consistency-distil the recipe's teacher (CM Algorithm 2).

    Writes checkpoints, TensorBoard logs and sample grids under the run folder, and the student as a
    ConsistencyPipeline in <output_dir>/student; with eval.at_end, then evaluates it.
    """
    from .commands import distill as run
    from .commands import load_recipe

    r = load_recipe(recipe, list(overrides) + ([f"train.max_steps={steps}"] if steps is not None else []))
    if dry_run:
        if output_dir:
            r.train.output_dir = output_dir
        click.echo(dump_recipe(r), nl=False)
        return
    run(r, output_dir, resume=resume, overwrite=overwrite, echo=click.echo)


@main.command("train-teacher")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_training_options
@friendly_errors
def train_teacher(recipe, output_dir, overrides, resume, overwrite, dry_run):
    """Train a teacher (or a latent teacher's VAE) with an EMA of its weights; the recipe's `model` says which.

    \b
    model: unet         UNet2DModel + DDPMScheduler, exported as a DDPMPipeline
    model: autoencoder  AutoencoderKL (reconstruction + KL), exported as a diffusers model folder
    model: dit          class-conditional DiTTransformer2DModel on latent.vae's cached latents -> DiTPipeline
    model: sd           UNet2DConditionModel + CLIPTextModel + tokenizer on captions -> StableDiffusionPipeline

    The EMA is exported to train.export_dir (default <output_dir>/pipeline); the diffusers pipeline class above
    loads it, and `cmdistill distill` takes it as its teacher.
    """
    from .commands import load_teacher_recipe
    from .commands import train_teacher as run

    r = load_teacher_recipe(recipe, overrides)
    if dry_run:
        if output_dir:
            r.train.output_dir = output_dir
        click.echo(dump_recipe(r), nl=False)
        return
    run(r, output_dir, resume=resume, overwrite=overwrite)


# --------------------------------------------------------------------------- sampling and evaluation


def _parse_sigmas(text):
    if text is None:
        return None
    try:
        return [float(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}", param_hint="--sigmas")


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


DEVICE_HELP = "torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)."
SPACING_HELP = ("Teacher timestep spacing, as diffusers' DDIMScheduler(timestep_spacing=…): trailing starts every "
                "k-step sampler at t = T-1.")


def label_tag(class_label, guidance_scale, prompt=None) -> str:
    """The part of a sample folder's name that says which class or prompt and guidance scale it holds."""
    slug = "-".join("".join(c for c in w if c.isalnum()) for w in (prompt or "").lower().split())[:40]
    return ((f"-class{class_label}" if class_label is not None else "") + (f"-{slug}" if slug else "")
            + (f"-w{guidance_scale:g}" if guidance_scale is not None else ""))


@main.command()
@click.option("--student", type=click.Path(file_okay=False), default=None, show_default=True,
              help="Saved ConsistencyPipeline folder or run folder (default: the newest */student under ./runs).")
@click.option("--teacher", default=None, metavar="DIR_OR_ID", show_default=True,
              help="Sample this diffusers teacher instead of a student.")
@click.option("--sampler", type=SOLVER_TYPE, default="ddim", show_default=True,
              help="Teacher ODE sampler (with --teacher).")
@click.option("--spacing", type=click.Choice(SPACING_CHOICES), default=DEFAULT_TEACHER_SPACING, show_default=True,
              help=SPACING_HELP + " With --teacher.")
@click.option("--steps", type=click.IntRange(min=1), default=None, show_default=True,
              help="Network evaluations / steps (default: 1 for the student, 50 for a teacher).")
@click.option("--sigmas", default=None, metavar="S1,S2,…", show_default=True,
              help="Student noise levels, descending (sets --steps; default: the student's stored ones).")
@click.option("--num", "-n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of images.")
@click.option("--class-label", type=click.IntRange(min=0), default=None, show_default=True,
              help="Class of every image, for a class-conditional student or teacher (diffusers' class_labels).")
@click.option("--prompt", default=None, metavar="TEXT", show_default=True,
              help="Prompt of every image, for a text-conditional student or teacher (diffusers' prompt).")
@click.option("--guidance-scale", type=click.FloatRange(min=0), default=None, metavar="W", show_default=True,
              help="Classifier-free guidance scale w: any w of a student distilled for a range of w (default: its "
                   "own); a teacher is sampled with CFG at w (default 1: the conditional teacher).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, show_default=True,
              help="Output folder (default: <run>/generated/<tag>, or runs/generated/<tag> for a teacher).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per network call.")
@click.option("--device", default=None, show_default=True, help=DEVICE_HELP)
@friendly_errors
def sample(student, teacher, sampler, spacing, steps, sigmas, num, class_label, prompt, guidance_scale, seed, out,
           batch_size, device):
    """Sample the newest distilled student (CM Algorithm 1) or a teacher; write PNGs, grid.png, samples.npz."""
    from pathlib import Path

    from .evaluation import generate as G

    device = _device(device)
    sig = _parse_sigmas(sigmas)
    if teacher is not None:
        from .latents import load_teacher_vae
        from .teachers import load_teacher

        if sig is not None:
            raise G.SampleError("--sigmas applies to the student")
        steps = steps or 50
        den = load_teacher(teacher).to(device)
        texts = {}
        if prompt is not None:
            from .teachers import text_encoder

            if not hasattr(den, "empty_condition"):
                raise G.SampleError("--prompt needs a text-conditional teacher; this one takes no text")
            texts = {"prompt": prompt, "prompt_encoder": text_encoder(teacher, device)}
        x = G.sample_teacher(den, num, sampler, steps, seed, batch_size, spacing, class_label=class_label,
                             guidance_scale=guidance_scale, vae=load_teacher_vae(teacher, device), **texts)
        tag = f"teacher-{sampler}{steps}-seed{seed}" + label_tag(class_label, guidance_scale, prompt)
        meta = {"teacher": teacher, "sampler": sampler, "spacing": spacing, "class_label": class_label,
                "prompt": prompt, "guidance_scale": guidance_scale}
        base = Path("runs") / "generated"
    else:
        if student is None:
            student = G.find_latest_student()
            click.echo(f"using student {student} (newest under ./{G.RUNS_ROOT})")
        if sig is not None and steps is not None and steps != len(sig):
            raise G.SampleError(f"--steps {steps} does not match the {len(sig)} values of --sigmas")
        pipe = G.load_student(student, device)
        try:
            x, sig = G.sample_student(pipe, num, steps or 1, sig, seed, batch_size, class_label=class_label,
                                      guidance_scale=guidance_scale, prompt=prompt)
        except ValueError as e:
            raise G.SampleError(str(e)) from e
        steps = len(sig)
        tag = f"student-{steps}step-seed{seed}" + label_tag(class_label, guidance_scale, prompt)
        meta = {"student": str(student), "sigmas": sig, "class_label": class_label, "prompt": prompt,
                "guidance_scale": guidance_scale}
        folder = Path(student)
        base = (folder if (folder / "recipe.yaml").is_file() else folder.parent) / "generated"
    meta.update(steps=steps, seed=seed, num=num)
    folder = G.write_samples(x, Path(out) if out else base / tag, meta)
    click.echo(f"wrote {num} images, grid.png and samples.npz to {folder}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--num", "-n", type=click.IntRange(min=2), default=None, show_default=True,
              help="Samples per sampler (default: eval.num_samples of the run's recipe).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, show_default=True,
              help="Images per network call (default: eval.batch_size).")
@click.option("--feature-net", type=click.Choice(FEATURE_NET_CHOICES), default=None, show_default=True,
              help="FID features (default: eval.feature_net).")
@click.option("--teacher", default=None, metavar="DIR_OR_ID", show_default=True,
              help="Teacher (default: teacher.path of the run).")
@click.option("--teacher-sampler", type=SOLVER_TYPE, default="ddim", show_default=True,
              help="ODE sampler of the reference teacher row.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps of the reference teacher sampler.")
@click.option("--teacher-spacing", type=click.Choice(SPACING_CHOICES), default=DEFAULT_TEACHER_SPACING,
              show_default=True, help=SPACING_HELP)
@click.option("--max-steps", type=click.IntRange(1, 8), default=4, show_default=True,
              help="Evaluate the student and the teacher's DDIM at 1…K steps.")
@click.option("--search-sigmas", is_flag=True,
              help="Pick the 2…K-step sigmas by FID (CM's greedy search, on noise disjoint from the evaluation's) "
                   "and use them for this report.")
@click.option("--store", is_flag=True, help="With --search-sigmas: write the sigmas found into <run>/student and "
                                          "rewrite its model card with them and this evaluation.")
@click.option("--search-num", type=click.IntRange(min=2), default=None, show_default=True,
              help="Samples per search trial (default: min(--num, 500)).")
@click.option("--search-candidates", type=click.IntRange(min=1), default=12, show_default=True,
              help="Candidate noise levels of the sigma search (interior of a Karras grid).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="First seed of the evaluation noise (the sigma search uses seed + 1000).")
@click.option("--seeds", type=click.IntRange(1, 100), default=None, show_default=True,
              help="Repeat the sampling with this many noise seeds and report mean ± std (default: eval.seeds).")
@click.option("--baseline-nfe", default=None, metavar="N1,N2,…", show_default=True,
              help="Network-evaluation budgets of the training-free baselines (default: eval.baseline_nfe).")
@click.option("--checkpoints", default=None, metavar="all|STEP,…", show_default=True,
              help="Instead: score the evaluation-EMA weights of these saved checkpoints (read only) and write "
                   "curve.json and curve.png.")
@click.option("--guidance-scale", type=click.FloatRange(min=0), default=None, metavar="W", show_default=True,
              help="Conditional run: evaluate teacher and student at this classifier-free guidance scale "
                   "(default: the student's own w; an explicit W writes report-wW.json/.md, side_by_side-wW.png).")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None, metavar="FILE", show_default=True,
              help="Text-conditional run: evaluate on these prompts, one per line, taken in turn (default: the "
                   "captions of the eval data, image by image).")
@click.option("--device", default=None, show_default=True, help=DEVICE_HELP)
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS even when its weights are cached.")
@friendly_errors
def evaluate(run_dir, num, batch_size, feature_net, teacher, teacher_sampler, teacher_steps, teacher_spacing,
             max_steps, search_sigmas, store, search_num, search_candidates, seed, seeds, baseline_nfe, checkpoints,
             guidance_scale, prompts, device, no_lpips):
    """Measure a run: the student at 1…K steps against the teacher's DDIM-k and 50-step samplers and the
    training-free baselines (DPM-Solver++ 2M, UniPC, Heun-Karras): FID, precision, recall, paired distances to the
    teacher from the same noise, images/s, headline speed-ups. Writes report.json, report.md and side_by_side.png
    in RUN_DIR (default: the newest run under ./runs) and changes nothing else (unless --store)."""
    from pathlib import Path

    from .evaluation import generate as G
    from .evaluation.evaluate import EvalError
    from .evaluation.evaluate import evaluate as run

    if run_dir is None:
        run_dir = G.find_latest_student().parent
        click.echo(f"evaluating {run_dir} (newest run under ./{G.RUNS_ROOT})")
    if store and not search_sigmas:
        raise EvalError("--store stores the sigmas that --search-sigmas finds; pass both")
    nfe = None
    if baseline_nfe is not None:
        try:
            nfe = [int(n) for n in baseline_nfe.replace(",", " ").split()]
        except ValueError:
            raise EvalError(f"--baseline-nfe takes integers separated by commas, got {baseline_nfe!r}") from None
        if not nfe or min(nfe) < 1:
            raise EvalError(f"--baseline-nfe takes positive integers, got {baseline_nfe!r}")
    if checkpoints is not None:
        from .evaluation.curve import evaluate_checkpoints

        if prompts is not None:
            raise EvalError("--prompts applies to the full evaluation, not to --checkpoints")

        evaluate_checkpoints(Path(run_dir), checkpoints, num, batch_size, feature_net, seed, device,
                             echo=click.echo, guidance_scale=guidance_scale)
        return
    if store and guidance_scale is not None:
        raise EvalError("--store writes sigmas searched at the student's own guidance scale; drop --guidance-scale")
    kwargs = dict(num_samples=num, batch_size=batch_size, max_steps=max_steps, teacher_steps=teacher_steps,
                  teacher_sampler=teacher_sampler, teacher_spacing=teacher_spacing, feature_net=feature_net,
                  teacher_path=teacher, search_num=search_num, search_candidates=search_candidates, seed=seed,
                  device=device, use_lpips=not no_lpips, seeds=seeds, baseline_nfe=nfe, guidance_scale=guidance_scale,
                  prompts=prompts)
    if store:  # the student's sigmas change: its model card is rewritten with them and this evaluation
        from .commands import evaluate_and_store

        evaluate_and_store(Path(run_dir), echo=click.echo, **kwargs)
    else:
        run(Path(run_dir), search_sigmas=search_sigmas, echo=click.echo, **kwargs)


@main.command("train-classifier")
@click.option("--data", "data_name", type=click.Choice(["digits", "fashion_mnist"]), default="digits",
              show_default=True, help="The data set whose classifier to train (8x8 digits, or Fashion-MNIST at 32x32).")
@click.option("--data-root", default="/usr/share/datasets/fashion-mnist", show_default=True, metavar="DIR",
              help="Folder of Fashion-MNIST's IDX files (apt-get install dataset-fashion-mnist); unused for digits.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, show_default=True,
              help="Folder for model.safetensors + config.json (default: runs/<data>-classifier; use it with "
                   "CMDISTILL_DIGITS_CLASSIFIER or CMDISTILL_FASHION_CLASSIFIER=FOLDER).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, show_default=True,
              help="Training epochs (default: 30 for digits, 6 for Fashion-MNIST).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the training run.")
@friendly_errors
def train_classifier(data_name, data_root, out, epochs, seed):
    """Train the small CNN whose penultimate features give FID (eval.feature_net=digits or fashion_mnist) and whose
    predictions give the class accuracy of conditional samples.

    The package ships one per data set (cmdistill/assets/); a retrained one changes every FID in its feature space,
    so it is written elsewhere and only used where its environment variable points to it.
    """
    from pathlib import Path

    from .evaluation.features import CLASSIFIERS, ClassifierFeatures, real_vs_real_fid, save_classifier, \
        train_classifier as train
    from .training.loop import RunError

    out = out or f"runs/{data_name.replace('_', '-')}-classifier"
    if Path(out).exists() and any(Path(out).iterdir()):
        raise RunError(f"{out} already exists and is not empty; choose another --out")
    clf, metrics = train(data_name, data_root, epochs=epochs, seed=seed)
    x_train = CLASSIFIERS[data_name].train_test(data_root)[0]
    metrics["fid_floor_real_vs_real"] = real_vs_real_fid(ClassifierFeatures(clf), x_train[:20_000])
    save_classifier(clf, out, metrics)
    click.echo(f"test accuracy {metrics['test_accuracy']:.4f} ({metrics['num_test']} held-out images), "
               f"train {metrics['train_accuracy']:.4f}; real-vs-real FID floor "
               f"{metrics['fid_floor_real_vs_real']:.3f}; saved to {out}")


if __name__ == "__main__":
    main()
