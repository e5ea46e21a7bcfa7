"""Issue 13: the teacher trajectory bank. Its endpoints are the teacher's ODE solutions (checked against the exact
solution for Gaussian data), it is made once and reused when its manifest matches, refused in one line (exit 2,
nothing written) when it does not or when its tensors changed, and it drives the regression term and data-free
distillation end to end on a tiny teacher."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from conftest import REPO, distill_digits
from test_solvers import MU, GaussianDenoiser, exact

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["train.max_steps=2", "train.batch_size=8", "loss.distance=l2", "train.num_sample_images=4",
        "eval.at_end=false", "eval.curve=false"]


def spec(**kw):
    from cmdistill.training.bank import BankSpec

    base = dict(teacher="t", teacher_fingerprint="f", start="student", solver="heun", num_scales=40, rho=7.0,
                sigma_min=0.002, sigma_max=5.0, prior_mean_sha256=None, guidance_scale=None, classes=None, seed=0,
                count=8)
    return BankSpec(**{**base, **kw})


def test_endpoints_are_the_teachers_ode_solution_for_gaussian_data():
    """Heun on a Karras grid from x_start = mu + sigma_max z down to sigma_min converges to the exact ODE solution of
    N(MU, S0^2) data (``x - MU`` scales with ``sqrt(S0^2 + sigma^2)``) at second order: 1e-3 at 80 points, the
    error a quarter for twice the points."""
    from cmdistill.training.bank import make_trajectories

    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = torch.full((1, 2, 2), MU, dtype=torch.float64)
    errors = []
    for n in (40, 80):
        x_start, x0 = make_trajectories(GaussianDenoiser(), z, spec(num_scales=n), mean)
        torch.testing.assert_close(x_start, MU + 5.0 * z)
        errors.append(float((x0 - exact(x_start, 5.0, 0.002)).abs().max()))
        assert (x0 - x_start).abs().max() > 1.0  # it did move
    assert errors[1] < 1.5e-3 and 3.5 < errors[0] / errors[1] < 4.5


def test_bank_is_reused_when_it_matches_and_refused_when_not(tiny_teacher_dir, tmp_path):
    bank = tmp_path / "bank"
    sets = [f"teacher.path={tiny_teacher_dir}", "bank.count=16", f"bank.path={bank}", "loss.regression_weight=0.5",
            *TINY]
    distill_digits(tmp_path / "a", sets)
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["count"] == 16 and manifest["start"] == "student" and len(manifest["checksum_sha256"]) == 64
    stamp = (bank / "bank.safetensors").stat().st_mtime_ns
    distill_digits(tmp_path / "b", sets)  # same recipe: the very same file, not remade
    assert (bank / "bank.safetensors").stat().st_mtime_ns == stamp

    def refused(extra, words):
        args = ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(tmp_path / "c")]
        for s in sets + extra:
            args += ["--set", s]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and words in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()

    refused(["bank.count=32"], "was made with count 16, the recipe asks for 32")
    refused(["schedule.num_scales=12"], "was made with num_scales 8, the recipe asks for 12")
    refused(["student.sigma_max=10"], "was made with sigma_max 5.0, the recipe asks for 10.0")
    with open(bank / "bank.safetensors", "r+b") as f:  # one byte changed
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    refused([], "does not match its manifest's checksum")


def test_regression_term_pulls_the_one_step_output_to_the_endpoints(tiny_teacher_dir, tmp_path):
    """With a large regression weight the student's 1-step error on the bank falls during training."""
    from safetensors.torch import load_file

    from cmdistill.export.pipeline import ConsistencyPipeline

    bank = tmp_path / "bank"
    run = distill_digits(tmp_path / "run", [f"teacher.path={tiny_teacher_dir}", "bank.count=32", f"bank.path={bank}",
                                            "loss.regression_weight=20", "optim.lr=1e-3", "train.max_steps=25",
                                            "train.batch_size=8", "loss.distance=l2", "train.num_sample_images=4",
                                            "eval.at_end=false", "eval.curve=false", "student.ema_decay=0.5"])
    b = load_file(str(bank / "bank.safetensors"))
    fn = ConsistencyPipeline.from_pretrained(run / "student").consistency_function.eval()
    with torch.no_grad():
        after = (fn(b["x_start"], fn.sigma_max) - b["x0"]).pow(2).mean()
    from cmdistill.core.consistency import make_student
    from cmdistill.teachers import load_teacher

    start = make_student(load_teacher(str(tiny_teacher_dir)), sigma_max=fn.sigma_max).eval()
    with torch.no_grad():
        before = (start(b["x_start"], fn.sigma_max) - b["x0"]).pow(2).mean()
    assert after < 0.5 * before


def test_data_free_distillation_trains_on_the_teachers_samples(tiny_teacher_dir, tmp_path):
    """data.name: teacher: the bank (from the top of the teacher's range) is the data; the student's 1-step prior
    mean is the mean of the teacher's samples, not of the digits."""
    from safetensors.torch import load_file

    from cmdistill.export.pipeline import ConsistencyPipeline

    bank = tmp_path / "bank"
    evaluated = ["eval.at_end=true", "eval.curve=true", "eval.data=digits", "eval.num_samples=16", "eval.batch_size=16",
                 "eval.search_sigmas=false", "eval.baselines=[dpm++2m]", "eval.baseline_nfe=[2]"]
    run = distill_digits(tmp_path / "run", [f"teacher.path={tiny_teacher_dir}", "data.name=teacher", "bank.count=32",
                                            "bank.start=teacher", f"bank.path={bank}", *TINY, *evaluated])
    x0 = load_file(str(bank / "bank.safetensors"))["x0"]
    fn = ConsistencyPipeline.from_pretrained(run / "student").consistency_function
    torch.testing.assert_close(fn.prior_mean, x0.mean(0), atol=1e-6, rtol=1e-5)  # stored to 6 digits
    # evaluated against the real digits named by eval.data; the checkpoint curve starts from the bank's mean too
    report = json.loads((run / "report.json").read_text())
    assert report["real_vs_real"] is not None and "student-1" in report["samplers"]
    assert json.loads((run / "curve.json").read_text())["checkpoints"]
    res = CliRunner().invoke(main, ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(tmp_path / "x"),
                                    "--set", "data.name=teacher", "--set", "bank.count=8"])
    assert res.exit_code == 2 and "needs 'bank.start: teacher'" in res.stderr
    res = CliRunner().invoke(main, ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(tmp_path / "y"),
                                    "--set", "data.name=teacher", "--set", "bank.count=8", "--set", "bank.start=teacher"])
    assert res.exit_code == 2 and "set 'eval.data'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
