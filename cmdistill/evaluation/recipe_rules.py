"""The recipe rules of the evaluation layer (:class:`~cmdistill.config.RecipeRules`): the registries behind the
``eval`` keys and the check that a data-free run names the real images it is measured against.
:func:`cmdistill.commands.load_recipe` applies them with every other layer's."""
from __future__ import annotations

from ..config import ConfigError, Recipe, RecipeRules
from ..data import DATASETS
from .baselines import BASELINES
from .features import feature_net_names


def evaluation_registries() -> dict:
    return {"eval.feature_net": feature_net_names(), "eval.data": (None, *DATASETS)}


def check_evaluation(recipe) -> None:
    """``eval.baselines`` and their budgets, and the reference images of a data-free run."""
    if not isinstance(recipe, Recipe):
        return
    ec = recipe.eval
    for b in ec.baselines:
        if b not in BASELINES:
            raise ConfigError(f"'eval.baselines' entries must be among {', '.join(BASELINES)}; got {b!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in ec.baseline_nfe):
        raise ConfigError(f"'eval.baseline_nfe' must be a list of positive integers, got {ec.baseline_nfe!r}")
    if recipe.data.name == "teacher" and ec.data is None and (ec.at_end or ec.curve):
        raise ConfigError("a data-free run (data.name: teacher) is evaluated against real images: set 'eval.data' "
                          f"(one of {', '.join(DATASETS)}), or eval.at_end and eval.curve to false")


EVALUATION_RULES = RecipeRules(evaluation_registries, check_evaluation)
