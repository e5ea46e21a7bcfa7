"""Usage: python benchmarks/demo_text_diffusers.py RUN LORA_RUN TEACHER OUT.png (RUN, LORA_RUN: runs of
recipes/fashion-text.yaml and recipes/fashion-text-lora.yaml; TEACHER: recipes/teachers/fashion-text).
Fresh-clone check: the exported student in diffusers' LatentConsistencyModelPipeline + LCMScheduler, and the LoRA
with load_lora_weights on the teacher's StableDiffusionPipeline; each prints what it made and saves a grid."""
import sys

import numpy as np
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

run, lora_run, teacher = sys.argv[1], sys.argv[2], sys.argv[3]
prompts = ["a photo of a sneaker", "an image of an ankle boot", "a black and white photo of a handbag", "a photo of jeans"]
pipe = LatentConsistencyModelPipeline.from_pretrained(f"{run}/student", safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False)
print("LatentConsistencyModelPipeline:", type(pipe.scheduler).__name__, "unet time_cond_proj_dim",
      pipe.unet.config.time_cond_proj_dim)
z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
out = pipe(prompts, timesteps=[649], guidance_scale=2.0, latents=z.clone(), output_type="np").images
print("LatentConsistencyModelPipeline, timesteps=[649] (1 step), w=2:", out.shape, out.dtype,
      "mean %.3f std %.3f" % (out.mean(), out.std()))
from cmdistill import ConsistencyPipeline
ours = ConsistencyPipeline.from_pretrained(f"{run}/student")(prompt=prompts, num_inference_steps=1, guidance_scale=2.0,
                                                            latents=z.clone(), output_type="np").images
print("ConsistencyPipeline, 1 step, same latents: max |difference| to LatentConsistencyModelPipeline %.2e"
      % abs(ours - out).max())
sd = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
sd.load_lora_weights(f"{lora_run}/lora")
lo = sd(prompts, timesteps=[649], guidance_scale=1.0, latents=z.clone(), output_type="np").images
print("StableDiffusionPipeline + load_lora_weights + LCMScheduler, timesteps=[649] (1 step):", lo.shape,
      "mean %.3f std %.3f" % (lo.mean(), lo.std()))
merged = ConsistencyPipeline.from_pretrained(f"{lora_run}/student")(prompt=prompts, num_inference_steps=1,
                                                                     latents=z.clone(), output_type="np").images
print("the LoRA run's merged student through ConsistencyPipeline: max |difference| %.2e" % abs(merged - lo).max())
from PIL import Image
grid = np.concatenate([np.concatenate(list(out), 1), np.concatenate(list(lo), 1)], 0)
Image.fromarray((grid[..., 0] * 255).round().astype(np.uint8)).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(sys.argv[4])
print("saved", sys.argv[4])
