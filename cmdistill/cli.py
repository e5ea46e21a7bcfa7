"""Command line: ``cmdistill distill``, ``sample``, ``evaluate`` (click).

Errors a user can fix (bad recipe, teacher or data that cannot be loaded, output folder conflicts,
bad checkpoints) are printed as one line on stderr with exit status 2; ``--debug`` shows the traceback.
A run stopped by a non-finite loss (``train.on_nonfinite: stop``) exits with status 1. See docs/reliability.md.
"""
from __future__ import annotations

import functools
import sys

import click

from .checkpoint import CheckpointError
from .config import ConfigError, dump_recipe, load_recipe
from .data import DataError
from .denoisers import TeacherLoadError
from .evaluate import EvalError
from .features import FeatureNetError
from .generate import SampleError

USER_ERRORS = (ConfigError, TeacherLoadError, DataError, CheckpointError, SampleError, EvalError, FeatureNetError)


def _user_errors():
    from .train import RunError

    return USER_ERRORS + (RunError,)


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
            msg = " ".join(str(e).split())  # always one line
            click.echo(f"cmdistill: error: {msg}", err=True)
            sys.exit(getattr(e, "exit_code", 2))

    return click.option("--debug", is_flag=True, help="Show full tracebacks.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmdistill")
def main():
    """cmdistill: distil a diffusers teacher into a 1-4 step consistency model.

    \b
    Typical use:
      cmdistill distill recipes/digits.yaml        # train a student (CPU, minutes)
      cmdistill sample --steps 1                   # sample the most recent student
      accelerate launch -m cmdistill distill recipes/cifar.yaml   # many GPUs
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: train.output_dir of the recipe).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.max_steps=100 (repeatable; VALUE is YAML).")
@click.option("--resume", default=None, metavar="latest|PATH",
              help="Continue from the newest checkpoint of the run folder, or from a checkpoint folder.")
@click.option("--overwrite", is_flag=True, help="Replace a different run already in the output folder.")
@click.option("--steps", type=int, default=None, metavar="N",
              help="Optimiser steps to train for (overrides train.max_steps).")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@friendly_errors
def distill(recipe, output_dir, overrides, resume, overwrite, steps, dry_run):
    """Consistency-distil the recipe's teacher (CM Algorithm 2).

    Writes checkpoints, TensorBoard logs and sample grids under the run folder, and the student as a
    ConsistencyPipeline in <output_dir>/student.
    """
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be a positive number of optimiser steps, got {steps}")
    r = load_recipe(recipe, overrides)
    if steps is not None:
        r.train.max_steps = steps
    if output_dir:
        r.train.output_dir = output_dir
    if dry_run:
        click.echo(dump_recipe(r), nl=False)
        return
    from .train import distill as run

    run(r, output_dir, resume=resume, overwrite=overwrite)


@main.command("train-teacher")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=None,
              help="Run folder for checkpoints and samples (default: train.output_dir of the recipe).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.max_steps=100 (repeatable; VALUE is YAML).")
@click.option("--resume", default=None, metavar="latest|PATH",
              help="Continue from the newest checkpoint of the run folder, or from a checkpoint folder.")
@click.option("--overwrite", is_flag=True, help="Replace a different run already in the output folder.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@friendly_errors
def train_teacher(recipe, output_dir, overrides, resume, overwrite, dry_run):
    """Train a DDPM teacher (diffusers UNet2DModel + DDPMScheduler) with an EMA of its weights.

    Exports the EMA as a DDPMPipeline folder (train.export_dir, default <output_dir>/pipeline) that
    diffusers.DDPMPipeline.from_pretrained loads and `cmdistill distill` can use as its teacher.
    """
    from .teacher_training import dump_teacher_recipe, load_teacher_recipe
    from .teacher_training import train_teacher as run

    r = load_teacher_recipe(recipe, overrides)
    if output_dir:
        r.train.output_dir = output_dir
    if dry_run:
        click.echo(dump_teacher_recipe(r), nl=False)
        return
    run(r, resume=resume, overwrite=overwrite)


# --------------------------------------------------------------------------- sampling and evaluation


def _parse_sigmas(text):
    if text is None:
        return None
    try:
        return [float(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}", param_hint="--sigmas")


@main.command()
@click.option("--student", type=click.Path(file_okay=False), default=None,
              help="Saved ConsistencyPipeline folder (default: the newest */student under ./runs).")
@click.option("--teacher", default=None, metavar="DIR_OR_ID", help="Sample this diffusers teacher instead.")
@click.option("--sampler", type=click.Choice(["ddim", "heun", "euler"]), default="ddim", show_default=True,
              help="Teacher ODE sampler (with --teacher).")
@click.option("--spacing", type=click.Choice(["leading", "trailing", "linspace"]), default=None,
              help="Teacher timestep spacing (default: its scheduler's).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Network evaluations / steps (default: 1 for the student, 50 for a teacher).")
@click.option("--sigmas", default=None, metavar="S1,S2,…", help="Student noise levels, descending (sets --steps).")
@click.option("--num", "-n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <run>/generated/<sampler tag>).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@friendly_errors
def sample(student, teacher, sampler, spacing, steps, sigmas, num, seed, out, batch_size, device):
    """Sample the newest distilled student (CM Algorithm 1) or a teacher; write PNGs, grid.png, samples.npz."""
    from pathlib import Path

    import torch

    from . import generate as G

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sig = _parse_sigmas(sigmas)
    if teacher is not None:
        from .denoisers import load_teacher

        if sig is not None:
            raise G.SampleError("--sigmas applies to the student; the teacher uses its own timesteps")
        steps = steps or 50
        den = load_teacher(teacher).to(device)
        x = G.sample_teacher(den, num, sampler, steps, seed, batch_size, spacing)
        tag, meta = f"teacher-{sampler}{steps}-seed{seed}", {"teacher": teacher, "sampler": sampler,
                                                              "spacing": spacing}
        base = Path("generated")
    else:
        if student is None:
            student = G.find_latest_student()
            click.echo(f"using student {student} (newest under ./{G.RUNS_ROOT})")
        if sig is not None and steps is not None and steps != len(sig):
            raise G.SampleError(f"--steps {steps} does not match the {len(sig)} values of --sigmas")
        pipe = G.load_student(student, device)
        try:
            x, sig = G.sample_student(pipe, num, steps or 1, sig, seed, batch_size)
        except ValueError as e:
            raise G.SampleError(str(e)) from e
        steps = len(sig)
        tag, meta = f"student-{steps}step-seed{seed}", {"student": str(student), "sigmas": sig}
        base = Path(student).parent / "generated"
    meta.update(steps=steps, seed=seed, num=num)
    folder = G.write_samples(x, Path(out) if out else base / tag, meta)
    click.echo(f"wrote {num} images, grid.png and samples.npz to {folder}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--num", "-n", type=click.IntRange(min=2), default=None, help="Samples per sampler (eval.num_samples).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size (eval.batch_size).")
@click.option("--feature-net", type=click.Choice(["inception", "digits"]), default=None,
              help="FID features (eval.feature_net).")
@click.option("--teacher", default=None, metavar="DIR_OR_ID", help="Teacher (default: teacher.path of the run).")
@click.option("--teacher-sampler", type=click.Choice(["ddim", "heun", "euler"]), default="ddim", show_default=True)
@click.option("--teacher-steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--teacher-spacing", type=click.Choice(["trailing", "leading", "linspace"]), default="trailing",
              show_default=True, help="Timestep spacing of the teacher samplers.")
@click.option("--max-steps", type=click.IntRange(1, 8), default=4, show_default=True,
              help="Evaluate the student and teacher DDIM at 1…K steps.")
@click.option("--search-sigmas/--no-search-sigmas", default=None,
              help="Pick the 2…K-step sigmas by FID and store them in the student (eval.search_sigmas).")
@click.option("--search-num", type=click.IntRange(min=2), default=None, help="Samples per search trial (≤ 500).")
@click.option("--search-candidates", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS even when its weights are cached.")
@friendly_errors
def evaluate(run_dir, num, batch_size, feature_net, teacher, teacher_sampler, teacher_steps, teacher_spacing,
             max_steps, search_sigmas, search_num, search_candidates, seed, device, no_lpips):
    """FID of the student at 1…K steps, of the teacher's DDIM-k and 50-step samplers, paired distances to the
    teacher from the same noise, images/s; writes report.json, report.md and side_by_side.png in RUN_DIR
    (default: the newest run under ./runs)."""
    from pathlib import Path

    from . import generate as G
    from .evaluate import evaluate as run

    if run_dir is None:
        run_dir = G.find_latest_student().parent
        click.echo(f"evaluating {run_dir} (newest run under ./{G.RUNS_ROOT})")
    run(Path(run_dir), num, batch_size, max_steps, teacher_steps, teacher_sampler, teacher_spacing, feature_net,
        teacher, search_sigmas, search_num, search_candidates, seed, device, not no_lpips, echo=click.echo)


@main.command("train-classifier")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="recipes/teachers/digits/classifier",
              show_default=True, help="Folder for model.safetensors + config.json.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def train_classifier(out, epochs, seed):
    """Train the digits CNN whose penultimate features give FID on 8x8 digits (eval.feature_net=digits)."""
    from .data import digits_dataset
    from .features import ClassifierFeatures, real_vs_real_fid, save_classifier, train_digits_classifier

    clf, metrics = train_digits_classifier(epochs=epochs, seed=seed)
    metrics["fid_floor_real_vs_real"] = real_vs_real_fid(ClassifierFeatures(clf), digits_dataset("").tensors[0])
    save_classifier(clf, out, metrics)
    click.echo(f"test accuracy {metrics['test_accuracy']:.4f} ({metrics['num_test']} held-out digits), "
               f"train {metrics['train_accuracy']:.4f}; real-vs-real FID floor "
               f"{metrics['fid_floor_real_vs_real']:.3f}; saved to {out}")


if __name__ == "__main__":
    main()
