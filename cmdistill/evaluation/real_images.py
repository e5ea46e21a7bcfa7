"""The real images an evaluation compares samples with, read from their dataset on demand.

FID's reference statistics, precision / recall's real manifold and the real-vs-real floors take up to 50,000 real
images. Stacked in memory as fp32 they are 600 MB at 32 px but 157 GB at 512 px (a Stable Diffusion evaluation), so
:class:`RealImages` keeps only the dataset and a list of indices: slicing and indexing give views, and ``split(n)``
reads ``n`` images at a time, which is all the feature network needs. It offers the slice of ``torch.Tensor``'s
interface the evaluation uses (``len``, ``shape``, ``[slice]``, ``[index tensor]``, ``split``), so a tensor of
images can stand in for it (the tests' small sets).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class RealImages:
    """Images ``dataset[i][0]`` for ``i`` in ``index`` (default: the first ``limit`` of the dataset), in [-1, 1],
    each read when a batch that holds it is asked for."""

    def __init__(self, dataset: Sequence, limit: int | None = None, index: torch.Tensor | None = None):
        self.dataset = dataset
        n = len(dataset) if limit is None else min(len(dataset), int(limit))
        self.index = torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.long)
        self._image_shape: tuple | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        """``(N, C, H, W)``, reading one image for its size."""
        if self._image_shape is None:
            self._image_shape = tuple(self.dataset[int(self.index[0])][0].shape)
        return (len(self),) + self._image_shape

    def __getitem__(self, key) -> "RealImages":
        """A view: ``key`` is a slice or a 1-D index tensor into this set (nothing is read)."""
        view = RealImages(self.dataset, index=self.index[key])
        view._image_shape = self._image_shape
        return view

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """The images, read and stacked ``size`` at a time (as ``torch.Tensor.split`` gives a tensor's)."""
        for i in range(0, len(self), size):
            yield torch.stack([self.dataset[int(j)][0] for j in self.index[i:i + size]])
