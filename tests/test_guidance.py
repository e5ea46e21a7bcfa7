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
