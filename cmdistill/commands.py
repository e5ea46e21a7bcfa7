"""What the commands do, as Python functions: each composes the layers (training, export, evaluation) that the
layers themselves never import from one another. ``cmdistill.cli`` parses arguments and calls these."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .config import Recipe, TeacherRecipe


def recipe_rules() -> tuple:
    """Every layer's recipe rules (the config's own are always applied by :func:`cmdistill.config.read_recipe`)."""
    from .evaluation.recipe_rules import EVALUATION_RULES
    from .training.recipe_rules import TRAINING_RULES

    return TRAINING_RULES, EVALUATION_RULES


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls: type = Recipe):
    """The recipe of ``cmdistill distill`` (or, with ``cls=TeacherRecipe``, of ``train-teacher``) from a YAML file
    and ``--set`` overrides, checked by every layer's rules (:func:`recipe_rules`); each problem is one
    :class:`~cmdistill.config.ConfigError` line."""
    from .config import read_recipe

    return read_recipe(path, overrides, cls, recipe_rules())


def load_teacher_recipe(path: str | Path | None, overrides: list[str] = ()) -> TeacherRecipe:
    """:func:`load_recipe` for ``cmdistill train-teacher``."""
    return load_recipe(path, overrides, TeacherRecipe)


def _with_output_dir(recipe, output_dir):
    if output_dir is None:
        return recipe
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, output_dir=str(output_dir)))


def text_components(task) -> dict:
    """A text student's ``text_encoder`` and ``tokenizer`` (its teacher's), for the exported pipeline."""
    pe = getattr(task, "prompt_encoder", None)
    return {} if pe is None else {"text_encoder": pe.text_encoder, "tokenizer": pe.tokenizer}


def export_student(task, out: Path, card: dict) -> Path:
    """The run's evaluation EMA as ``<out>/student`` (a ``ConsistencyPipeline``; a LoRA student merged into its
    network) and, for a LoRA student, its adapter as a diffusers LoRA file in ``<out>/lora``."""
    from .core.consistency import merged_student
    from .export.pipeline import save_student
    from .training.distill import lora_spec

    fn = task.ema.ema_model
    folder = save_student(merged_student(fn), out / "student", card=card, vae=task.vae, **text_components(task))
    if fn.denoiser.adapter is not None:
        from .export.lora import save_lora

        save_lora(fn, out / "lora", lora_spec(task.recipe, task.teacher), teacher=task.recipe.teacher.path)
    return folder


def distill(recipe: Recipe, output_dir: str | None = None, resume: str | None = None, overwrite: bool = False,
            echo=print) -> Path | None:
    """Consistency distillation (CM Algorithm 2) as the recipe says, the student exported as a
    ``ConsistencyPipeline`` in ``<run>/student``, then ``cmdistill evaluate`` on it when ``eval.at_end`` (with the
    sigma search stored in the student when ``eval.search_sigmas``) and the checkpoint curve when ``eval.curve``.
    ``output_dir`` overrides ``train.output_dir``; the recipe is not modified. Returns the student folder (``None``
    on processes other than the main one)."""
    from accelerate import PartialState

    from .training.distill import Distillation
    from .training.loop import peak_memory_summary, train

    t_start = time.perf_counter()
    recipe = _with_output_dir(recipe, output_dir)
    card = card_facts(recipe)
    student_dir = train(recipe, Distillation, lambda task, out: export_student(task, out, card),
                        resume=resume, overwrite=overwrite)
    state = PartialState()
    if not state.is_main_process:
        return None
    out = student_dir.parent
    ec = recipe.eval
    if ec.at_end:  # the recipe asks for the sigma search: then it is stored in the student
        from .evaluation.evaluate import evaluate

        report = evaluate(out, echo=echo, search_sigmas=ec.search_sigmas, store_sigmas=ec.search_sigmas)
        write_evaluated_card(student_dir, card, report)
    if ec.curve:
        from .evaluation.curve import evaluate_checkpoints

        evaluate_checkpoints(out, "all", echo=echo)
    echo(f"finished in {(time.perf_counter() - t_start) / 60:.1f} min, {peak_memory_summary(state.device)}")
    report = f"report: {out / 'report.md'}; " if recipe.eval.at_end else ""
    echo(f"student: {student_dir} ({report}sample it with `cmdistill sample --student {student_dir} --steps 1`)")
    return student_dir


def card_facts(recipe: Recipe) -> dict:
    """What a student's model card says about the run that made it: its teacher, recipe file and length."""
    return {"teacher": recipe.teacher.path, "recipe": str(Path(recipe.train.output_dir) / "recipe.yaml"),
            "steps": recipe.train.max_steps}


def write_evaluated_card(student_dir: Path, card: dict, report: dict) -> None:
    """Rewrite the student's model card with the evaluation ``report`` and the multistep sigmas now stored."""
    from .evaluation.generate import load_student
    from .evaluation.report import headline_table, report_table
    from .export.pipeline import write_model_card
    from .files import make_readable

    table = (f"{report['num_samples']} samples per sampler, `{report['feature_net']}` features (full report: "
             f"`report.md` of the run).\n\n{headline_table(report)}\n\n{report_table(report)}")
    write_model_card(student_dir, load_student(student_dir), **card, evaluation=table)
    make_readable(student_dir / "README.md")


def evaluate_and_store(run_dir: Path, echo=print, **kwargs) -> dict:
    """``cmdistill evaluate --search-sigmas --store``: the evaluation with the searched sigmas written into the
    student, whose model card then says them and the new table (as at the end of ``distill``)."""
    from .evaluation.evaluate import evaluate

    report = evaluate(run_dir, echo=echo, search_sigmas=True, store_sigmas=True, **kwargs)
    write_evaluated_card(run_dir / "student", card_facts(load_recipe(run_dir / "recipe.yaml")), report)
    return report


def train_teacher(recipe: TeacherRecipe, output_dir: str | None = None, resume: str | None = None,
                  overwrite: bool = False) -> Path | None:
    """Train the recipe's ``model``: a DDPM teacher (Ho et al. 2020; a pixel U-Net exported as a ``DDPMPipeline``, a
    latent DiT as a ``DiTPipeline``) or a latent teacher's autoencoder, and export its EMA in ``train.export_dir``
    (default ``<run>/pipeline``); return that folder (``None`` on other processes)."""
    from .training.loop import RunError, train
    from .training.teacher import teacher_tasks

    export = recipe.train.export_dir
    if export and any((Path(export) / f).exists() for f in ("model_index.json", "config.json")) and not overwrite \
            and resume is None:
        raise RunError(f"train.export_dir {export} already holds a model; pass --overwrite to replace it or choose "
                       "another train.export_dir")
    task, export = teacher_tasks()[recipe.model]
    return train(_with_output_dir(recipe, output_dir), task, export, resume=resume, overwrite=overwrite)
