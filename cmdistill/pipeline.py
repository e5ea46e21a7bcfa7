"""``ConsistencyPipeline``: a scheduler-free diffusers pipeline around a distilled student U-Net.

Its only component is the student network; its config holds everything sampling needs: the teacher
adapter (kind + noise table / beta config + prediction type), the boundary condition (sigma_min,
sigma_max, sigma_data) and the default multistep sigmas. Needs neither accelerate nor cmdistill's
training code.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .consistency import ConsistencyFunction
from .denoisers import build_denoiser
from .sample import default_multistep_sigmas, sample_consistency


class ConsistencyPipeline(DiffusionPipeline):
    """One- or few-step sampling with a consistency model (CM Algorithm 1).

    >>> pipe = ConsistencyPipeline.from_pretrained("runs/cd/student")
    >>> images = pipe(batch_size=16, num_inference_steps=1, generator=torch.manual_seed(0)).images
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, adapter: Optional[dict] = None, consistency: Optional[dict] = None,
                 multistep_sigmas: Optional[dict] = None):
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(adapter=adapter or {"kind": "ddpm", "scheduler": {}},
                                consistency=consistency or {},
                                multistep_sigmas={str(k): [float(s) for s in v]
                                                  for k, v in (multistep_sigmas or {}).items()})
        self._fn_cache: tuple[int, ConsistencyFunction] | None = None

    @classmethod
    def from_student(cls, student: ConsistencyFunction, multistep_sigmas: Optional[dict] = None):
        """Build from a trained :class:`ConsistencyFunction` (its network is shared, not copied)."""
        return cls(unet=student.denoiser.net, adapter=student.denoiser.adapter_config(),
                   consistency=student.consistency_config(), multistep_sigmas=multistep_sigmas)

    @property
    def consistency_function(self) -> ConsistencyFunction:
        """The student ``f(x, sigma)`` in EDM space, rebuilt around ``self.unet`` from the config."""
        if self._fn_cache is None or self._fn_cache[0] != id(self.unet):
            ad, cc = self.config.adapter, dict(self.config.consistency)
            den = build_denoiser(self.unet, ad["scheduler"], ad["kind"], strict_range=False)
            fn = ConsistencyFunction(den, boundary=cc.get("boundary", "cm"), sigma_min=cc.get("sigma_min"),
                                     sigma_data=cc.get("sigma_data", 0.5),
                                     boundary_scale=cc.get("boundary_scale", 10.0))
            if "sigma_max" in cc:
                fn.sigma_max = float(cc["sigma_max"])
            self._fn_cache = (id(self.unet), fn)
        return self._fn_cache[1]

    def sigmas_for(self, steps: int) -> list[float]:
        """The stored multistep sigmas for ``steps``, else the default schedule."""
        stored = self.config.multistep_sigmas or {}
        if str(steps) in stored:
            return [float(s) for s in stored[str(steps)]]
        fn = self.consistency_function
        return default_multistep_sigmas(fn.sigma_min, fn.sigma_max, steps)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, sigmas: Optional[Sequence[float]] = None,
                 generator: Optional[torch.Generator] = None, output_type: str = "pil", return_dict: bool = True):
        """Sample ``batch_size`` images in ``num_inference_steps`` network evaluations (or ``len(sigmas)``).

        ``output_type``: ``"pil"`` (list of PIL images), ``"np"`` (NHWC float in [0, 1]) or ``"pt"``
        (NCHW float in [0, 1]).
        """
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        fn = self.consistency_function
        sigmas = list(sigmas) if sigmas is not None else self.sigmas_for(num_inference_steps)
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        x = sample_consistency(fn, noise, sigmas, generator=generator)
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out: Any = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)
