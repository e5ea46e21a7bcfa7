"""Command line: ``cmdistill distill``, ``sample``, ``evaluate`` (click).

Errors a user can fix (bad recipe, teacher or data that cannot be loaded, output folder conflicts,
bad checkpoints) are printed as one line on stderr with exit status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import functools
import sys

import click

from .checkpoint import CheckpointError
from .config import ConfigError, dump_recipe, load_recipe
from .data import DataError
from .denoisers import TeacherLoadError

USER_ERRORS = (ConfigError, TeacherLoadError, DataError, CheckpointError)


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
            click.echo(f"cmdistill: error: {e}", err=True)
            sys.exit(2)

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
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@friendly_errors
def distill(recipe, output_dir, overrides, resume, overwrite, dry_run):
    """Consistency-distil the recipe's teacher (CM Algorithm 2).

    Writes checkpoints, TensorBoard logs and sample grids under the run folder, and the student as a
    ConsistencyPipeline in <output_dir>/student.
    """
    r = load_recipe(recipe, overrides)
    if output_dir:
        r.train.output_dir = output_dir
    if dry_run:
        click.echo(dump_recipe(r), nl=False)
        return
    from .train import distill as run

    run(r, output_dir, resume=resume, overwrite=overwrite)


if __name__ == "__main__":
    main()
