"""cmdistill: distil a diffusers teacher into a 1-4 step consistency model.

Layers (docs/architecture.md): :mod:`cmdistill.core` (the numerical core), :mod:`cmdistill.training` (the one
loop), :mod:`cmdistill.export` (the pipeline), :mod:`cmdistill.evaluation`, and at the edges ``config``, ``data``,
``teachers``, ``images``, ``commands`` and ``cli``. Importing the package registers :class:`ConsistencyPipeline`
with diffusers.
"""
from .commands import distill, train_teacher
from .core.consistency import ConsistencyFunction, make_student
from .core.denoisers import DDPMDenoiser, EDMDenoiser
from .export.pipeline import ConsistencyPipeline
from .teachers import load_teacher

__version__ = "0.1.0"
__all__ = ["ConsistencyPipeline", "ConsistencyFunction", "DDPMDenoiser", "EDMDenoiser", "load_teacher",
           "make_student", "distill", "train_teacher", "__version__"]
