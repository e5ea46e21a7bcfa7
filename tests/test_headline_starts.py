"""Issue 24, items 1-4: the headline compares like with like. Training-free samplers also start where the student
starts (its sigma_max and data-mean prior) and are exact there on Gaussian data; the headline names the best one
from either start; Heun budgets that cannot denoise are not run; samples are paired only with a reference from the
same start; the real-vs-real floor scores the samplers' set size where the data allow and says its sizes. From the
student's start DDIM, DPM-Solver++ and UniPC run on the trailing spacing of the range left, which is diffusers' own
loop when that range is the teacher's whole one."""
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


# --------------------------------------------------------------------------- the grid from the student's start


class GaussianDDPM(GaussianDenoiser):
    """The same Gaussian data with a DDPM teacher's discrete sigma table (linear betas, T = 1000): from the student's
    start the samplers run on its timesteps."""

    def __init__(self):
        super().__init__()
        from cmdistill.core.schedules import ddpm_betas, vp_sigmas_from_betas

        self.sigma_table = vp_sigmas_from_betas(ddpm_betas(1000))
        self.sigma_min, self.sigma_max = float(self.sigma_table[0]), float(self.sigma_table[-1])


def _from_start(den, name: str, nfe: int, start: Start):
    """The sampler ``name`` (a baseline, or the teacher's ``ddim``) at ``nfe`` evaluations from ``start``."""
    if name == "ddim":
        return teacher_sampler(den, "ddim", nfe, start)
    [(label, used, sample)] = make_baselines(den, [nfe], [name], start=start)
    assert (label, used) == (f"{name}-{nfe}{start.suffix}", nfe)
    return sample


DIFFUSERS = {"dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
             "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
             "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True})}


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("nfe", [2, 5])
def test_a_student_start_at_the_teachers_sigma_max_is_diffusers_own_loop(name, nfe):
    """The student-start grid started at the teacher's sigma_max is diffusers' trailing grid, so the sampler from
    ``mu + sigma z`` is diffusers' own loop from that very state in VP space, ``(mu + sigma z) / sqrt(1 + sigma^2)``
    (a random network: |x| ~ 500, held to float32 precision of that)."""
    import diffusers
    from diffusers import DDPMScheduler

    from cmdistill.core.denoisers import DDPMDenoiser
    from conftest import tiny_unet

    unet = tiny_unet(seed=3).eval()
    cfg = dict(DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").config)
    den = DDPMDenoiser(unet, cfg)
    g = torch.Generator().manual_seed(0)
    mean, z = 0.3 * torch.randn(1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    ours = _from_start(den, name, nfe, Start("student", den.sigma_max, mean))(z, None)
    cls, options = DIFFUSERS[name]
    sched = getattr(diffusers, cls).from_config(cfg, timestep_spacing="trailing", **options)
    sched.set_timesteps(nfe)
    x = (mean + den.sigma_max * z) / math.sqrt(1 + den.sigma_max**2)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "unipc"])
def test_the_students_start_grid_of_a_ddpm_teacher_solves_the_ode_exactly(name):
    """From ``mu + 5 z`` on a DDPM teacher's timesteps each sampler converges to the exact ODE solution from that
    point, at its order: 4x the steps cut DDIM's error 4x at least (first order), DPM-Solver++(2M)'s and UniPC's 10x
    at least (second order or more)."""
    den, mean = GaussianDDPM(), torch.full((1, 4, 4), 0.1)
    start = Start("student", 5.0, mean)
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    want = exact(mean + 5.0 * z, 5.0)
    e16, e64 = (float((_from_start(den, name, n, start)(z, None) - want).abs().max()) for n in (16, 64))
    first = name == "ddim"
    assert e64 < e16 / (3.5 if first else 10) and e64 < (3e-2 if first else 1e-2) * float(want.abs().max()), (e16, e64)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "unipc"])
def test_the_students_start_grid_spends_no_evaluation_at_sigma_min(name):
    """Two evaluations from sigma 5: the grid's second point sits in the range (uniform in the teacher's timestep),
    not at sigma_min, where a Karras grid puts it and the step to 0 changes nothing: a smaller error."""
    from cmdistill.evaluation.baselines import karras_sigmas, ode, sampler, truncated_sigmas

    den, mean = GaussianDDPM(), torch.full((1, 4, 4), 0.1)
    start = Start("student", 5.0, mean)
    grid = truncated_sigmas(den, start, 2)
    assert grid[0] == 5.0 and grid[-1] == 0 and 0.5 < grid[1] < 2.0  # t = (t0 + 1) / 2 - 1: sigma 1.13
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    want = exact(mean + 5.0 * z, 5.0)
    solve = ode("ddim") if name == "ddim" else BASELINES[name].solve
    karras = sampler(den, solve, karras_sigmas(den, start, 2), start)
    err = float((_from_start(den, name, 2, start)(z, None) - want).abs().max())
    assert err < 0.8 * float((karras(z, None) - want).abs().max())  # measured: 0.70 of it for each solver


# --------------------------------------------------------------------------- the floor at the samplers' sizes


def test_floor_sizes():
    from cmdistill.evaluation.features import floor_sizes

    assert floor_sizes(16, 1797) == (16, 1781)  # the samplers' set size against the rest of the real images
    assert floor_sizes(898, 1797) == floor_sizes(1000, 1797) == floor_sizes(None, 1797) == (898, 898)


def test_floor_scores_the_samplers_set_size_against_the_rest():
    """With 16 samples the floor scores 16 real digits against the other 1781: its FID carries the same 1/16 as
    the samplers' (many times two halves'), and the row and its note say so."""
    from cmdistill.data import digits_dataset
    from cmdistill.evaluation.features import real_vs_real
    from test_evaluate import TinyFeatures

    real = digits_dataset("").tensors[0]
    feats = TinyFeatures()
    small, halves = (real_vs_real(feats, real, num_samples=n) for n in (16, None))
    assert (small["num_a"], small["num_b"], halves["num_a"], halves["num_b"]) == (16, 1781, 898, 898)
    assert small["fid"] > 5 * halves["fid"]
    table = report_table({"samplers": {"teacher-ddim-50": _entry("teacher", 50, 2.1)}, "num_samples": 16,
                          "num_real": 1797, "real_vs_real": small})
    assert "| real vs real (16 vs 1781) |" in table and "Its scored set is theirs" in table


def test_no_sampler_with_more_steps_than_the_students_range_holds():
    """A start at timestep 20 of 1000 holds 21 trailing steps: DDIM-50 from there is not built (evaluate refuses it
    as a reference in one line), a 16-NFE baseline still is."""
    from cmdistill.evaluation.baselines import truncated_sigmas

    den = GaussianDDPM()
    start = Start("student", float(den.sigma_table[20]), None)
    assert len(truncated_sigmas(den, start, 21)) == 22 and truncated_sigmas(den, start, 22) is None
    assert teacher_sampler(den, "ddim", 50, start) is None
    assert [n for n, _, _ in make_baselines(den, [16, 50], ["unipc"], start=start)] == ["unipc-16@student"]
