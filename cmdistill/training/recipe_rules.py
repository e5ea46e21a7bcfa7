"""The recipe rules of the training layer (:class:`~cmdistill.config.RecipeRules`): the registries behind the
``train``, ``optim``, ``bank`` and ``loss.regression_schedule`` keys, and the checks that tie the trajectory bank to
the keys that need it. :func:`cmdistill.commands.load_recipe` applies them with every other layer's."""
from __future__ import annotations

from ..config import ConfigError, Recipe, RecipeRules
from ..core.solvers import SOLVERS
from .bank import BANK_STARTS, REGRESSION_SCHEDULES
from .optim import LR_SCHEDULES, OPTIMIZERS

MIXED_PRECISION = ("no", "fp16", "bf16")   # accelerate's mixed_precision values the loop runs
NONFINITE_MODES = ("stop", "skip")         # train.on_nonfinite: the loop's NonFiniteGuard
TEACHER_MODELS = ("unet", "dit", "sd", "autoencoder")  # train-teacher's model key (cmdistill.training.teacher.teacher_tasks)


def training_registries() -> dict:
    return {"train.mixed_precision": MIXED_PRECISION, "train.on_nonfinite": NONFINITE_MODES,
            "optim.name": OPTIMIZERS, "optim.lr_schedule": LR_SCHEDULES, "bank.start": BANK_STARTS,
            "bank.solver": SOLVERS, "loss.regression_schedule": REGRESSION_SCHEDULES, "model": TEACHER_MODELS}


def check_training(recipe) -> None:
    """A distillation recipe's trajectory bank: there whenever a key needs it, and of the kind it needs."""
    if not isinstance(recipe, Recipe):
        return
    bc, lc = recipe.bank, recipe.loss
    if (lc.regression_weight > 0 or recipe.data.name == "teacher") and bc.count == 0:
        need = "loss.regression_weight" if lc.regression_weight > 0 else "data.name: teacher"
        raise ConfigError(f"'{need}' needs a trajectory bank: set bank.count (e.g. 4096)")
    if recipe.data.name == "teacher" and bc.start != "teacher":
        raise ConfigError("'data.name: teacher' trains on the teacher's own samples: it needs 'bank.start: teacher' "
                          "(trajectories from the top of the teacher's range)")
    if bc.num_scales is not None and bc.num_scales < 2:
        raise ConfigError("'bank.num_scales' must be at least 2 (grid points)")


TRAINING_RULES = RecipeRules(training_registries, check_training)
