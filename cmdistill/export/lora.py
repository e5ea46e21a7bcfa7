"""A LoRA student's adapter as a diffusers LoRA file (LCM-LoRA's form): ``pytorch_lora_weights.safetensors`` that
``pipe.load_lora_weights(folder)`` loads onto the teacher's own pipeline, with the adapter's rank and alpha in its
metadata, and a README that says how to sample it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.lora import LoraSpec, adapter_state_dict
from .pipeline import below_top, lcm_scheduler_for, lcm_sigmas, lcm_timesteps, lcm_timesteps_note

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(fn, folder: str | os.PathLike, spec: LoraSpec, teacher: str = "unknown") -> Path:
    """Write the adapter that ``fn`` (a LoRA view, :mod:`cmdistill.core.lora`) computes with into ``folder``, in the
    layout of diffusers' ``StableDiffusionPipeline.save_lora_weights`` (the U-Net's tensors under ``unet.``),
    atomically."""
    from diffusers import StableDiffusionPipeline

    from ..files import make_readable, replace_dir

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = spec.peft_config().to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=adapter_state_dict(fn.denoiser.net,
                                                                                        fn.denoiser.adapter),
                                              unet_lora_adapter_metadata=meta, safe_serialization=True)
    w = fn.guidance_scale if fn.guidance_scale is not None else 1.0
    sched, steps = lcm_scheduler_for(fn), "num_inference_steps=1"
    if below_top(fn):
        steps = f"timesteps={lcm_timesteps(fn, sched, 1)}"
    note = lcm_timesteps_note(fn, {k: lcm_sigmas(fn, sched, k) for k in (1, 2, 4)})
    (tmp / "README.md").write_text(LORA_CARD.format(teacher=teacher, rank=spec.rank, alpha=spec.alpha, w=w,
                                                    steps=steps, note=note))
    make_readable(tmp)
    replace_dir(tmp, folder)
    return folder


LORA_CARD = """---
library_name: diffusers
tags: [lora, lcm-lora, consistency-distillation, cmdistill, text-to-image]
---
# LCM-LoRA student of `{teacher}`

A LoRA (rank {rank}, alpha {alpha:g}) distilled by cmdistill: loaded onto its teacher with diffusers'
`load_lora_weights` and sampled with `LCMScheduler` in 1-4 steps. Classifier-free guidance at w = {w:g} is distilled
into it, so sample it without guidance (`guidance_scale=1`, one network call per step), as LCM-LoRA is sampled.

```python
from diffusers import LCMScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{teacher}", safety_checker=None, requires_safety_checker=False)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("path/to/this/folder")
image = pipe("a photo of a sneaker", {steps}, guidance_scale=1.0).images[0]
```

LCMScheduler samples it{note}.

The same student merged into the U-Net is the run's `student/` folder (a `ConsistencyPipeline`).
"""
