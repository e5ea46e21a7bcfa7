"""Boundary condition, target updates, shared dropout masks, and the CD loss on toy denoisers."""

import pytest
import torch

from cmdistill.core.consistency import ConsistencyFunction, make_student, make_target
from cmdistill.core.denoisers import DDPMDenoiser
from cmdistill.core.cd_step import cd_loss
from cmdistill.core.consistency import update_target
from cmdistill.core.rng import replay_rng, rng_state
from cmdistill.training.ema import make_eval_ema
from cmdistill.core.losses import get_weighting, make_distance
from conftest import tiny_unet


def ddpm_teacher(dropout=0.0):
    return DDPMDenoiser(tiny_unet(dropout=dropout).eval().requires_grad_(False), {"beta_schedule": "linear"})


@pytest.mark.parametrize("boundary", ["cm", "lcm"])
def test_boundary_condition_is_exact(boundary):
    student = make_student(ddpm_teacher(), boundary=boundary)
    x = torch.randn(4, 1, 8, 8) * 3
    out = student(x, torch.full((4,), student.sigma_min))
    assert torch.equal(out, x)
    # and away from sigma_min the network matters
    assert not torch.allclose(student(x, torch.full((4,), 1.0)), x)


def test_boundary_scalings_values():
    f = ConsistencyFunction(ddpm_teacher(), boundary="cm", sigma_data=0.5)
    s = torch.tensor([f.sigma_min, 1.0, 100.0])
    c_skip, c_out = f.scalings(s)
    assert torch.allclose(c_skip[1], torch.tensor(0.25 / ((1 - f.sigma_min) ** 2 + 0.25)))
    assert torch.allclose(c_out[2], torch.tensor((100 - f.sigma_min) * 0.5 / (100**2 + 0.25) ** 0.5))
    lcm = ConsistencyFunction(ddpm_teacher(), boundary="lcm")
    c_skip, c_out = lcm.scalings(torch.tensor([1.0]))
    assert c_skip.item() < 1e-4 and abs(c_out.item() - 1) < 1e-4  # the student starts as the teacher's D


def test_student_is_a_copy_and_teacher_untouched():
    teacher = ddpm_teacher()
    student = make_student(teacher, boundary="lcm")
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 5.0])
    with torch.no_grad():
        assert torch.allclose(student(x, s), teacher(x, s), atol=1e-3)
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_target_mu_zero_equals_student_and_mu_interpolates():
    student = make_student(ddpm_teacher())
    target = make_target(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    update_target(target, student, 0.0)
    for t, s in zip(target.parameters(), student.parameters()):
        assert torch.equal(t, s)
    target2 = make_target(student)
    with torch.no_grad():
        for p, b in zip(target2.parameters(), before):
            p.copy_(b)
    update_target(target2, student, 0.9)
    for t, b, s in zip(target2.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    assert all(not p.requires_grad for p in target.parameters())


def test_shared_dropout_mask_between_online_and_target():
    student = make_student(ddpm_teacher(dropout=0.5)).train()
    target = make_target(student).train()
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 3.0])
    state = rng_state(x.device)
    a = student(x, s)
    with torch.no_grad(), replay_rng(state, x.device):
        b = target(x, s)
    assert torch.allclose(a, b, atol=1e-6)
    c = target(x, s)  # a fresh mask differs
    assert not torch.allclose(a, c, atol=1e-3)


def test_cd_loss_zero_when_teacher_is_exact_and_student_is_consistent():
    """If the teacher's ODE step is exact and f is the true consistency function, the CD loss vanishes.
    For Gaussian data N(0, s0^2) the consistency function is x * s0 / sqrt(s0^2 + sigma^2) ... at sigma_min."""
    s0 = 0.5

    class GaussD(torch.nn.Module):
        sigma_min, sigma_max, sigma_data = 0.01, 80.0, s0

        def forward(self, x, sigma):
            return s0**2 / (s0**2 + sigma[:, None, None, None] ** 2) * x

    class ExactF(torch.nn.Module):
        sigma_min, sigma_max = 0.01, 80.0

        def forward(self, x, sigma):  # map x(sigma) along the exact ODE to sigma_min
            return x * ((s0**2 + 0.01**2) / (s0**2 + sigma[:, None, None, None] ** 2)) ** 0.5

    x0 = torch.randn(16, 1, 4, 4) * s0
    hi, lo = torch.full((16,), 2.0), torch.full((16,), 1.9)
    out = cd_loss(ExactF(), ExactF(), GaussD(), x0, hi, lo, make_distance("l2"), get_weighting("uniform"), "heun")
    assert out.loss.item() < 1e-8
    wrong = cd_loss(ExactF(), ExactF(), GaussD(), x0, hi, lo, make_distance("l2"), get_weighting("uniform"),
                    "euler")
    assert wrong.loss.item() > 10 * out.loss.item()


def test_cd_loss_backprop_only_into_student():
    teacher = ddpm_teacher()
    student = make_student(teacher)
    target = make_target(student)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    out = cd_loss(student, target, teacher, x0, torch.full((4,), 3.0), torch.full((4,), 2.0),
                  make_distance("pseudo_huber"), get_weighting("inv_delta"), "heun", substeps=2)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_eval_ema_tracks_student():
    student = make_student(ddpm_teacher())
    ema = make_eval_ema(student, beta=0.5, power=1.0)
    ema.update()  # first call copies
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for _ in range(50):
        ema.update()
    p_s, p_e = next(student.parameters()), next(ema.ema_model.parameters())
    assert torch.allclose(p_s, p_e, atol=1e-2)


def test_effective_ema_decay_is_what_ema_pytorch_applies():
    """Issue 13: the header's 'decay at the last step' is ema-pytorch's own warm-up value (0.9932 for the digits
    recipe's 1800 steps at beta 0.999, not 0.999)."""
    from cmdistill.training.ema import effective_decay, make_eval_ema

    ema = make_eval_ema(torch.nn.Linear(2, 2), beta=0.999, update_after_step=5)
    for step in range(1, 301):
        ema.update()
        if step in (1, 5, 6, 7, 50, 300):
            assert abs(effective_decay(0.999, step, 2 / 3, 5) - float(ema.get_current_decay())) < 1e-6, step
    assert abs(effective_decay(0.999, 1800) - 0.99324) < 1e-5
