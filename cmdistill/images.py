"""Image grids and PNG writing for tensors in [-1, 1].

Grids are drawn to be looked at: small images are enlarged with nearest-neighbour (pixels stay sharp), each image
sits in a thin frame, and images are separated by a clear gap of the page colour, so 8x8 digits read as separate
samples rather than as one ribbon.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

PAGE = 255      # background between images
FRAME = 150     # 1-px frame around each image
GAP = 6         # pixels between framed images (and around the grid)
TARGET_PX = 64  # small images are enlarged (nearest-neighbour) to about this size


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, H, W, C]`` uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def upscale_for(size: int) -> int:
    """The integer nearest-neighbour factor that brings ``size`` px to about :data:`TARGET_PX`."""
    return max(1, TARGET_PX // size)


def make_grid(x: torch.Tensor, nrow: int | None = None, upscale: int = 1, gap: int = GAP) -> np.ndarray:
    """Tile a batch into one uint8 image (H, W, C): each image enlarged ``upscale`` times (nearest-neighbour),
    framed, and separated from its neighbours by ``gap`` pixels of page colour."""
    a = to_uint8(x)
    if upscale > 1:
        a = a.repeat(upscale, axis=1).repeat(upscale, axis=2)
    b, h, w, c = a.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    ch, cw = h + 2, w + 2  # image plus its 1-px frame
    grid = np.full((rows * (ch + gap) + gap, nrow * (cw + gap) + gap, c), PAGE, np.uint8)
    for i in range(b):
        r, k = divmod(i, nrow)
        top, left = gap + r * (ch + gap), gap + k * (cw + gap)
        grid[top:top + ch, left:left + cw] = FRAME
        grid[top + 1:top + 1 + h, left + 1:left + 1 + w] = a[i]
    return grid


def save_png(arr: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save a batch in [-1, 1] as a PNG grid (images under 64 px enlarged to about 64 px)."""
    save_png(make_grid(x, nrow, upscale=upscale_for(x.shape[-1])), path)
