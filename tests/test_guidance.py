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
    g = GuidedDenoiser(teacher, null_class=10, guidance_scale=3.0)
    x, s, y = torch.randn(4, 1, 8, 8), torch.tensor([0.5, 2.0, 10.0, 80.0]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        dc, du = teacher(x, s, class_labels=y), teacher(x, s, class_labels=torch.full_like(y, 10))
        out = g(x, s, class_labels=y)
    torch.testing.assert_close(out, du + 3.0 * (dc - du), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, dc, atol=1e-4)


def test_scale_one_is_the_conditional_teacher_and_scales_go_per_sample(teacher):
    # different batch compositions (6 vs 3 vs 2 rows) round float32 convolutions differently: 1e-4
    g = GuidedDenoiser(teacher, null_class=10)
    x, s, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 5.0, 20.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(g(x, s, class_labels=y), teacher(x, s, class_labels=y), rtol=1e-4, atol=1e-4)
        per = g(x, s, class_labels=y, guidance_scale=torch.tensor([1.0, 2.0, 5.0]))
        for i, w in enumerate((1.0, 2.0, 5.0)):
            one = g(x[i:i + 1], s[i:i + 1], class_labels=y[i:i + 1], guidance_scale=w)
            torch.testing.assert_close(per[i:i + 1], one, rtol=1e-4, atol=1e-4)


def test_solvers_run_on_the_guided_teacher(teacher):
    from cmdistill.core.solvers import solve

    g = GuidedDenoiser(teacher, null_class=10, guidance_scale=2.0)
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
    assert all(isinstance(t, GuidedDenoiser) and t.guidance_scale == 3.0 and t.null_class == 10 and y is not None
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
    assert res.exit_code == 2 and "is not class-conditional" in res.stderr
    assert not (tmp_path / "run").exists()
