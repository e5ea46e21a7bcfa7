"""Datasets in [-1, 1] (C, H, W) with their class labels, a resumable, rank-aware batch sampler, and the data mean
of the 1-step prior. Every dataset yields ``(image, label)``; unconditional teachers ignore the label.

Registry keyed by ``data.name``: ``cifar10`` (torchvision download into a cache folder), ``imagefolder``
(any folder of images), ``digits`` (scikit-learn's bundled 8x8 digits, offline), ``fashion_mnist`` (the IDX files
of Xiao et al. 2017 in ``data.root``: Debian's ``dataset-fashion-mnist`` package or torchvision's download), and the
captioned ones a text-conditional teacher needs, which also yield a prompt id (:class:`Captioned`): ``captions`` (an
image folder with 🤗 imagefolder's ``metadata.jsonl``) and ``hf_disk`` (a 🤗 dataset saved with ``save_to_disk``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

from .core.tensors import to_device

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(RuntimeError):
    """A dataset that cannot be loaded or does not fit the teacher."""


def digits_dataset(root: str, resolution: int | None = None, channels: int = 1) -> Dataset:
    """scikit-learn's 1797 8x8 digits (values 0..16) scaled to [-1, 1], shape (1, 8, 8), with their labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1
    return TensorDataset(x[:, None], torch.tensor(d.target))


def digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target)


class _ImageFiles(Dataset):
    def __init__(self, files: list[Path], resolution: int, channels: int, labels: list[int] | None = None):
        self.files, self.resolution, self.mode = files, resolution, "L" if channels == 1 else "RGB"
        self.labels = labels or [0] * len(files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                x = square_image(im, self.mode, self.resolution)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable or truncated files
            raise DataError(f"cannot read image {str(self.files[i])!r}: {type(e).__name__}: {e}") from None
        return x, torch.tensor(self.labels[i])


def square_image(im, mode: str, resolution: int) -> torch.Tensor:
    """A PIL image in ``mode``, centre-cropped to a square, resized (bicubic) to ``resolution``, as a
    ``[C, H, W]`` tensor in [-1, 1]."""
    from PIL import Image

    im = im.convert(mode)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    a = np.asarray(im.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


def imagefolder_dataset(root: str, resolution: int | None = None, channels: int = 3) -> Dataset:
    """Every image under ``root`` (recursively), centre-cropped and resized to ``resolution``. Labelled as
    torchvision's ``ImageFolder`` does: the sorted names of ``root``'s sub-folders are classes 0, 1, ...; an image
    directly in ``root`` has label 0 (an unlabelled folder)."""
    p = Path(os.path.expanduser(root))
    if p.exists() and not p.is_dir():
        raise DataError(f"image folder {root!r} is a file, not a folder")
    if not p.is_dir():
        raise DataError(f"image folder {root!r} does not exist")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"image folder {root!r} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    if resolution is None:
        raise DataError("imagefolder needs a resolution (the teacher's sample_size or data.resolution)")
    classes = sorted(d.name for d in p.iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(f.relative_to(p).parts[0], 0) if len(f.relative_to(p).parts) > 1 else 0 for f in files]
    return _ImageFiles(files, resolution, channels, labels)


class _Cifar(Dataset):
    def __init__(self, data: np.ndarray, targets=None):
        self.data = data  # uint8 N, 32, 32, 3
        self.targets = list(targets) if targets is not None else [0] * len(data)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return torch.from_numpy(self.data[i]).permute(2, 0, 1).float() / 127.5 - 1, torch.tensor(self.targets[i])


def cifar10_dataset(root: str, resolution: int | None = None, channels: int = 3) -> Dataset:
    """CIFAR-10 train set through torchvision, downloaded once into ``root``."""
    from torchvision.datasets import CIFAR10

    root = os.path.expanduser(root)
    try:
        ds = CIFAR10(root, train=True, download=True)
    except Exception as e:
        raise DataError(
            f"cannot download CIFAR-10 into {root!r} ({type(e).__name__}); are you offline? "
            "Run once with network access or use data.name=imagefolder"
        ) from e
    return _Cifar(ds.data, ds.targets)


class Captioned(Dataset):
    """Images with a caption each: yields ``(image, label, prompt_id)``, the caption being ``prompts[prompt_id]``
    (``prompts``: the distinct captions, sorted, so each is embedded once)."""

    def __init__(self, images: Dataset, captions: list[str]):
        self.images = images
        self.prompts = sorted(set(captions))
        index = {c: i for i, c in enumerate(self.prompts)}
        self.prompt_ids = torch.tensor([index[c] for c in captions])

    def __len__(self):
        return len(self.images)

    @property
    def labels(self) -> list[int]:
        """Each image's class label (0 for a folder without a ``label`` column)."""
        tensors = getattr(self.images, "tensors", None)
        if tensors is not None and len(tensors) > 1:
            return tensors[1].tolist()
        labels = getattr(self.images, "labels", None)  # image folders and saved datasets keep them (no decoding)
        return list(labels) if labels is not None else [int(self.images[i][1]) for i in range(len(self))]

    def __getitem__(self, i):
        x, y, *_ = self.images[i]
        return x, y, self.prompt_ids[i]


def _check_captions(captions: list, where: str, column: str) -> list[str]:
    if not captions:
        raise DataError(f"{where} has no captioned images")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"{where}: row {bad[0]} has an empty or non-text {column!r} caption ({len(bad)} such rows)")
    return [c.strip() for c in captions]


def captions_dataset(root: str, resolution: int | None = None, channels: int = 3, caption_column: str = "text"):
    """An image folder with captions, in the convention of 🤗 datasets' ``imagefolder``: ``root/metadata.jsonl``, one
    JSON object per line with ``file_name`` (relative to ``root``) and the caption in ``caption_column``; a ``label``
    column, if present, gives class labels (else 0). One line for a missing column, file or caption."""
    import json

    p = Path(os.path.expanduser(root))
    meta = p / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"captioned image folder {root!r} has no metadata.jsonl (lines of {{\"file_name\": ..., "
                        f"\"{caption_column}\": ...}})")
    if resolution is None:
        raise DataError("captions needs a resolution (the teacher's sample_size or data.resolution)")
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{meta}: line {n} is not JSON ({e.msg})") from None
    for key in ("file_name", caption_column):
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise DataError(f"{meta}: no {key!r} column in row {missing[0] + 1} (set data.caption_column to the "
                            "caption's column)" if key == caption_column else f"{meta}: row {missing[0] + 1} has no "
                            "'file_name'")
    files = [p / r["file_name"] for r in rows]
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise DataError(f"{meta} lists {len(absent)} missing image file(s), e.g. {str(absent[0])!r}")
    captions = _check_captions([r[caption_column] for r in rows], str(meta), caption_column)
    labels = [int(r.get("label", 0)) for r in rows]
    return Captioned(_ImageFiles(files, resolution, channels, labels), captions)


class _HFImages(Dataset):
    def __init__(self, table, image_column: str, resolution: int, channels: int, labels: list[int]):
        self.table, self.column, self.resolution = table, image_column, resolution
        self.mode, self.labels = "L" if channels == 1 else "RGB", labels

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return square_image(self.table[i][self.column], self.mode, self.resolution), torch.tensor(self.labels[i])


def hf_disk_dataset(root: str, resolution: int | None = None, channels: int = 3, caption_column: str = "text"):
    """A 🤗 ``datasets`` dataset saved with ``save_to_disk`` (its ``train`` split if it is a DatasetDict): an
    ``image`` column, the caption in ``caption_column``, an optional ``label`` column."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.name hf_disk needs the datasets package: pip install datasets") from None
    try:
        table = datasets.load_from_disk(os.path.expanduser(root))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"cannot read a saved 🤗 dataset from {root!r}: {e}") from None
    if isinstance(table, datasets.DatasetDict):
        table = table["train"] if "train" in table else next(iter(table.values()))
    for key in ("image", caption_column):
        if key not in table.column_names:
            raise DataError(f"the dataset in {root!r} has no {key!r} column (it has {', '.join(table.column_names)})")
    if resolution is None:
        raise DataError("hf_disk needs a resolution (the teacher's sample_size or data.resolution)")
    captions = _check_captions(list(table[caption_column]), root, caption_column)
    labels = [int(v) for v in table["label"]] if "label" in table.column_names else [0] * len(table)
    return Captioned(_HFImages(table, "image", resolution, channels, labels), captions)


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts the IDX files
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a numpy array: magic ``0x00 0x00 type ndim``, big-endian
    int32 sizes, then the data. Only unsigned bytes (type 0x08), which is what (Fashion-)MNIST uses."""
    import gzip

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{str(path)!r} is truncated: {body.size} values for shape {tuple(dims)}")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):  # the package's flat folder, torchvision's layout
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def fit_resolution(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """``[N, C, S, S]`` images at ``resolution``: centred in a border of the background value -1 when larger (28 to 32
    pads 2 pixels a side, so a latent autoencoder can halve it twice), area-averaged when smaller."""
    size = x.shape[-1]
    if resolution is None or resolution == size:
        return x
    if resolution > size:
        lo = (resolution - size) // 2
        return torch.nn.functional.pad(x, (lo, resolution - size - lo, lo, resolution - size - lo), value=-1.0)
    return torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="area")


def fashion_mnist_dataset(root: str, resolution: int | None = None, channels: int = 1, split: str = "train") -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training / 10,000 test images, 28x28 grey, 10 classes
    (:data:`FASHION_MNIST_CLASSES`), from the IDX files in ``root`` (flat, gzipped or not, or torchvision's
    ``FashionMNIST/raw``), scaled to [-1, 1] and fitted to ``resolution`` (:func:`fit_resolution`)."""
    p = Path(os.path.expanduser(root))
    prefix = "train" if split == "train" else "t10k"
    images, labels = _find_idx(p, f"{prefix}-images-idx3-ubyte"), _find_idx(p, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DataError(
            f"no Fashion-MNIST IDX files in {root!r}: install them with 'apt-get install dataset-fashion-mnist' "
            f"(then data.root: {FASHION_MNIST_ROOT}) or, online, download them with torchvision: python -c \"from "
            f"torchvision.datasets import FashionMNIST; FashionMNIST('{root}', download=True)\"")
    x = torch.from_numpy(read_idx(images).copy()).float()[:, None] / 127.5 - 1
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    if len(x) != len(y):
        raise DataError(f"Fashion-MNIST in {root!r}: {len(x)} images but {len(y)} labels")
    x = fit_resolution(x, resolution)
    return TensorDataset(x.expand(-1, channels, -1, -1).contiguous() if channels != 1 else x, y)


# captions of Fashion-MNIST's classes (FASHION_MNIST_CLASSES order): names and synonyms, and the templates around them
FASHION_SYNONYMS = (("tshirt", "top", "tee"), ("trousers", "pants", "jeans"), ("pullover", "sweater", "jumper"),
                    ("dress", "gown"), ("coat", "jacket"), ("sandal", "sandals"), ("shirt", "blouse"),
                    ("sneaker", "trainer", "running shoe"), ("bag", "handbag", "purse"), ("ankle boot", "boot"))
FASHION_TEMPLATES = ("a photo of {a} {x}", "{a} {x}", "a picture of {a} {x}", "a black and white photo of {a} {x}",
                     "an image of {a} {x}", "a small photo of {a} {x}")


def fashion_caption(label: int, rng: np.random.Generator) -> str:
    """One caption of a Fashion-MNIST class: a template around one of its names, with the right article."""
    name = FASHION_SYNONYMS[label][rng.integers(len(FASHION_SYNONYMS[label]))]
    template = FASHION_TEMPLATES[rng.integers(len(FASHION_TEMPLATES))]
    plural = name.endswith(("s", "jeans")) and name not in ("dress",)
    article = "" if plural else ("an" if name[0] in "aeiou" else "a")
    return " ".join(template.format(a=article, x=name).split())


def fashion_words() -> list[str]:
    """Every word the Fashion-MNIST captions use (the vocabulary of the package-written tokenizer)."""
    words = {w for names in FASHION_SYNONYMS for n in names for w in n.split()}
    words |= {w for t in FASHION_TEMPLATES for w in t.replace("{a}", "").replace("{x}", "").split()}
    return sorted(words | {"a", "an"})


def fashion_captions_dataset(root: str, resolution: int | None = None, channels: int = 1, caption_column: str = "",
                             seed: int = 0) -> Dataset:
    """Fashion-MNIST with a caption per image built from its class (:func:`fashion_caption`, a fixed seed, so the
    same image always has the same caption): the offline text-conditional data set. ``caption_column`` is unused."""
    images = fashion_mnist_dataset(root, resolution, channels)
    rng = np.random.default_rng(seed)
    return Captioned(images, [fashion_caption(int(y), rng) for y in images.tensors[1]])


DATASETS: dict[str, Callable[..., Dataset]] = {
    "cifar10": cifar10_dataset,
    "imagefolder": imagefolder_dataset,
    "digits": digits_dataset,
    "fashion_mnist": fashion_mnist_dataset,
    "captions": captions_dataset,
    "hf_disk": hf_disk_dataset,
    "fashion_captions": fashion_captions_dataset,
}
CAPTIONED = frozenset({"captions", "hf_disk", "fashion_captions"})  # datasets whose items carry a caption (a text teacher's condition)


def make_dataset(name: str, root: str, resolution: int | None, channels: int, caption_column: str = "text") -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if name in CAPTIONED:
        return DATASETS[name](root, resolution, channels, caption_column)
    return DATASETS[name](root, resolution, channels)


def num_labels(ds: Dataset) -> int:
    """The number of classes the labels of ``ds`` use (1 + the largest label)."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) > 1:
        return int(ds.tensors[1].max()) + 1
    labels = getattr(ds, "labels", None) or getattr(ds, "targets", None)
    if labels is None:
        labels = [int(ds[i][1]) if len(ds[i]) > 1 else 0 for i in range(len(ds))]
    return int(max(labels)) + 1


def check_fits(ds: Dataset, resolution: int, channels: int, name: str) -> None:
    """Data resolution and channels must match the teacher's."""
    if len(ds) == 0:
        raise DataError(f"dataset {name!r} is empty")
    x = ds[0][0]
    if tuple(x.shape) != (channels, resolution, resolution):
        raise DataError(
            f"dataset {name!r} gives images of shape {tuple(x.shape)} but the teacher expects "
            f"({channels}, {resolution}, {resolution})"
        )


class StepBatchSampler(Sampler):
    """Infinite batches for micro-step ``m = start, start+1, ...``: global indices
    ``[m B, (m+1) B)`` of the stream of per-epoch permutations (seeded by ``seed + epoch``), this rank's slice.

    The position is a pure function of the micro-step, so a resumed run sees exactly the data an
    uninterrupted one would.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global micro-batch {global_batch} is not divisible by {world} processes")
        self.n, self.gb, self.seed, self.start, self.rank, self.world = n, global_batch, seed, start, rank, world
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch(self, m: int) -> list[int]:
        per = self.gb // self.world
        lo = m * self.gb + self.rank * per
        out = []
        for i in range(lo, lo + per):
            out.append(int(self._perm_for(i // self.n)[i % self.n]))
        return out

    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1

    def __len__(self):  # effectively infinite
        return 2**62


def step_loader(ds: Dataset, micro_batch: int, seed: int, start: int, rank: int = 0, world: int = 1,
                num_workers: int = 0, pin_memory: bool = False):
    """An iterator over the micro-batches of :class:`StepBatchSampler` from micro-step ``start`` on (the training
    loop's data stream). The DataLoader has its own generator: creating the iterator draws nothing from the
    global RNG (only worker seeds come from it)."""
    sampler = StepBatchSampler(len(ds), micro_batch, seed, start, rank, world)
    return iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=num_workers,
                                            pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                            generator=torch.Generator().manual_seed(seed)))


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image with probability 1/2; the coin flips come from ``generator`` (a CPU generator that the
    training loop checkpoints), copied to ``x``'s device without a host sync."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(to_device(flip, x.device)[:, None, None, None], x.flip(-1), x)


# --------------------------------------------------------------------------- the 1-step prior mean (student.prior)


def zero_mean(ds: Dataset, hflip: bool = False, batch_size: int = 1024) -> None:
    """CM's prior ``N(0, sigma_max^2 I)``: no mean to store."""
    return None


@torch.no_grad()
def data_mean(ds: Dataset, hflip: bool = False, batch_size: int = 1024) -> torch.Tensor:
    """Per-pixel mean ``[C, H, W]`` (float32) of the training images as the training loop sees them: with random
    horizontal flips, the mean of an image and its mirror."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    total, n = None, 0
    for (x, *_) in loader:
        s = x.double().sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
    mean = (total / n).float()
    return (mean + mean.flip(-1)) / 2 if hflip else mean


PRIORS: dict[str, Callable[..., Optional[torch.Tensor]]] = {"zero": zero_mean, "data_mean": data_mean}


def prior_mean(name: str, ds: Dataset, hflip: bool = False) -> Optional[torch.Tensor]:
    """The mean of the starting distribution named by ``student.prior`` (``None`` for a zero mean); sampling starts
    at ``mean + sigma_max z`` (:func:`cmdistill.core.sampling.start_sample`, which cites the truncated-diffusion
    papers behind it). On the digits teacher, its own Heun ODE started at sigma 10 from ``10 z`` gives FID 3.56,
    from ``mu + 10 z`` 2.15, the same as from its full range, 2.16 (``benchmarks/bench_prior.py``)."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    return PRIORS[name](ds, hflip)
