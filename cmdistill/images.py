"""Image grids and PNG writing for tensors in [-1, 1]."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, H, W, C]`` uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile a batch into one uint8 image (H, W, C); ``upscale`` repeats pixels so small images stay visible."""
    a = to_uint8(x)
    if upscale > 1:
        a = a.repeat(upscale, axis=1).repeat(upscale, axis=2)
    b, h, w, c = a.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = a[i]
    return grid


def save_png(arr: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save a batch in [-1, 1] as a PNG grid (images under 64 px are enlarged to about 64 px)."""
    up = max(1, 64 // x.shape[-1])
    save_png(make_grid(x, nrow, upscale=up), path)
