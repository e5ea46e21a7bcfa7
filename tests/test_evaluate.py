"""``cmdistill evaluate``: a complete report on a tiny run, paired distances, the FID meter, the multistep-sigma
search stored in the pipeline, the digits feature network, and one-line errors."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from cmdistill.cli import main
from cmdistill.data import digits_dataset, digits_labels
from cmdistill.evaluation.evaluate import candidate_taus, evaluate, paired_distances, search_multistep_sigmas
from cmdistill.evaluation.features import (FIDMeter, SHIPPED_CLASSIFIER, accuracy, digits_split, load_classifier,
                                save_classifier, train_digits_classifier)
from cmdistill.export.pipeline import ConsistencyPipeline

pytestmark = pytest.mark.usefixtures("single_thread")


class TinyFeatures(nn.Module):
    """A fixed random feature network, injected instead of Inception (images in [0, 1])."""

    num_features = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x.float())), 2).flatten(1)


def strict_json(path):
    def bad(name):
        raise ValueError(f"non-finite {name} in {path}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_report_is_complete(run_copy):
    lines = []
    report = evaluate(run_copy, feature_net=TinyFeatures(), echo=lines.append, progress=False, baseline_nfe=[2, 4])
    on_disk = strict_json(run_copy / "report.json")
    assert on_disk["samplers"].keys() == report["samplers"].keys()
    # the tiny run starts its student at mu + sigma_max z (digits.yaml's data-mean prior): every teacher sampler
    # runs from both starts, each with its reference; Heun at 2 and 4 NFE (1 and 2 steps) cannot denoise: not run
    names = ["teacher-ddim-50", "teacher-ddim-50@student"] + [f"student-{k}" for k in range(1, 5)]
    for at in ("", "@student"):
        names += [f"teacher-ddim-{k}{at}" for k in range(1, 5)]
        names += [f"dpm++2m-2{at}", f"dpm++2m-4{at}", f"unipc-2{at}", f"unipc-4{at}"]
    assert list(on_disk["samplers"]) == names
    assert {s["start"] for n, s in on_disk["samplers"].items() if n.endswith("@student")} == {"student"}
    assert {s["ref"] for s in on_disk["samplers"].values() if s["start"] == "student"} == {"teacher-ddim-50@student"}
    assert on_disk["num_samples"] == 16 and on_disk["num_real"] == 1797  # from the run's recipe / the digits
    assert on_disk["feature_net"] == "TinyFeatures" and on_disk["reference"] == "teacher-ddim-50"
    assert math.isfinite(on_disk["fid_floor_real_vs_real"])
    for name, s in on_disk["samplers"].items():
        assert math.isfinite(s["fid"]) and s["fid"] >= 0, name
        assert s["images_per_s"] > 0 and s["vs_teacher_ref"]["mse"] >= 0
    ref = on_disk["samplers"]["teacher-ddim-50"]
    assert ref["vs_teacher_ref"]["mse"] == 0.0 and ref["vs_teacher_ref"]["psnr"] is None and ref["nfe"] == 50
    for k in range(1, 5):
        s = on_disk["samplers"][f"student-{k}"]
        assert s["start"] == "student" and s["ref"] == "teacher-ddim-50@student"
        assert s["nfe"] == k and s["vs_teacher_ref"]["mse"] > 0 and math.isfinite(s["vs_teacher_ref"]["psnr"])
        assert s["sigmas"] == ConsistencyPipeline.from_pretrained(run_copy / "student").sigmas_for(k)
    assert len({round(s["fid"], 6) for s in on_disk["samplers"].values()}) > 1
    md = (run_copy / "report.md").read_text()
    assert "| student-1 | 1 |" in md and "side_by_side.png" in md
    assert any("| teacher-ddim-50 | 50 |" in line for line in lines)  # the table went to stdout
    w, h = Image.open(run_copy / "side_by_side.png").size
    # a 16-px header of column labels, then rows teacher-50 from both starts, student 1/2/4, the best baseline at
    # <= 4 NFE: each 8 x 8 px enlarged to 64, framed (+2) and separated by 6-px gaps; 8 columns
    assert h == 16 + 6 * (8 * 8 + 2 + 2 * 6) and w > 8 * (8 * 8 + 2 + 6)


def test_end_of_distill_report(tiny_run_dir):
    report = strict_json(tiny_run_dir / "report.json")  # written by distill because eval.at_end is true
    assert report["feature_net"] == "digits" and report["num_samples"] == 16
    assert report["feature_net_test_accuracy"] > 0.97
    assert 0 < report["fid_floor_real_vs_real"] < min(s["fid"] for s in report["samplers"].values())
    assert (tiny_run_dir / "report.md").is_file() and (tiny_run_dir / "side_by_side.png").is_file()
    curve = json.loads((tiny_run_dir / "curve.json").read_text())  # eval.curve of recipes/digits.yaml
    assert [c["step"] for c in curve["checkpoints"]] == [2] and "teacher-ddim-50" in curve["reference"]


def test_paired_distances():
    ref = torch.zeros(4, 1, 8, 8)
    d = paired_distances(ref + 0.2, ref)  # 0.2 in [-1, 1] is 0.1 in [0, 1]
    assert d["mse"] == pytest.approx(0.01) and d["psnr"] == pytest.approx(20.0) and d["lpips"] is None
    assert paired_distances(ref, ref) == {"mse": 0.0, "psnr": None, "lpips": None}
    d = paired_distances(ref + 0.2, ref, lpips=lambda a, b: (a - b).abs().flatten(1).mean(1) + 0 * a.sum())
    assert d["lpips"] == pytest.approx(0.2)


def test_fid_meter_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = digits_dataset("").tensors[0][:400]
    fake = real.flip(-1)[:300]
    feats = TinyFeatures()  # one instance: the conv bias is drawn from the global RNG
    tm = FrechetInceptionDistance(feature=feats, normalize=True)
    for x, is_real in ((real, True), (fake, False)):
        for i in range(0, len(x), 250):
            tm.update(((x[i:i + 250] + 1) / 2).clamp(0, 1), real=is_real)
    ours = FIDMeter(feats).add_real(real)(fake)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-6)


def test_fid_meter():
    real = digits_dataset("").tensors[0][:400]
    meter = FIDMeter(TinyFeatures()).add_real(real)
    assert meter(real) == pytest.approx(0.0, abs=1e-6)
    assert meter(real.flip(0)) == pytest.approx(0.0, abs=1e-6)  # the same set in another order
    assert meter(real.flip(-1)) > 1e-3  # mirrored digits are further away
    assert meter(torch.rand_like(real) * 2 - 1) > meter(real.flip(-1))


class CountingImages(torch.utils.data.Dataset):
    """A dataset of (image, label) pairs that counts the images read."""

    def __init__(self, images):
        self.images, self.reads = images, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return self.images[i], 0


def test_real_images_are_read_batch_by_batch_and_score_as_a_tensor():
    """``RealImages`` (the evaluation's real set, never stacked whole): the FID statistics, precision / recall and
    the real-vs-real floor computed from it equal those of the same images as one tensor; a view reads nothing,
    and features read each image once, ``batch_size`` at a time."""
    from cmdistill.evaluation.features import real_vs_real
    from cmdistill.evaluation.real_images import RealImages

    images = digits_dataset("").tensors[0][:600]
    ds = CountingImages(images)
    real = RealImages(ds, limit=500)
    view = real[100:400]
    assert len(real) == 500 and len(view) == 300 and ds.reads == 0
    assert real.shape == (500, 1, 8, 8) and view.shape == (300, 1, 8, 8)
    assert [b.shape[0] for b in view.split(128)] == [128, 128, 44]
    assert ds.reads == 2 + 300  # one image for each of the two shapes, then each image of the view once
    torch.testing.assert_close(torch.cat(list(real[torch.tensor([7, 3])].split(5))), images[[7, 3]])
    feats, fake = TinyFeatures(), images.flip(-1)[:200]
    ds.reads = 0
    lazy, dense = FIDMeter(feats, batch_size=64).add_real(real), FIDMeter(feats, batch_size=64).add_real(images[:500])
    assert ds.reads == 500
    assert lazy(fake) == dense(fake) and lazy.score(fake) == dense.score(fake)
    assert real_vs_real(feats, real, num_samples=100) == real_vs_real(feats, images[:500], num_samples=100)


def test_measure_keeps_the_references_whole_and_a_side_by_side_of_the_others():
    """After scoring, ``measure`` holds every image of a reference sampler (paired distances need them) and the
    first KEPT_IMAGES of any other, whose paired distances are still to its whole reference."""
    from types import SimpleNamespace

    from cmdistill.evaluation.evaluate import KEPT_IMAGES, Sampler, measure

    real = digits_dataset("").tensors[0][:300]
    run = SimpleNamespace(labels=lambda n: None, conditions=lambda n: None, shape=(1, 8, 8), device="cpu", vae=None)
    ref = Sampler("ref", "teacher", 1, 1, lambda z, g: z.clamp(-1, 1))
    other = Sampler("other", "student", 1, 1, lambda z, g: z.clamp(-1, 1) * 0.5, ref="ref")
    entries, images = measure([ref, other], run, FIDMeter(TinyFeatures()).add_real(real), None, 40, [0], 16,
                              lambda s: None, False)
    assert images["ref"].shape[0] == 40 and images["other"].shape[0] == KEPT_IMAGES < 40
    torch.testing.assert_close(images["other"], images["ref"][:KEPT_IMAGES] * 0.5)
    half_way = float((images["ref"] / 4).square().mean())  # ((x - ref) / 2)^2 over all 40 pairs, x = ref / 2
    assert entries["other"]["vs_teacher_ref"]["mse"] == pytest.approx(half_way, rel=1e-5)


def test_greedy_sigma_search_finds_the_grid_optimum():
    cands = candidate_taus(0.01, 80.0, 10)
    assert len(cands) == 10 and all(a > b for a, b in zip(cands, cands[1:])) and 0.01 < cands[-1] < cands[0] < 80
    target = [80.0, 3.0, 0.5, 0.05]

    def score(taus):  # separable: each position's best candidate is the one nearest its target in log space
        return sum((math.log(t) - math.log(g)) ** 2 for t, g in zip(taus, target))

    res = search_multistep_sigmas(score, 80.0, cands, max_steps=4)
    for k in (2, 3, 4):
        taus = res["sigmas"][k]
        assert len(taus) == k and taus[0] == 80.0 and all(a > b for a, b in zip(taus, taus[1:]))
        best = min(cands, key=lambda c: abs(math.log(c) - math.log(target[k - 1])))
        assert taus[-1] == best and res["fid"][k] == pytest.approx(score(taus))
    assert res["sigmas"][3][:2] == res["sigmas"][2]  # greedy: earlier taus are kept
    assert len(res["trace"]) == 10 + 9 + 8  # every unused candidate, once per k


def test_greedy_sigma_search_inserts_below_or_between():
    cands = [10.0, 1.0, 0.1]  # the 2-step optimum is the smallest candidate; 3 and 4 steps still get found
    res = search_multistep_sigmas(lambda t: -sum(t[1:]) if len(t) > 2 else t[1], 80.0, cands, max_steps=4)
    assert res["sigmas"] == {2: [80.0, 0.1], 3: [80.0, 10.0, 0.1], 4: [80.0, 10.0, 1.0, 0.1]}


def test_search_sigmas_are_stored_in_the_pipeline(run_copy):
    before = ConsistencyPipeline.from_pretrained(run_copy / "student")
    report = evaluate(run_copy, num_samples=8, max_steps=3, teacher_steps=3, feature_net=TinyFeatures(),
                      search_sigmas=True, store_sigmas=True, search_num=8, search_candidates=3, baseline_nfe=[2],
                      echo=lambda s: None, progress=False)
    after = ConsistencyPipeline.from_pretrained(run_copy / "student")
    search = strict_json(run_copy / "report.json")["sigma_search"]
    cands = candidate_taus(before.consistency_function.sigma_min, before.consistency_function.sigma_max, 3)
    for k in (2, 3):
        sig = after.sigmas_for(k)
        assert sig == search["sigmas"][str(k)] == report["samplers"][f"student-{k}"]["sigmas"]
        assert sig[0] == before.consistency_function.sigma_max and set(sig[1:]) <= set(cands)
        trials = [fid for taus, fid in search["trace"] if len(taus) == k]
        assert search["fid"][str(k)] == min(trials)
    assert after.sigmas_for(4) == before.sigmas_for(4)  # untouched beyond --max-steps
    assert torch.equal(after.unet.conv_in.weight, before.unet.conv_in.weight)


def test_shipped_digits_classifier():
    clf, cfg = load_classifier(SHIPPED_CLASSIFIER)
    x, y = digits_dataset("").tensors[0], digits_labels()
    _, test = digits_split()
    acc = accuracy(clf, x[test], y[test])
    assert acc > 0.97 and acc == pytest.approx(cfg["test_accuracy"])
    assert cfg["fid_floor_real_vs_real"] > 0


def test_train_classifier_round_trip(tmp_path):
    clf, metrics = train_digits_classifier(epochs=2, progress=False)
    assert metrics["num_train"] + metrics["num_test"] == 1797 and metrics["test_accuracy"] > 0.3  # chance: 0.1
    save_classifier(clf, tmp_path, metrics)
    loaded, cfg = load_classifier(tmp_path)
    x = digits_dataset("").tensors[0][:32]
    assert torch.equal(loaded.features(x), clf.eval().features(x)) and cfg["epochs"] == 2
    assert (tmp_path / "model.safetensors").is_file()


def test_cli_errors_are_one_line(run_copy, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "not a cmdistill run folder" in res.output
    res = CliRunner().invoke(main, ["evaluate", str(run_copy), "--feature-net", "inception", "--num", "4"])
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("cmdistill: error:") and "eval.feature_net=digits" in last
    assert "Traceback" not in res.output
