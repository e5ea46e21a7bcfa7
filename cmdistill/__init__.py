"""cmdistill: distil a diffusers teacher into a 1-4 step consistency model.

Layers (docs/architecture.md): :mod:`cmdistill.core` (the numerical core), :mod:`cmdistill.training` (the one
loop), :mod:`cmdistill.export` (the pipeline), :mod:`cmdistill.evaluation`, and at the edges ``config``, ``data``,
``teachers``, ``images``, ``commands`` and ``cli``.

``import cmdistill`` is what registers :class:`ConsistencyPipeline` with diffusers, so that
``diffusers.DiffusionPipeline.from_pretrained(student_dir)`` returns one. The package itself loads lazily (the public
names below are imported on first use, diffusers when it is first imported), so ``cmdistill --help`` starts without
torch or diffusers.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_PUBLIC = {
    "ConsistencyPipeline": "cmdistill.export.pipeline",
    "ConsistencyFunction": "cmdistill.core.consistency",
    "make_student": "cmdistill.core.consistency",
    "DDPMDenoiser": "cmdistill.core.denoisers",
    "EDMDenoiser": "cmdistill.core.denoisers",
    "load_teacher": "cmdistill.teachers",
    "distill": "cmdistill.commands",
    "train_teacher": "cmdistill.commands",
    "load_recipe": "cmdistill.commands",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cmdistill' has no attribute {name!r}")


class _RegisterWithDiffusers(importlib.abc.MetaPathFinder):
    """Registers the pipeline class with diffusers right after diffusers is imported (once)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("diffusers")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            importlib.import_module("cmdistill.export.pipeline")  # registers on import

        spec.loader.exec_module = exec_and_register
        return spec


if "diffusers" in sys.modules:
    importlib.import_module("cmdistill.export.pipeline")
elif not any(isinstance(f, _RegisterWithDiffusers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithDiffusers())
