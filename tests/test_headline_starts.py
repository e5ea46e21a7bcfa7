"""Issue 24, items 1-4: the headline compares like with like. Training-free samplers also start where the student
starts (its sigma_max and data-mean prior) and are exact there on Gaussian data; the headline names the best one
from either start; Heun budgets that cannot denoise are not run; samples are paired only with a reference from the
same start; the real-vs-real floor says its set sizes."""
from __future__ import annotations

import math

import pytest
import torch

from cmdistill.evaluation.baselines import BASELINES, Start, make_baselines, student_start, teacher_sampler
from cmdistill.evaluation.report import headline, headline_table, report_table

MU, S = 0.3, 0.5  # data ~ N(MU, S^2) per pixel


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(MU, S^2 I) data: ``D(x, sigma) = MU + S^2 / (S^2 + sigma^2) (x - MU)``."""

    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 0.5

    def forward(self, x, sigma, **cond):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return MU + S**2 / (S**2 + s2) * (x - MU)


def exact(x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """The probability-flow ODE solution at sigma 0 from ``x_start`` at ``sigma_start`` (EDM eq. 3 on Gaussian data:
    ``x(sigma) - MU`` scales with ``sqrt(S^2 + sigma^2)``)."""
    return MU + (x_start - MU) * S / math.sqrt(S**2 + sigma_start**2)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_from_the_students_start_solve_the_ode_exactly(name):
    """From ``mu + 5 z`` (the digits student's start) each baseline converges to the exact ODE solution from that
    very point, on the grid it runs on from there."""
    den, mean = GaussianDenoiser(), torch.full((1, 4, 4), 0.1)
    start = Start("student", 5.0, mean)
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    want = exact(mean + 5.0 * z, 5.0)
    errs = []
    for budget in (8, 32, 128):
        [(label, nfe, sample)] = make_baselines(den, [budget], [name], start=start)
        assert label.endswith("@student")
        errs.append(float((sample(z, None) - want).abs().max()))
    assert errs[-1] < 2e-3 * float(want.abs().max()), errs
    assert errs[-1] < errs[0], errs


def test_teacher_ddim_from_the_students_start_converges_at_first_order():
    den, mean = GaussianDenoiser(), torch.full((1, 4, 4), -0.2)
    start = Start("student", 5.0, mean)
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    want = exact(mean + 5.0 * z, 5.0)
    e64, e256 = (float((teacher_sampler(den, "ddim", k, start)(z, None) - want).abs().max()) for k in (64, 256))
    assert e256 < e64 / 3.5 and e256 < 0.02  # first order: 4x the steps, a quarter of the error


def test_no_second_start_when_the_student_starts_where_the_teacher_does():
    den = GaussianDenoiser()
    assert student_start(den, den.sigma_max, None) is None
    assert student_start(den, den.sigma_max, torch.zeros(1, 2, 2)) is not None
    assert student_start(den, 5.0, None) is not None


def _entry(kind, nfe, fid, ips=100.0, start="teacher"):
    return {"kind": kind, "nfe": nfe, "fid": fid, "precision": 0.9, "images_per_s": ips, "start": start,
            "ref": None, "vs_teacher_ref": {"mse": 0.0, "psnr": None, "lpips": None}, "recall": 0.9}


def test_headline_names_the_best_sampler_from_either_start():
    s = {"student-1": _entry("student", 1, 6.0, 1000.0, "student"),
         "student-2": _entry("student", 2, 2.8, 500.0, "student"),
         "teacher-ddim-2": _entry("teacher", 2, 250.0), "unipc-4": _entry("baseline", 4, 34.0, 250.0),
         "teacher-ddim-2@student": _entry("teacher", 2, 9.0, 500.0, "student"),
         "unipc-4@student": _entry("baseline", 4, 3.1, 250.0, "student")}
    rows = {r["student"]: r for r in headline(s, (1, 2))}
    assert rows["student-1"]["best_at_2k"] == "teacher-ddim-2@student" and rows["student-1"]["best_at_2k_start"] \
        == "student"
    assert rows["student-2"]["best_at_k"] == "teacher-ddim-2@student"
    assert rows["student-2"]["best_at_2k"] == "unipc-4@student"
    assert rows["student-1"]["best_at_k"] is None  # nothing training-free at 1 NFE in this table
    table = headline_table({"samplers": s, "headline": list(rows.values())})
    assert "unipc-4@student (3.100)" in table


def test_floor_row_says_its_sizes():
    report = {"samplers": {"teacher-ddim-50": _entry("teacher", 50, 2.1)}, "num_samples": 1000, "num_real": 1797,
              "real_vs_real": {"fid": 3.99, "precision": 0.92, "recall": 0.9, "num_a": 898, "num_b": 898}}
    table = report_table(report)
    assert "| real vs real (two halves, 898 vs 898) |" in table
    assert "1000 generated against 1797 real" in table
