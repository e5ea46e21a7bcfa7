"""Sample sets for ``cmdistill sample`` and ``cmdistill evaluate``: find the newest run, draw images in batches
from the student (CM Algorithm 1, through :class:`ConsistencyPipeline`) or from the teacher's ODE sampler, and
write them as PNGs, a grid and ``samples.npz``.

Noise convention (so student and teacher samples pair up): ``z = randn(N, C, H, W)`` from a generator seeded with
``seed``; the student's extra multistep noise is drawn from the same generator afterwards, so
``sample_student(pipe, N, ...)`` equals ``pipe(batch_size=N, generator=torch.manual_seed(seed))`` when
``N <= batch_size``. The teacher starts from the same ``z`` (scaled by its ``prior_std``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.schedules import DEFAULT_TEACHER_SPACING
from ..core.networks import class_rows, image_shape
from ..export.pipeline import ConsistencyPipeline, check_student_folder, config_file
from ..images import save_grid, save_png, to_uint8

RUNS_ROOT = Path("runs")


class SampleError(RuntimeError):
    """No student to sample, or sampling options that do not fit together."""


def find_latest_student(root: str | Path = RUNS_ROOT) -> Path:
    """The ``student`` folder (a saved ConsistencyPipeline) under ``root`` written last (its ``model_index.json`` or
    its sampling configuration, which a sigma search rewrites)."""
    root = Path(root)
    found = [p.parent for p in root.glob("**/student/model_index.json")] if root.is_dir() else []
    if not found:
        raise SampleError(f"no distilled student found under ./{root} (run `cmdistill distill` first, "
                          "or pass --student DIR)")
    return max(found, key=lambda p: max(f.stat().st_mtime for f in (p / "model_index.json", config_file(p))
                                        if f.exists()))


def load_student(folder: str | Path, device=None, dtype: torch.dtype | None = None):
    """``ConsistencyPipeline.from_pretrained(folder)``; a run folder stands for its ``student/``. A folder that is
    not a student raises :class:`~cmdistill.export.pipeline.StudentLoadError` (one line)."""
    folder = Path(folder)
    if not (folder / "model_index.json").exists() and (folder / "recipe.yaml").is_file() \
            and (folder / "student" / "model_index.json").is_file():
        folder = folder / "student"
    check_student_folder(folder)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar inside cmdistill's commands
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = ConsistencyPipeline.from_pretrained(str(folder), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def initial_noise(num: int, shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """``z ~ N(0, I)`` of shape ``[num, *shape]`` and the CPU generator that drew it (for later noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, *shape, generator=g), g


def run_batches(fn: Callable[..., torch.Tensor], noise: torch.Tensor, generator: torch.Generator, batch_size: int,
                device, desc: str, progress: bool = True, conditions: dict | None = None,
                decode: Callable | None = None) -> tuple[torch.Tensor, float]:
    """Apply ``fn(z_batch, generator)`` batch by batch (``fn(z_batch, generator, **conditions_batch)`` when
    ``conditions`` are given: per-image tensors such as ``class_labels`` or ``encoder_hidden_states``, diffusers'
    names), each output through ``decode`` (a latent model's autoencoder: images are
    always pixels); return the images (CPU, clamped to [-1, 1]) and the throughput in images per second (wall clock,
    decoding included, device synchronised, after one untimed warm-up image drawn with its own generator so
    ``generator``'s stream is untouched)."""
    device = torch.device(device)
    if decode is not None:
        inner = fn
        fn = lambda z, g, **c: decode(inner(z, g, **c))  # noqa: E731

    def cond(i: int, n: int) -> dict:
        return {k: v[i:i + n].to(device) for k, v in (conditions or {}).items()}

    fn(noise[:1].to(device), torch.Generator().manual_seed(0), **cond(0, 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    outs, t0 = [], time.perf_counter()
    for i in tqdm(range(0, len(noise), batch_size), desc=desc, disable=not progress, leave=False):
        outs.append(fn(noise[i:i + batch_size].to(device), generator, **cond(i, batch_size)).float().clamp(-1, 1).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(outs), len(noise) / max(time.perf_counter() - t0, 1e-9)


def student_fn(pipe, sigmas: Sequence[float], class_label: int | None = None,
               guidance_scale: float | None = None, prompt: str | None = None) -> Callable:
    """``z, g[, class_labels | encoder_hidden_states] -> x``: the pipeline's CM Algorithm 1 from given starting noise,
    with the given labels (default: all ``class_label``) or, for a text student, the given text-encoder states
    (default: ``prompt``'s, embedded once), at guidance scale ``guidance_scale`` (``None``: the student's own)."""
    sigmas = pipe.check_sigmas(sigmas)
    pipe.guidance(guidance_scale)  # one clear line now for a scale the student was not distilled for
    text = pipe.text_conditioning(prompt, None, 1, pipe.device) if prompt is not None else {}

    def sample(z, g, class_labels=None, encoder_hidden_states=None):
        labels = class_label if class_labels is None else class_labels
        states = encoder_hidden_states
        if states is None and text:
            states = text["encoder_hidden_states"].expand(z.shape[0], -1, -1)
        emb = {} if states is None else {"prompt_embeds": states}
        return pipe(latents=z, sigmas=sigmas, generator=g, output_type="latent", class_labels=labels,
                    guidance_scale=guidance_scale, **emb).images

    return sample


def teacher_fn(teacher, sampler: str, steps: int, spacing: str | None = DEFAULT_TEACHER_SPACING) -> Callable:
    """``z, g[, class_labels] -> x``: the teacher's deterministic ODE sampler (``ddim``, ``heun`` or ``euler``) over
    :func:`~cmdistill.core.sampling.teacher_sigmas`."""
    from ..core.sampling import sample_ode, teacher_sigmas
    from ..core.solvers import SOLVERS

    if sampler not in SOLVERS:
        raise SampleError(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SOLVERS))}")
    sigmas = teacher_sigmas(teacher, steps, spacing)
    return lambda z, g, **cond: sample_ode(teacher, z, sigmas, sampler, **cond)


def sample_student(pipe, num: int, steps: int = 1, sigmas: Sequence[float] | None = None, seed: int = 0,
                   batch_size: int = 256, progress: bool = True, class_label: int | None = None,
                   guidance_scale: float | None = None, prompt: str | None = None) -> tuple[torch.Tensor, list[float]]:
    """``num`` student samples in [-1, 1] and the sigmas used (stored ones for ``steps`` unless given); a
    class-conditional student samples ``class_label``, a text student ``prompt`` (at ``guidance_scale`` when it
    takes one)."""
    sigmas = pipe.check_sigmas(sigmas if sigmas is not None else pipe.sigmas_for(steps))
    noise, g = initial_noise(num, image_shape(pipe.network), seed)
    x, _ = run_batches(student_fn(pipe, sigmas, class_label, guidance_scale, prompt), noise, g, batch_size,
                       pipe.device,
                       f"student {len(sigmas)}-step", progress, decode=pipe.decode)
    return x, sigmas


def sample_teacher(teacher, num: int, sampler: str = "ddim", steps: int = 50, seed: int = 0,
                   batch_size: int = 256, spacing: str | None = DEFAULT_TEACHER_SPACING, progress: bool = True,
                   class_label: int | None = None, guidance_scale: float | None = None, vae=None,
                   prompt: str | None = None, prompt_encoder=None) -> torch.Tensor:
    """``num`` teacher samples in [-1, 1] from the same noise convention as :func:`sample_student`; a
    class-conditional teacher samples ``class_label``, a text teacher ``prompt`` (embedded by its
    ``prompt_encoder``), with classifier-free guidance at ``guidance_scale``; a latent teacher's samples are decoded
    by its ``vae``."""
    from ..core.guidance import guided_teacher

    noise, g = initial_noise(num, image_shape(teacher.net), seed)
    device = next(teacher.net.parameters()).device
    labels = None
    if prompt is not None:  # the empty prompt (embedded at load) is the null condition
        emb = prompt_encoder(prompt).to(device)
        fn = teacher_fn(guided_teacher(teacher, guidance_scale), sampler, steps, spacing)
        x, _ = run_batches(lambda z, gen: fn(z, gen, encoder_hidden_states=emb.expand(z.shape[0], -1, -1)), noise,
                           g, batch_size, device, f"teacher {sampler}-{steps}", progress, None, latent_decoder(vae))
        return x
    if class_label is not None or guidance_scale is not None:
        if class_label is None:
            raise SampleError("--guidance-scale needs --class-label (classifier-free guidance of a class)")
        n = class_rows(teacher.net)
        if n is None:
            raise SampleError("--class-label and --guidance-scale need a class-conditional teacher; this one is "
                              "unconditional")
        if not 0 <= int(class_label) < n:
            raise SampleError(f"--class-label {class_label} is out of range: the teacher embeds classes 0-{n - 1}")
        try:
            teacher = guided_teacher(teacher, guidance_scale)
        except ValueError as e:
            raise SampleError(str(e)) from None
        labels = {"class_labels": torch.full((num,), int(class_label))}
    x, _ = run_batches(teacher_fn(teacher, sampler, steps, spacing), noise, g, batch_size, device,
                       f"teacher {sampler}-{steps}", progress, labels, latent_decoder(vae))
    return x


def latent_decoder(vae) -> Callable | None:
    """``x -> images`` through a latent teacher's autoencoder; ``None`` (nothing to decode) without one."""
    from ..core.autoencoders import decode_latents

    return None if vae is None else (lambda x: decode_latents(vae, x))


def write_samples(x: torch.Tensor, out: str | Path, meta: dict) -> Path:
    """``out/000000.png …``, ``out/grid.png`` and ``out/samples.npz`` (``images``: uint8 NHWC; ``meta``: JSON)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(x)
    for i, a in enumerate(arr):
        save_png(a, out / f"{i:06d}.png")
    save_grid(x, out / "grid.png")
    np.savez_compressed(out / "samples.npz", images=arr, meta=np.array(json.dumps(meta)))
    return out
