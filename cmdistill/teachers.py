"""Loading a diffusers teacher from a local folder or the Hugging Face Hub as an EDM denoiser
(:mod:`cmdistill.core.denoisers`). The only module that reads teacher files; the adapters themselves do no I/O."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .core.denoisers import Denoiser, UnsupportedTeacher, build_denoiser, infer_kind
from .core.networks import takes_text


class TeacherLoadError(RuntimeError):
    """A teacher folder or hub id could not be loaded (missing, malformed, unsupported, or offline)."""


NETWORK_SUBFOLDERS = ("unet", "transformer")  # where diffusers pipelines keep the denoising network
AUTOENCODER_SUBFOLDERS = ("vae", "vqvae")     # and the autoencoder of a latent teacher (LDMPipeline: vqvae)
TEXT_SUBFOLDERS = ("text_encoder", "tokenizer")   # and the prompt encoder of a text-conditional teacher
# what a hub download fetches: the network, the scheduler, the autoencoder and a text teacher's tokenizer and text
# encoder (safetensors weights only), never safety checkers or feature extractors
HUB_PATTERNS = ["model_index.json", "config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors",
                *(f"{d}/*.{e}" for d in (*NETWORK_SUBFOLDERS, *AUTOENCODER_SUBFOLDERS, "scheduler")
                  for e in ("json", "safetensors")),
                "text_encoder/*.json", "text_encoder/model.safetensors", "tokenizer/*"]


def _resolve_folder(path_or_id: str) -> Path:
    """A local folder as is; a hub id through ``huggingface_hub.snapshot_download`` (json + weights only)."""
    p = Path(os.path.expanduser(path_or_id))
    if p.exists():
        if not p.is_dir():
            raise TeacherLoadError(f"teacher {path_or_id!r} is a file, expected a folder or a hub id")
        return p
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise TeacherLoadError(f"teacher folder {path_or_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, network error: one clear line
        reason = type(e).__name__
        raise TeacherLoadError(
            f"cannot download teacher {path_or_id!r} from the Hugging Face Hub ({reason}); "
            "are you offline? Download it once with network access or pass a local folder"
        ) from e


def find_teacher_layout(folder: Path) -> tuple[Path, Path]:
    """Return ``(model_dir, scheduler_config_file)`` for a pipeline layout (model_index.json, ``unet/`` or
    ``transformer/``, scheduler/: DDPMPipeline, DiTPipeline, LDMPipeline) or the flat layout of
    ``google/ddpm-cifar10-32`` (config.json + scheduler_config.json)."""
    nets = [folder / d for d in NETWORK_SUBFOLDERS if (folder / d / "config.json").exists()]
    if (folder / "model_index.json").exists() and nets:
        model_dir, sched = nets[0], folder / "scheduler" / "scheduler_config.json"
    else:
        model_dir, sched = folder, folder / "scheduler_config.json"
    if not (model_dir / "config.json").exists():
        raise TeacherLoadError(f"no model config.json in {model_dir} (expected a diffusers model folder)")
    if not sched.exists():
        raise TeacherLoadError(f"no scheduler_config.json for the teacher in {folder}")
    return model_dir, sched


def teacher_autoencoder(path_or_id: str) -> Path | None:
    """The autoencoder folder of a latent teacher (its ``vae/`` or ``vqvae/``), ``None`` for a pixel teacher."""
    folder = _resolve_folder(path_or_id)
    for d in AUTOENCODER_SUBFOLDERS:
        if (folder / d / "config.json").exists():
            return folder / d
    return None


def load_teacher(path_or_id: str, kind: str = "auto", strict_range: bool = True, dtype=None) -> Denoiser:
    """Load a diffusers teacher (hub id or local folder, either layout) as an EDM denoiser, its network's weights
    in ``dtype`` (``torch_dtype`` of ``from_pretrained``; ``None``: as saved, fp32 for cmdistill's teachers)."""
    import diffusers

    folder = _resolve_folder(path_or_id)
    model_dir, sched_file = find_teacher_layout(folder)
    try:
        model_cfg = json.loads((model_dir / "config.json").read_text())
        sched_cfg = json.loads(sched_file.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise TeacherLoadError(f"malformed teacher config in {folder}: {e}") from e
    if not isinstance(model_cfg, dict) or not isinstance(sched_cfg, dict):
        raise TeacherLoadError(f"malformed teacher config in {folder}: expected JSON objects")
    try:
        infer_kind(sched_cfg)  # an unsupported scheduler is refused before any weights are read
    except UnsupportedTeacher as e:
        raise TeacherLoadError(f"teacher {path_or_id!r}: {e}") from None
    cls_name = model_cfg.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise TeacherLoadError(f"teacher model class {cls_name!r} is not a diffusers model")
    try:
        net = cls.from_pretrained(model_dir, **({"torch_dtype": dtype} if dtype is not None else {}))
    except Exception as e:
        raise TeacherLoadError(f"cannot load teacher weights from {model_dir}: {e}") from e
    net.eval().requires_grad_(False)
    try:
        den = build_denoiser(net, sched_cfg, kind, strict_range=strict_range)
    except (UnsupportedTeacher, ValueError) as e:
        raise TeacherLoadError(f"teacher {path_or_id!r}: {e}") from None
    if takes_text(net):  # guidance's null condition: the empty prompt, embedded once
        den.empty_condition = text_encoder(folder).null()
    return den


def text_encoder(path_or_id: str | Path, device="cpu"):
    """The :class:`~cmdistill.prompts.PromptEncoder` (tokenizer + text encoder) of a text-conditional teacher."""
    from .prompts import PromptEncoder, PromptError

    try:
        return PromptEncoder.from_pretrained(_resolve_folder(str(path_or_id)), device)
    except PromptError as e:
        raise TeacherLoadError(f"teacher {str(path_or_id)!r}: {e}") from None
