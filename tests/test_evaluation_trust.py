"""Issue 12: precision and recall, the training-free baselines through diffusers' own schedulers, the headline
rows, curves over a run's checkpoints, noise seeds, and an evaluation that never modifies the run."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.evaluation.evaluate import evaluate, evaluation_seeds, search_seeds
from cmdistill.evaluation.metrics import knn_radii, precision_recall
from cmdistill.evaluation.report import headline
from conftest import distill_digits
from test_evaluate import TinyFeatures

pytestmark = pytest.mark.usefixtures("single_thread")


def checksums(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- precision and recall


def test_precision_recall_of_a_set_against_itself_is_one():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x[torch.randperm(300)]) == (1.0, 1.0)


def test_precision_falls_for_a_shifted_set_and_recall_for_a_collapsed_one():
    g = torch.Generator().manual_seed(1)
    real, other = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    p_same, r_same = precision_recall(real, other)  # a fresh draw of the same distribution
    assert p_same > 0.8 and r_same > 0.8
    p_shift, _ = precision_recall(real, other + 3.0)  # samples off the data manifold
    assert p_shift < 0.2
    collapsed = real[:10].repeat(40, 1) + 0.01 * torch.randn(400, 4, generator=g)  # 10 modes only
    p_col, r_col = precision_recall(real, collapsed)
    assert p_col > 0.9 and r_col < 0.3  # looks real, covers little


def test_knn_radius_is_the_kth_neighbour():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert knn_radii(x, k=3).tolist() == [6.0, 5.0, 3.0, 5.0, 9.0]


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("name, cls, options", [
    ("dpm++2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("unipc", "UniPCMultistepScheduler", {"solver_order": 2}),
])
@pytest.mark.parametrize("nfe", [2, 5])
def test_baseline_equals_diffusers_own_loop(name, cls, options, nfe):
    """The baseline sampler is diffusers' scheduler loop over the teacher's network, from the evaluation's noise."""
    import diffusers
    from diffusers import DDPMScheduler

    from cmdistill.core.denoisers import DDPMDenoiser
    from cmdistill.evaluation.baselines import make_baselines
    from conftest import tiny_unet

    unet = tiny_unet(seed=2).eval()
    cfg = dict(DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").config)
    teacher = DDPMDenoiser(unet, cfg)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    [(label, used, sample)] = make_baselines(teacher, [nfe], [name], "trailing")
    assert (label, used) == (f"{name}-{nfe}", nfe)
    ours = sample(z, torch.Generator())
    sched = getattr(diffusers, cls).from_config(cfg, timestep_spacing="trailing", **options)
    sched.set_timesteps(nfe)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert len(sched.timesteps) == nfe
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))  # fp32, |x| ~ 500


def test_heun_karras_uses_its_budget():
    from cmdistill.evaluation.baselines import BASELINES, make_baselines

    calls = []

    class Counting(torch.nn.Module):
        sigma_min, sigma_max, sigma_data = 0.01, 80.0, 0.5

        def forward(self, x, sigma):
            calls.append(1)
            return x * 0

    heun = BASELINES["heun-karras"]
    for budget, used in ((7, 7), (8, 7), (10, 9)):
        calls.clear()
        [(label, n, sample)] = make_baselines(Counting(), [budget], ["heun-karras"])
        assert (label, n, heun.nfe(heun.steps(budget))) == (f"heun-karras-{used}", used, used)
        sample(torch.randn(2, 1, 4, 4), None)
        assert len(calls) == used
    # 1-3 Heun steps (1-6 NFE) leave about sigma_max / 2 of noise: not run (FID 218 and 283 on digits before)
    assert all(heun.steps(b) is None for b in range(1, 7))
    names = [n for n, _, _ in make_baselines(Counting(), [2, 4, 8], None)]
    assert names == ["heun-karras-7"]  # the diffusers samplers need a DDPM teacher


# --------------------------------------------------------------------------- headline rows


def test_headline_picks_the_best_training_free_samplers_and_the_speedup():
    s = {"student-1": {"kind": "student", "nfe": 1, "fid": 3.0, "precision": 0.9, "images_per_s": 1000.0},
         "student-2": {"kind": "student", "nfe": 2, "fid": 2.0, "precision": 0.9, "images_per_s": 500.0},
         "teacher-ddim-1": {"kind": "teacher", "nfe": 1, "fid": 200.0, "images_per_s": 1000.0},
         "dpm++2m-2": {"kind": "baseline", "nfe": 2, "fid": 20.0, "images_per_s": 500.0},
         "dpm++2m-4": {"kind": "baseline", "nfe": 4, "fid": 2.5, "images_per_s": 250.0},
         "teacher-ddim-50": {"kind": "teacher", "nfe": 50, "fid": 1.9, "images_per_s": 20.0}}
    rows = {r["student"]: r for r in headline(s, (1, 2))}
    assert rows["student-1"]["best_at_k"] == "teacher-ddim-1" and rows["student-1"]["best_at_2k"] == "dpm++2m-2"
    assert rows["student-1"]["equal_quality"] == "dpm++2m-4" and rows["student-1"]["speedup"] == 4.0
    assert rows["student-2"]["best_at_2k"] == "dpm++2m-4"
    assert rows["student-2"]["equal_quality"] == "teacher-ddim-50" and rows["student-2"]["speedup"] == 25.0


# --------------------------------------------------------------------------- seeds


def test_search_noise_is_disjoint_from_evaluation_noise():
    from cmdistill.evaluation.evaluate import MAX_SEEDS
    from cmdistill.evaluation.generate import initial_noise

    for seed in (0, 7):
        ev = evaluation_seeds(seed, MAX_SEEDS)
        used = set(ev) | {s + 1 for s in ev}  # initial noise and the student's multistep noise
        assert not used & set(search_seeds(seed))
        z_search, _ = initial_noise(4, (1, 8, 8), search_seeds(seed)[0])
        assert all(not torch.equal(z_search, initial_noise(4, (1, 8, 8), s)[0]) for s in ev)


# --------------------------------------------------------------------------- measuring never modifies


def test_plain_evaluate_changes_nothing_but_its_report(run_copy):
    before = checksums(run_copy)
    report = evaluate(run_copy, feature_net=TinyFeatures(), baseline_nfe=[2], seeds=2, echo=lambda s: None,
                      progress=False)
    after = checksums(run_copy)
    written = {"report.json", "report.md", "side_by_side.png"}
    assert {k: v for k, v in after.items() if k not in written} == {k: v for k, v in before.items()
                                                                     if k not in written}
    assert not any(k.startswith("student/") and before[k] != after[k] for k in before)
    s = report["samplers"]
    assert {"dpm++2m-2", "unipc-2", "dpm++2m-2@student", "unipc-2@student"} <= s.keys()
    assert not any(k.startswith("heun-karras") for k in s)  # one Heun step at 2 NFE cannot denoise
    for e in s.values():  # two seeds: mean and spread of every metric
        assert 0 <= e["precision"] <= 1 and 0 <= e["recall"] <= 1 and e["fid_std"] >= 0
    rr = report["real_vs_real"]
    assert rr["precision"] > 0.5 and rr["recall"] > 0.5
    assert (rr["num_a"], rr["num_b"]) == (16, 1797 - 16)  # the samplers' 16 real digits against the rest
    assert [r["student"] for r in report["headline"]] == ["student-1", "student-2", "student-4"]
    md = (run_copy / "report.md").read_text()
    assert "## Headline" in md and "| dpm++2m-2 | 2 |" in md and "real vs real" in md


def test_search_without_store_leaves_the_student_alone(run_copy):
    before = checksums(run_copy / "student")
    report = evaluate(run_copy, num_samples=8, max_steps=2, teacher_steps=2, feature_net=TinyFeatures(),
                      search_sigmas=True, search_num=8, search_candidates=3, baseline_nfe=[2],
                      echo=lambda s: None, progress=False)
    assert checksums(run_copy / "student") == before
    assert report["sigma_search"]["stored"] is False
    assert report["samplers"]["student-2"]["sigmas"] == report["sigma_search"]["sigmas"]["2"]


def test_store_needs_search(run_copy):
    res = CliRunner().invoke(main, ["evaluate", str(run_copy), "--store"])
    assert res.exit_code == 2 and "--store stores the sigmas that --search-sigmas finds" in res.stderr


# --------------------------------------------------------------------------- curves


@pytest.fixture(scope="module")
def two_checkpoint_run(tmp_path_factory, tiny_teacher_dir):
    return distill_digits(tmp_path_factory.mktemp("curve") / "run", [
        f"teacher.path={tiny_teacher_dir}", "train.max_steps=2", "train.batch_size=8", "train.checkpoint_every=1",
        "train.keep_checkpoints=5", "loss.distance=l2", "train.num_sample_images=4", "eval.at_end=false",
        "eval.curve=false", "eval.num_samples=16", "eval.batch_size=16", "student.sigma_max=null"])


def test_curve_scores_checkpoints_without_touching_the_run(two_checkpoint_run, tmp_path):
    run = Path(shutil.copytree(two_checkpoint_run, tmp_path / "run"))
    before = checksums(run)
    res = CliRunner().invoke(main, ["evaluate", str(run), "--checkpoints", "all", "--feature-net", "digits"])
    assert res.exit_code == 0, res.output
    after = checksums(run)
    assert {k: v for k, v in after.items() if not k.startswith("curve.")} == before
    curve = json.loads((run / "curve.json").read_text())
    assert [c["step"] for c in curve["checkpoints"]] == [1, 2]
    for c in curve["checkpoints"]:
        for k in ("1", "2", "4"):
            assert c[k]["fid"] > 0 and 0 <= c[k]["precision"] <= 1
    assert curve["checkpoints"][0]["1"] != curve["checkpoints"][1]["1"]  # different weights, different scores
    from PIL import Image

    assert Image.open(run / "curve.png").size[0] > 500


def test_curve_of_the_last_checkpoint_matches_the_exported_student(two_checkpoint_run, tmp_path):
    """The checkpoint's EMA weights, loaded for the curve, are the exported student's: same samples, same FID."""
    run = Path(shutil.copytree(two_checkpoint_run, tmp_path / "run"))
    from cmdistill.evaluation.curve import evaluate_checkpoints

    feats = TinyFeatures()  # one instance for both (its conv bias comes from the global RNG)
    curve = evaluate_checkpoints(run, "2", num_samples=16, batch_size=16, feature_net=feats, steps=(1,),
                                 echo=lambda s: None)
    report = evaluate(run, num_samples=16, feature_net=feats, max_steps=1, teacher_steps=2,
                      baseline_nfe=[1], echo=lambda s: None, progress=False)
    assert curve["checkpoints"][0]["1"]["fid"] == pytest.approx(report["samplers"]["student-1"]["fid"], rel=1e-9)


def test_curve_refuses_missing_checkpoints(two_checkpoint_run):
    res = CliRunner().invoke(main, ["evaluate", str(two_checkpoint_run), "--checkpoints", "7"])
    assert res.exit_code == 2 and "no checkpoint at step 7" in res.stderr


def test_convergence_script_overlays_the_committed_curves(tmp_path):
    """benchmarks/plot_convergence.py draws docs/images/convergence_digits.png from the committed curve json through
    the package's own plot_curves: one figure, two runs."""
    import subprocess
    import sys

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "conv.png"
    res = subprocess.run([sys.executable, str(root / "benchmarks/plot_convergence.py"), str(out),
                          f"shipped={root / 'benchmarks/results/convergence_digits.json'}",
                          f"regression={root / 'benchmarks/results/convergence_digits_regression.json'}"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == Image.open(root / "docs/images/convergence_digits.png").size == (1100, 420)
    bad = subprocess.run([sys.executable, str(root / "benchmarks/plot_convergence.py"), str(out), "no-label.json"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "expected LABEL=PATH" in bad.stderr
