"""cmdistill: distil a diffusers teacher into a 1-4 step consistency model."""
from .consistency import ConsistencyFunction, make_student
from .denoisers import DDPMDenoiser, EDMDenoiser, load_teacher
from .pipeline import ConsistencyPipeline

__version__ = "0.1.0"
__all__ = ["ConsistencyPipeline", "ConsistencyFunction", "DDPMDenoiser", "EDMDenoiser", "load_teacher",
           "make_student", "__version__"]
