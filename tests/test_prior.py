"""``student.prior``: where 1-step sampling starts. Closed form on Gaussian data: with a range capped at a low
``sigma_max`` the exact consistency function maps CM's ``sigma_max z`` to samples whose mean is biased, and the
data-mean start ``mu + sigma_max z`` to samples with exactly the data's mean and spread."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from cmdistill.commands import load_recipe
from cmdistill.config import ConfigError
from cmdistill.core.consistency import make_student
from cmdistill.teachers import load_teacher
from cmdistill.export.pipeline import ConsistencyPipeline
from cmdistill.core.sampling import start_sample
from cmdistill.data import data_mean, prior_mean
from cmdistill.core.sampling import sample_consistency

MU, S0 = 0.4, 0.3  # x0 ~ N(MU, S0^2) per pixel


class ExactGaussianCM(torch.nn.Module):
    """The exact consistency function of N(MU, S0^2) data: the probability-flow ODE solution to sigma_min,
    ``f(x, sigma) = MU + (x - MU) sqrt(S0^2 + sigma_min^2) / sqrt(S0^2 + sigma^2)``."""

    sigma_min, sigma_max = 0.002, 2.0

    def __init__(self, mean=None):
        super().__init__()
        self.prior_mean = mean

    def forward(self, x, sigma):
        return MU + (x - MU) * math.sqrt(S0**2 + self.sigma_min**2) / math.sqrt(S0**2 + float(sigma) ** 2)


def test_data_mean_start_gives_the_data_distribution():
    z = torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ds = TensorDataset(torch.full((10, 1, 2, 2), MU))
    zero = sample_consistency(ExactGaussianCM(None), z, [2.0])
    fixed = sample_consistency(ExactGaussianCM(data_mean(ds)), z, [2.0])
    # CM's start: mean MU (1 - S0 / sqrt(S0^2 + 4)) = 0.34, far from MU
    assert zero.mean().item() == pytest.approx(MU * (1 - S0 / math.sqrt(S0**2 + 4)), abs=5e-3)
    assert abs(zero.mean().item() - MU) > 0.05
    # data-mean start: mean MU and std S0 * 2 / sqrt(S0^2 + 4) ~ S0 (sigma_max^2 against sigma_max^2 + S0^2)
    assert fixed.mean().item() == pytest.approx(MU, abs=5e-3)
    assert fixed.std().item() == pytest.approx(S0 * 2 / math.sqrt(S0**2 + 4), rel=2e-2)


def test_data_mean_and_hflip():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    ds = TensorDataset(x)
    torch.testing.assert_close(data_mean(ds), x.mean(0))
    flipped = data_mean(ds, hflip=True)
    torch.testing.assert_close(flipped, (x.mean(0) + x.mean(0).flip(-1)) / 2)
    assert prior_mean("zero", ds) is None
    with pytest.raises(ValueError, match="unknown prior"):
        prior_mean("gauss", ds)


def test_start_sample():
    z, m = torch.randn(3, 1, 2, 2), torch.randn(1, 2, 2)
    torch.testing.assert_close(start_sample(z, 5.0), 5.0 * z)
    torch.testing.assert_close(start_sample(z, 5.0, m), 5.0 * z + m)


def test_pipeline_round_trip_keeps_the_prior(tiny_teacher_dir, tmp_path):
    teacher = load_teacher(str(tiny_teacher_dir))
    f = make_student(teacher, "lcm", sigma_max=5.0).eval()
    f.prior_mean = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    ConsistencyPipeline.from_student(f).save_pretrained(tmp_path / "s")
    pipe = ConsistencyPipeline.from_pretrained(tmp_path / "s")
    torch.testing.assert_close(pipe.consistency_function.prior_mean, f.prior_mean, atol=1e-6, rtol=1e-5)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = pipe(latents=z, num_inference_steps=1, output_type="latent").images
    with torch.no_grad():
        ref = f(f.prior_mean + 5.0 * z, 5.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_recipe_key():
    assert load_recipe(None, ["student.prior=data_mean"]).student.prior == "data_mean"
    with pytest.raises(ConfigError, match="student.prior"):
        load_recipe(None, ["student.prior=mean"])
