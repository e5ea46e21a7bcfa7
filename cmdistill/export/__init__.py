"""Export: the scheduler-free diffusers pipeline a distilled student is saved and loaded as."""
from .pipeline import ConsistencyPipeline, StudentLoadError, check_student_folder, save_student

__all__ = ["ConsistencyPipeline", "StudentLoadError", "check_student_folder", "save_student"]
