"""Feature networks for FID and the FID meter built on torchmetrics' ``FrechetInceptionDistance``.

Registry keyed by ``eval.feature_net``: ``inception`` (Inception-v3 pool features through torch-fidelity, the
standard FID; a one-time weight download), ``digits`` (the penultimate layer of a small CNN trained here on
scikit-learn's 8x8 digits: offline, seconds on CPU) and ``fashion_mnist`` (the same CNN on Fashion-MNIST padded to
32x32: offline, minutes on CPU). The classifiers (:data:`CLASSIFIERS`) also judge the class of conditional samples. Any ``nn.Module`` mapping images in [0, 1] to
``[B, num_features]`` can be passed instead (torchmetrics' custom-feature API).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .real_images import RealImages

CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "config.json"
# shipped inside the package (package data), so a non-editable install finds it from any folder
SHIPPED_CLASSIFIER = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier"
CACHED_CLASSIFIER = Path(os.path.expanduser("~/.cache/cmdistill/digits-classifier"))


class FeatureNetError(RuntimeError):
    """A feature network for FID that cannot be built (missing package, weights not downloadable)."""


# --------------------------------------------------------------------------- the digits classifier


class DigitsClassifier(nn.Module):
    """Small CNN for 1 x side x side images in [-1, 1] (8x8 digits, 32x32 Fashion-MNIST): two 3x3 conv stages with
    max-pooling, a ``num_features``-wide penultimate layer (the FID features) and a 10-way linear head."""

    def __init__(self, width: int = 32, num_features: int = 64, dropout: float = 0.25, side: int = 8):
        super().__init__()
        self.config = {"width": width, "num_features": num_features, "dropout": dropout, "side": side}
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (side // 4) ** 2, num_features), nn.ReLU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations ``[B, num_features]`` of images in [-1, 1]."""
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class ClassifierFeatures(nn.Module):
    """torchmetrics custom feature extractor: images in [0, 1] -> the classifier's penultimate features."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float() * 2 - 1)


def digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/test indices into the 1797 digits (a seeded ``RandomState`` permutation, version-stable)."""
    n = 1797
    perm = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero-padded with the background value -1)."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx, dy = torch.randint(0, 2 * p + 1, (2, b), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """The share of images ``x`` that ``clf`` assigns to their label ``y`` (in batches)."""
    clf.eval()
    p = next(clf.parameters(), None)
    dev = x.device if p is None else p.device
    hits = sum(int((clf(xb.to(dev)).argmax(1).cpu() == yb.cpu()).sum())
               for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return hits / len(x)


def digits_train_test(root: str = "") -> tuple[torch.Tensor, ...]:
    """The 1797 digits split by :func:`digits_split`: ``x_train, y_train, x_test, y_test``."""
    from ..data import digits_dataset, digits_labels

    x_all, y_all = digits_dataset("").tensors[0], digits_labels()
    tr, te = digits_split()
    return x_all[tr], y_all[tr], x_all[te], y_all[te]


def fashion_train_test(root: str) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST's own 60,000 / 10,000 split at 32x32 (as the latent teacher sees it)."""
    from ..data import fashion_mnist_dataset

    tr, te = (fashion_mnist_dataset(root, 32, 1, split) for split in ("train", "test"))
    return tr.tensors[0], tr.tensors[1], te.tensors[0], te.tensors[1]


@dataclass(frozen=True)
class ClassifierSpec:
    """A data set's classifier: its input side, train/test data, where it is shipped, cached and pointed to
    (an environment variable), and how long it trains."""

    side: int
    train_test: Callable[[str], tuple]
    shipped: Path
    cache: Path
    env: str
    epochs: int
    width: int = 32
    num_features: int = 64


ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIERS: dict[str, ClassifierSpec] = {
    "digits": ClassifierSpec(8, digits_train_test, SHIPPED_CLASSIFIER, CACHED_CLASSIFIER,
                             "CMDISTILL_DIGITS_CLASSIFIER", 30),
    "fashion_mnist": ClassifierSpec(32, fashion_train_test, ASSETS / "fashion_classifier",
                                    Path(os.path.expanduser("~/.cache/cmdistill/fashion-classifier")),
                                    "CMDISTILL_FASHION_CLASSIFIER", 6, num_features=128),
}

# data sets whose images are another's (captioned Fashion-MNIST): judged by that one's classifier
CLASSIFIER_OF_DATA = {"fashion_captions": "fashion_mnist"}


def classifier_data(data: str) -> str:
    """The :data:`CLASSIFIERS` key that judges images of data set ``data``."""
    return CLASSIFIER_OF_DATA.get(data, data)


def train_digits_classifier(epochs: int = 30, seed: int = 0, lr: float = 2e-3, batch_size: int = 64,
                            progress: bool = True) -> tuple[DigitsClassifier, dict]:
    """:func:`train_classifier` on the digits. About ten seconds on two CPU cores."""
    return train_classifier("digits", epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, progress=progress)


def train_classifier(name: str, root: str = "", epochs: int | None = None, seed: int = 0, lr: float = 2e-3,
                     batch_size: int = 64, progress: bool = True) -> tuple[DigitsClassifier, dict]:
    """Train the :class:`DigitsClassifier` of data set ``name`` (:data:`CLASSIFIERS`) on its train split (Adam,
    cosine decay, +-1 px shifts); return it and ``{"train_accuracy", "test_accuracy", ...}``."""
    spec = CLASSIFIERS[name]
    epochs = epochs or spec.epochs
    x_tr, y_tr, x_te, y_te = spec.train_test(root)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitsClassifier(spec.width, spec.num_features, side=spec.side)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    steps = epochs * ((len(x_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(epochs), desc=f"train {name} classifier", disable=not progress, leave=False):
        clf.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(_shift(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    split = "RandomState(0) permutation, 25% test" if name == "digits" else "the data set's own train / test files"
    metrics = {"train_accuracy": accuracy(clf, x_tr, y_tr), "test_accuracy": accuracy(clf, x_te, y_te),
               "num_train": len(x_tr), "num_test": len(x_te), "split": split, "epochs": epochs, "seed": seed,
               "data": name}
    return clf, metrics


def save_classifier(clf: DigitsClassifier, folder: str | Path, metrics: dict | None = None) -> Path:
    """``model.safetensors`` + ``config.json`` (architecture, metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(folder / CLASSIFIER_WEIGHTS))
    side = clf.config["side"]
    cfg = {"_class_name": "DigitsClassifier", **clf.config, "input": f"1x{side}x{side} in [-1, 1]", **(metrics or {})}
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path) -> tuple[DigitsClassifier, dict]:
    """Inverse of :func:`save_classifier`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / CLASSIFIER_CONFIG).read_text())
        state = load_file(str(folder / CLASSIFIER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureNetError(f"cannot read the classifier in {folder}: {e}") from e
    clf = DigitsClassifier(cfg["width"], cfg["num_features"], cfg["dropout"], cfg.get("side", 8))
    clf.load_state_dict(state)
    return clf.eval(), cfg


def find_digits_classifier(search: Iterable[str | Path] = ()) -> Path | None:
    """:func:`find_classifier` of the digits."""
    return find_classifier("digits", search)


def find_classifier(name: str, search: Iterable[str | Path] = ()) -> Path | None:
    """First folder holding data set ``name``'s classifier among ``search`` (e.g. ``<teacher>/classifier``), its
    environment variable (``$CMDISTILL_DIGITS_CLASSIFIER``, ``$CMDISTILL_FASHION_CLASSIFIER``), the one shipped in
    the package (``cmdistill/assets/``) and the cache."""
    spec = CLASSIFIERS[name]
    env = os.environ.get(spec.env)
    for folder in [*search, *([env] if env else []), spec.shipped, spec.cache]:
        if folder and (Path(folder) / CLASSIFIER_WEIGHTS).is_file():
            cfg = json.loads((Path(folder) / CLASSIFIER_CONFIG).read_text())
            if cfg.get("side", 8) == spec.side:
                return Path(folder)
    return None


# --------------------------------------------------------------------------- registry


def digits_features(search: Iterable[str | Path] = ()) -> nn.Module:
    """The shipped digits classifier's features; trained once into the cache when none is found."""
    folder = find_digits_classifier(search)
    if folder is None:
        print(f"cmdistill: no digits classifier found; training one into {CACHED_CLASSIFIER} (seconds)")
        clf, metrics = train_digits_classifier()
        folder = save_classifier(clf, CACHED_CLASSIFIER, metrics)
    clf, _ = load_classifier(folder)
    return ClassifierFeatures(clf)


def inception_fid() -> "FrechetInceptionDistance":  # noqa: F821
    """Standard FID: Inception-v3 2048-d pool features (torch-fidelity's port of the TF weights)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False)
    except ModuleNotFoundError as e:
        raise FeatureNetError("Inception FID needs torch-fidelity (pip install torch-fidelity) and a one-time "
                              "weight download; offline, use eval.feature_net=digits") from e
    except Exception as e:  # the weights are downloaded on first use
        raise FeatureNetError(f"cannot download the Inception weights for FID ({type(e).__name__}); are you "
                              "offline? Run once with network access, or use eval.feature_net=digits") from e


def fashion_features(search: Iterable[str | Path] = ()) -> nn.Module:
    """The shipped Fashion-MNIST classifier's features (``cmdistill train-classifier --data fashion_mnist`` makes
    one)."""
    folder = find_classifier("fashion_mnist", search)
    if folder is None:
        raise FeatureNetError("no Fashion-MNIST classifier found; make one with `cmdistill train-classifier --data "
                              "fashion_mnist` and point CMDISTILL_FASHION_CLASSIFIER to it")
    return ClassifierFeatures(load_classifier(folder)[0])


FEATURE_NETS: dict[str, Callable[..., nn.Module]] = {"digits": digits_features, "fashion_mnist": fashion_features}
BUILTIN_FIDS: dict[str, Callable[[], nn.Module]] = {"inception": inception_fid}


def feature_net_names() -> tuple[str, ...]:
    """The registry names ``eval.feature_net`` accepts."""
    return (*BUILTIN_FIDS, *FEATURE_NETS)


def make_fid(feature_net: str | nn.Module, search: Iterable[str | Path] = ()):
    """A ``FrechetInceptionDistance`` (real statistics kept across resets) for a registry name or a module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature_net, str):
        if feature_net in BUILTIN_FIDS:
            return BUILTIN_FIDS[feature_net]()
        if feature_net not in FEATURE_NETS:
            raise FeatureNetError(f"unknown feature net {feature_net!r}; choose one of "
                                  f"{', '.join(feature_net_names())}")
        feature_net = FEATURE_NETS[feature_net](search)
    return FrechetInceptionDistance(feature=feature_net, normalize=True, reset_real_features=False)


class FIDMeter:
    """Features of the real images computed once, then FID, precision and recall (:mod:`.metrics`) of any number of
    sample sets (images in [-1, 1]) in the same feature space. The feature network is the one torchmetrics'
    ``FrechetInceptionDistance`` builds (Inception, or a custom module), fed as torchmetrics feeds it, and FID uses
    its formula on the same per-batch float64 sums: the numbers are torchmetrics' numbers."""

    def __init__(self, feature_net: str | nn.Module, device="cpu", batch_size: int = 250,
                 search: Iterable[str | Path] = ()):
        metric = make_fid(feature_net, search).to(device)
        self.net, self.custom = metric.inception, metric.used_custom_model
        self.device, self.batch_size = device, batch_size
        self.real: torch.Tensor | None = None

    @torch.no_grad()
    def feature_batches(self, images: "torch.Tensor | RealImages") -> list[torch.Tensor]:
        """Float64 features, one tensor per batch of ``batch_size`` images (a tensor, or
        :class:`~.real_images.RealImages` read batch by batch)."""
        out = []
        for batch in images.split(self.batch_size):
            x = ((batch.float() + 1) / 2).clamp(0, 1).to(self.device)
            if not self.custom:  # Inception: 3 channels, uint8 as torchmetrics' normalize=True gives it
                x = (x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x)
                x = (x * 255).byte()
            f = self.net(x)
            out.append((f.unsqueeze(0) if f.dim() == 1 else f).double().cpu())
        return out

    def add_real(self, images: torch.Tensor) -> "FIDMeter":
        from .metrics import GaussianStats, knn_radii

        batches = self.feature_batches(images)
        self.real_stats = GaussianStats.of_batches(batches)
        self.real = torch.cat(batches)
        self.real_radii = knn_radii(self.real)
        return self

    def score(self, images: torch.Tensor) -> dict:
        """``{"fid", "precision", "recall"}`` of ``images`` against the real images."""
        from .metrics import GaussianStats, frechet_distance, precision_recall

        batches = self.feature_batches(images)
        precision, recall = precision_recall(self.real, torch.cat(batches), real_radii=self.real_radii)
        return {"fid": frechet_distance(self.real_stats, GaussianStats.of_batches(batches)),
                "precision": precision, "recall": recall}

    def __call__(self, images: torch.Tensor) -> float:
        """FID of ``images`` against the real statistics."""
        from .metrics import GaussianStats, frechet_distance

        return frechet_distance(self.real_stats, GaussianStats.of_batches(self.feature_batches(images)))


def floor_sizes(num_samples: int | None, num_real: int) -> tuple[int, int]:
    """``(a, b)``: the real-vs-real floor scores ``a`` real images against ``b`` others (disjoint random sets).

    The samplers are scored as ``N`` generated images against all ``R`` real ones; a real set scored the same way
    would need ``N + R`` real images. ``N`` real images scored against all ``R`` (a subset of their own reference) is
    no floor: each lies in its own k-NN ball (precision 1) and the shared images pull FID down (its mean term
    ``E|mu_a - mu_b|^2`` falls from ``tr(S)(1/N + 1/R)`` to ``tr(S)(1/N - 1/R)``). Disjoint sets give
    ``tr(S)(1/a + 1/b)``, at least ``4 tr(S) / R`` (two halves). So: ``a = N`` real images against the other
    ``R - N`` where ``N <= R / 2`` (the samplers' own set size, and as close to their FID term as disjoint sets get:
    at N = 16 of 1797 digits halves would put the floor some 28 times lower); two halves above (``None``: halves).
    """
    half = num_real // 2
    if num_samples is None or num_samples >= half:
        return half, half
    return int(num_samples), num_real - int(num_samples)


def real_vs_real(feature_net: str | nn.Module, images: "torch.Tensor | RealImages", seed: int = 0, device="cpu",
                 search: Iterable[str | Path] = (), num_samples: int | None = None,
                 transform: Callable | None = None) -> dict:
    """The floor of every metric: FID, precision and recall of ``num_a`` random real images against ``num_b``
    others (:func:`floor_sizes`: the samplers' ``num_samples`` against the rest where the data allow, else two
    halves; drawn without replacement, disjoint), through :class:`FIDMeter` as the samplers are scored. With
    ``transform`` (a latent teacher's encode-decode round trip) the scored images go through it first: the floor of
    any sampler that has to pass the decoder."""
    a, b = floor_sizes(num_samples, len(images))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    meter = FIDMeter(feature_net, device, search=search).add_real(images[perm[:b]])
    scored = images[perm[b:b + a]]
    if transform is not None:
        scored = torch.cat([transform(x.to(device)).float().clamp(-1, 1).cpu() for x in scored.split(250)])
    return {**meter.score(scored), "num_a": a, "num_b": b}


def real_vs_real_fid(feature_net: str | nn.Module, images: torch.Tensor, seed: int = 0, device="cpu",
                     search: Iterable[str | Path] = ()) -> float:
    """The FID floor: FID between two disjoint random halves of the real data (same feature network)."""
    return real_vs_real(feature_net, images, seed, device, search)["fid"]
