"""Sample-set metrics in a feature space: Fréchet distance (FID) and k-NN precision and recall.

* FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule ...", eq. 6):
  ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` of Gaussians fitted to the features; computed exactly
  as torchmetrics' ``FrechetInceptionDistance`` does (float64 sums of ``f`` and ``f^T f`` per batch, the trace of
  the square root from the eigenvalues of ``S_r S_g``), so its numbers are torchmetrics' numbers.
* Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models", Sec. 3): each set's manifold is the union of balls around its points reaching their k-th nearest
  neighbour (k = 3); precision is the fraction of generated points inside the real manifold (how often samples look
  real), recall the fraction of real points inside the generated manifold (how much of the data is covered). FID
  alone hides blur (precision falls) and lost modes (recall falls).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PR_K = 3  # Kynkäänniemi et al. 2019 use k = 3


@dataclass
class GaussianStats:
    """Running float64 sums of a feature set: ``sum f``, ``sum f f^T`` and the count (torchmetrics' FID state)."""

    total: torch.Tensor
    cov_total: torch.Tensor
    n: int

    @classmethod
    def of_batches(cls, batches: list[torch.Tensor]) -> "GaussianStats":
        total = cov = None
        n = 0
        for f in batches:
            f = f.double()
            total = f.sum(0) if total is None else total + f.sum(0)
            cov = f.t().mm(f) if cov is None else cov + f.t().mm(f)
            n += f.shape[0]
        return cls(total, cov, n)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (self.total / self.n).unsqueeze(0)
        cov = (self.cov_total - self.n * mean.t().mm(mean)) / (self.n - 1)
        return mean.squeeze(0), cov


def frechet_distance(real: GaussianStats, fake: GaussianStats) -> float:
    """FID between the Gaussians of two feature sets (float64; torchmetrics' formula)."""
    if real.n < 2 or fake.n < 2:
        raise ValueError("FID needs at least two samples in each set")
    mu1, s1 = real.mean_cov()
    mu2, s2 = fake.mean_cov()
    a = (mu1 - mu2).square().sum(-1)
    b = s1.trace() + s2.trace()
    c = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum(-1)
    return float(a + b - 2 * c)


def knn_radii(feats: torch.Tensor, k: int = PR_K, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded). Distances are
    float32, in chunks of ``chunk`` rows (50k CIFAR-10 features: 200 MB at a time)."""
    feats = feats.float()
    out = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(out)


def manifold_coverage(ref: torch.Tensor, ref_radii: torch.Tensor, query: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``query`` points inside the manifold of ``ref``: some ``||q - r_i|| <= radius_i``."""
    ref, query = ref.float(), query.float()
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)
        inside.append((d <= ref_radii[None, :]).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` features ``[N, D]``;
    ``real_radii`` may be given when the same real set is scored many times."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    precision = manifold_coverage(real, real_radii, fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall
