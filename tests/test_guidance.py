"""Issue 14: the classifier-free-guided teacher is a denoiser: one batched call equals the two calls combined,
w = 1 is the conditional teacher, per-sample scales, and an ODE solver step runs on it unchanged."""
import pytest
import torch
from diffusers import DDPMScheduler

from cmdistill.core.denoisers import DDPMDenoiser
from cmdistill.core.guidance import GuidedDenoiser
from test_conditioning import cond_unet


@pytest.fixture(scope="module")
def teacher():
    return DDPMDenoiser(cond_unet(seed=1).eval(), dict(DDPMScheduler(num_train_timesteps=1000).config))


def test_one_batched_call_equals_the_two_calls_combined(teacher):
    g = GuidedDenoiser(teacher, {"class_labels": 10}, guidance_scale=3.0)
    x, s, y = torch.randn(4, 1, 8, 8), torch.tensor([0.5, 2.0, 10.0, 80.0]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        dc, du = teacher(x, s, class_labels=y), teacher(x, s, class_labels=torch.full_like(y, 10))
        out = g(x, s, class_labels=y)
    torch.testing.assert_close(out, du + 3.0 * (dc - du), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, dc, atol=1e-4)


def test_scale_one_is_the_conditional_teacher_and_scales_go_per_sample(teacher):
    # different batch compositions (6 vs 3 vs 2 rows) round float32 convolutions differently: 1e-4
    g = GuidedDenoiser(teacher, {"class_labels": 10})
    x, s, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 5.0, 20.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(g(x, s, class_labels=y), teacher(x, s, class_labels=y), rtol=1e-4, atol=1e-4)
        per = g(x, s, class_labels=y, guidance_scale=torch.tensor([1.0, 2.0, 5.0]))
        for i, w in enumerate((1.0, 2.0, 5.0)):
            one = g(x[i:i + 1], s[i:i + 1], class_labels=y[i:i + 1], guidance_scale=w)
            torch.testing.assert_close(per[i:i + 1], one, rtol=1e-4, atol=1e-4)


def test_solvers_run_on_the_guided_teacher(teacher):
    from cmdistill.core.solvers import solve

    g = GuidedDenoiser(teacher, {"class_labels": 10}, guidance_scale=2.0)
    x = torch.randn(2, 1, 8, 8) * 5
    with torch.no_grad():
        out = solve(g, x, torch.tensor([5.0, 5.0]), torch.tensor([4.0, 4.0]), "heun", class_labels=torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_guided_distillation_bakes_the_scale_into_the_student(tmp_path, monkeypatch):
    """guidance.scale: the pairs come from the guided teacher, the student stores its scale, and the pipeline
    refuses any other guidance_scale with one clear line."""
    import cmdistill.training.distill as T
    from cmdistill.export.pipeline import ConsistencyPipeline
    from conftest import distill_digits, save_teacher

    teacher_dir = save_teacher(tmp_path / "teacher", cond_unet(seed=4))
    teachers = []
    orig = T.cd_loss

    def recording(student, target, teacher, *a, **k):
        teachers.append((teacher, k.get("class_labels")))
        return orig(student, target, teacher, *a, **k)

    monkeypatch.setattr(T, "cd_loss", recording)
    run = distill_digits(tmp_path / "run", [f"teacher.path={teacher_dir}", "guidance.scale=3", "train.max_steps=2",
                                            "train.batch_size=8", "loss.distance=l2", "train.num_sample_images=4",
                                            "eval.at_end=false", "eval.curve=false", "student.sigma_max=null"])
    assert all(isinstance(t, GuidedDenoiser) and t.guidance_scale == 3.0 and int(t.null_condition["class_labels"]) == 10 and y is not None
               for t, y in teachers) and len(teachers) == 2
    pipe = ConsistencyPipeline.from_pretrained(run / "student")
    assert pipe.consistency_function.guidance_scale == 3.0
    out = pipe(batch_size=2, class_labels=[1, 2], guidance_scale=3.0, output_type="latent").images
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="distilled at guidance scale 3; it cannot sample at guidance_scale=5"):
        pipe(batch_size=2, class_labels=[1, 2], guidance_scale=5.0)


def test_guidance_needs_a_conditional_teacher(tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from cmdistill.cli import main
    from conftest import REPO

    res = CliRunner().invoke(main, ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(tmp_path / "run"), "--set",
                                    f"teacher.path={tiny_teacher_dir}", "--set", "guidance.scale=2"])
    assert res.exit_code == 2 and "is not conditional" in res.stderr
    assert not (tmp_path / "run").exists()


def test_guided_run_net_is_the_two_outputs_combined(teacher):
    """What diffusers' scheduler loops (the DPM-Solver++ / UniPC baselines) call: the guided raw network output."""
    g = GuidedDenoiser(teacher, {"class_labels": 10}, guidance_scale=2.5)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([2, 4, 6])
    with torch.no_grad():
        ec, eu = teacher.run_net(x, t, class_labels=y), teacher.run_net(x, t, class_labels=torch.full_like(y, 10))
        torch.testing.assert_close(g.run_net(x, t, class_labels=y), eu + 2.5 * (ec - eu), rtol=1e-5, atol=1e-5)


def test_a_new_guidance_embedding_leaves_the_student_the_teacher(teacher):
    """Zero-started last layer: with the embedding, at any w, the student equals the student without it (and so the
    teacher's denoiser under the boundary); a trained embedding makes w matter."""
    from cmdistill.core.consistency import make_student
    from cmdistill.core.guidance import GuidanceEmbedding

    plain = make_student(teacher).eval()
    emb = make_student(teacher).eval()
    emb.guidance_embedding = GuidanceEmbedding.for_net(emb.denoiser.net)
    x, s, y = torch.randn(2, 1, 8, 8) * 3, torch.tensor([3.0, 3.0]), torch.tensor([1, 8])
    with torch.no_grad():
        ref = plain(x, s, class_labels=y)
        for w in (0.0, 1.0, 4.0, torch.tensor([2.0, 7.0])):
            assert torch.equal(emb(x, s, class_labels=y, guidance_scale=w), ref)
        torch.nn.init.normal_(emb.guidance_embedding.mlp[-1].weight)
        a, b = (emb(x, s, class_labels=y, guidance_scale=w) for w in (1.0, 4.0))
    assert not torch.allclose(a, b, atol=1e-3)
    with pytest.raises(ValueError, match="no guidance embedding"):
        plain(x, s, class_labels=y, guidance_scale=2.0)


def test_student_for_a_range_of_w_trains_saves_and_loads(tmp_path, monkeypatch):
    """guidance.w_min/w_max: one w per sample drawn from the range reaches the guided teacher, the student and the
    target; the student's guidance embedding saves and loads through ConsistencyPipeline.from_pretrained with
    identical outputs for given labels and w; a w outside the range is refused in one line (pipeline and CLI)."""
    from click.testing import CliRunner

    import cmdistill.training.distill as T
    from cmdistill.cli import main
    from cmdistill.export.pipeline import ConsistencyPipeline, GuidanceEmbeddingModel
    from conftest import distill_digits, save_teacher

    teacher_dir = save_teacher(tmp_path / "teacher", cond_unet(seed=5))
    seen, orig = [], T.cd_loss

    def recording(student, target, teacher, *a, **k):
        seen.append((student, teacher, k.get("guidance_scale")))
        return orig(student, target, teacher, *a, **k)

    monkeypatch.setattr(T, "cd_loss", recording)
    run = distill_digits(tmp_path / "run", [f"teacher.path={teacher_dir}", "guidance.w_min=1", "guidance.w_max=5",
                                            "guidance.scale=2", "train.max_steps=3", "train.batch_size=8",
                                            "loss.distance=l2", "train.num_sample_images=4", "eval.at_end=false",
                                            "eval.curve=false"])
    assert len(seen) == 3
    for student, teacher, w in seen:
        assert isinstance(teacher, GuidedDenoiser) and student.guidance_embedding is not None
        assert w.shape == (8,) and 1 <= float(w.min()) and float(w.max()) <= 5 and len(set(w.tolist())) == 8
    assert not torch.equal(seen[0][2], seen[1][2])
    trained = seen[-1][0]
    assert trained.guidance_embedding.mlp[-1].weight.abs().sum() > 0  # it learned something

    pipe = ConsistencyPipeline.from_pretrained(run / "student")
    assert isinstance(pipe.guidance_embedding, GuidanceEmbeddingModel)
    fn = pipe.consistency_function
    assert fn.guidance_range == (1.0, 5.0) and fn.guidance_scale == 2.0

    def draw(p, w):
        return p(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                 class_labels=[1, 5, 9], guidance_scale=w).images

    pipe.save_pretrained(tmp_path / "again")
    again = ConsistencyPipeline.from_pretrained(tmp_path / "again")
    for w in (1.0, 3.5, 5.0):
        assert torch.equal(draw(pipe, w), draw(again, w))
    assert torch.equal(draw(pipe, None), draw(pipe, 2.0))  # the default w
    assert not torch.equal(draw(pipe, 1.0), draw(pipe, 5.0))
    with pytest.raises(ValueError, match=r"distilled for guidance scales in \[1, 5\]; it cannot sample at "
                                         r"guidance_scale=6"):
        draw(pipe, 6.0)
    res = CliRunner().invoke(main, ["sample", "--student", str(run), "--class-label", "3", "--guidance-scale", "4",
                                    "--num", "4", "--steps", "1"])
    assert res.exit_code == 0, res.output
    assert (run / "generated" / "student-1step-seed0-class3-w4" / "grid.png").is_file()
    res = CliRunner().invoke(main, ["sample", "--student", str(run), "--class-label", "3", "--guidance-scale", "9",
                                    "--num", "4"])
    assert res.exit_code == 2 and "guidance scales in [1, 5]" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_range_of_w_recipe_checks(tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from cmdistill.cli import main
    from conftest import REPO

    base = ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(tmp_path / "run"), "--set",
            f"teacher.path={tiny_teacher_dir}"]
    for sets, msg in ((["guidance.w_min=1"], "go together"),
                      (["guidance.w_min=3", "guidance.w_max=2"], "must be below"),
                      (["guidance.w_min=2", "guidance.w_max=4", "guidance.scale=1"], "must lie in"),
                      (["guidance.w_min=1", "guidance.w_max=4"], "is not conditional")):
        args = base + [a for s in sets for a in ("--set", s)]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and msg in res.stderr, (sets, res.output)
    assert not (tmp_path / "run").exists()


def test_run_batches_hands_each_batch_its_own_labels():
    from cmdistill.evaluation.generate import run_batches

    def fn(z, g, class_labels=None):  # an image filled with its label
        return class_labels.float().reshape(-1, 1, 1, 1).expand_as(z) / 10

    labels = torch.arange(23) % 10
    x, _ = run_batches(fn, torch.zeros(23, 1, 2, 2), torch.Generator(), 5, "cpu", "t", False,
                       {"class_labels": labels})
    assert torch.equal(x[:, 0, 0, 0], labels.float() / 10)


def test_evaluate_a_conditional_run(tmp_path, monkeypatch):
    """A class-conditional run is evaluated at its guidance scale: classes in turn, class accuracy for every sampler
    (a stub classifier that always answers 3 scores exactly 1/10 on balanced labels), DPM-Solver++ on the guided
    teacher, one column per class; --guidance-scale W writes report-wW.* and leaves the run's report alone."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    import cmdistill.evaluation.evaluate as E
    from cmdistill.cli import main
    from conftest import distill_digits, save_teacher

    class AlwaysThree(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    monkeypatch.setattr(E, "class_classifier", lambda run, search: AlwaysThree())
    teacher_dir = save_teacher(tmp_path / "teacher", cond_unet(seed=6))
    run = distill_digits(tmp_path / "run", [f"teacher.path={teacher_dir}", "guidance.w_min=1", "guidance.w_max=4",
                                            "guidance.scale=2", "train.max_steps=2", "train.batch_size=8",
                                            "loss.distance=l2", "train.num_sample_images=4", "eval.at_end=true",
                                            "eval.num_samples=20", "eval.batch_size=20", "eval.search_sigmas=false",
                                            "eval.curve=false", "eval.baselines=[dpm++2m]", "eval.baseline_nfe=[2]"])
    rep = json.loads((run / "report.json").read_text())
    assert rep["classes"] == 10 and rep["guidance_scale"] == 2.0
    assert {"teacher-ddim-50", "student-1", "student-4", "dpm++2m-2"} <= set(rep["samplers"])
    assert all(e["class_accuracy"] == pytest.approx(0.1) for e in rep["samplers"].values())
    assert "class accuracy" in (run / "report.md").read_text()
    assert Image.open(run / "side_by_side.png").size[0] > 10 * 8  # ten class columns
    before = (run / "report.json").read_bytes()
    res = CliRunner().invoke(main, ["evaluate", str(run), "--num", "10", "--guidance-scale", "3", "--no-lpips",
                                    "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "report-w3.json").read_text())["guidance_scale"] == 3.0
    assert (run / "side_by_side-w3.png").is_file() and (run / "report.json").read_bytes() == before
    res = CliRunner().invoke(main, ["evaluate", str(run), "--num", "10", "--guidance-scale", "7"])
    assert res.exit_code == 2 and "guidance scales in [1, 4]" in res.stderr


def test_sampling_an_unconditional_teacher_with_a_class_is_one_line(tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from cmdistill.cli import main

    res = CliRunner().invoke(main, ["sample", "--teacher", str(tiny_teacher_dir), "--class-label", "3", "-n", "2",
                                    "--steps", "2", "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "this one is unconditional" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
