"""The lean training step: speed options change how the U-Nets run, never the numbers or the saved files.

(``train.compile`` is exercised by benchmarks/bench_step.py only: compiling even the tiny U-Net takes minutes on
CPU. Timings belong in benchmarks, not here.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from cmdistill.commands import load_recipe
from cmdistill.core.consistency import make_student, make_target
from cmdistill.core.denoisers import build_denoiser
from cmdistill.core.cd_step import cd_loss
from cmdistill.core.consistency import update_target
from cmdistill.training.ema import make_eval_ema
from cmdistill.core.losses import get_weighting, make_distance
from cmdistill.core.solvers import heun_step
from cmdistill.training.speed import configure_networks
from cmdistill.core.tensors import skip_sync_checks, sync_checks_enabled

from conftest import tiny_unet


def _teacher(dropout: float = 0.0):
    net = tiny_unet(dropout=dropout).eval().requires_grad_(False)
    return build_denoiser(net, dict(DDPMScheduler(num_train_timesteps=1000).config))


def _step(teacher, **options):
    """One CD loss + backward with fresh student/target; returns the loss, student output and gradients."""
    torch.manual_seed(0)
    student = make_student(teacher)
    target = make_target(student)
    configure_networks(teacher, student, target, **options)
    torch.manual_seed(1)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    s_hi, s_lo = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.3, 0.05]), torch.tensor([40.0, 10.0, 2.0, 0.5, 0.1, 0.02])
    with skip_sync_checks():
        out = cd_loss(student, target, teacher, x0, s_hi, s_lo, make_distance("l2"), get_weighting("uniform"))
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in student.parameters()], student, torch.rand(1)


def test_gradient_checkpointing_recomputes_with_the_same_dropout_masks():
    teacher = _teacher(dropout=0.2)
    loss, grads, _, rng_after = _step(teacher)
    loss_ck, grads_ck, student, rng_after_ck = _step(teacher, gradient_checkpointing=True)
    assert student.denoiser.net.is_gradient_checkpointing
    assert torch.equal(loss, loss_ck)
    for g, g_ck in zip(grads, grads_ck):
        torch.testing.assert_close(g, g_ck, rtol=0, atol=1e-7)
    assert torch.equal(rng_after, rng_after_ck)  # recomputation does not advance the training RNG


def test_channels_last_same_numbers_and_checkpointable_weights(tmp_path):
    from safetensors.torch import load_model, save_model

    teacher = _teacher()
    loss, grads, _, _ = _step(teacher)
    loss_cl, grads_cl, student, _ = _step(teacher, channels_last=True)
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-6)
    for g, g_cl in zip(grads, grads_cl):
        torch.testing.assert_close(g_cl, g, rtol=1e-4, atol=1e-6)
    assert all(p.is_contiguous() for p in student.parameters())  # safetensors refuses anything else
    save_model(student, str(tmp_path / "s.safetensors"))
    load_model(make_student(teacher), str(tmp_path / "s.safetensors"))


def test_sync_checks_are_on_by_default_and_skippable():
    teacher = _teacher()
    x = torch.randn(2, 1, 8, 8)
    assert sync_checks_enabled()
    with pytest.raises(ValueError, match="outside the teacher's trained range"):
        teacher(x, torch.tensor([1e3, 1.0]))
    with skip_sync_checks():
        assert not sync_checks_enabled()
        teacher(x, torch.tensor([1e3, 1.0]))  # the training step's sigmas were checked once, up front
    assert sync_checks_enabled()
    hi, lo = torch.tensor([10.0, 3.0]), torch.tensor([5.0, 1.0])
    with torch.no_grad():
        checked = heun_step(teacher, x, hi, lo)
        with skip_sync_checks():
            unchecked = heun_step(teacher, x, hi, lo)
    assert torch.equal(checked, unchecked)


def test_eval_ema_counters_stay_on_cpu():
    model = torch.nn.Linear(3, 3)
    ema = make_eval_ema(model, beta=0.9, power=1.0).to("meta")
    assert ema.step.device.type == ema.initted.device.type == "cpu"  # EMA.update() reads them with .item()
    assert ema.ema_model.weight.device.type == "meta"
    ema = make_eval_ema(model, beta=0.9, power=1.0).to(torch.float64)
    model.double()
    for _ in range(3):
        ema.update()
    assert int(ema.step) == 3 and bool(ema.initted)
    fresh = make_eval_ema(model, beta=0.9, power=1.0)
    fresh.load_state_dict(ema.state_dict())
    assert int(fresh.step) == 3
    assert list(fresh.state_dict()) == ["initted", "step", "ema_model.weight", "ema_model.bias"]  # as ema-pytorch


def test_update_target_copies_parameters_and_buffers():
    teacher = _teacher()
    student = make_student(teacher)
    target = make_target(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        for b in student.buffers():
            b.mul_(2)
    update_target(target, student, 0.0)
    for a, b in zip(target.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(target.buffers(), student.buffers()):
        assert torch.equal(a, b)


def test_speed_recipe_keys():
    r = load_recipe(None, ["train.channels_last=true", "train.compile=true", "train.gradient_checkpointing=true"])
    assert r.train.channels_last and r.train.compile and r.train.gradient_checkpointing
    d = load_recipe(None)
    assert not (d.train.channels_last or d.train.compile or d.train.gradient_checkpointing)


def test_distill_runs_with_channels_last_and_gradient_checkpointing(tiny_teacher_dir, tmp_path):
    from cmdistill.commands import distill

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml", [
        f"teacher.path={tiny_teacher_dir}", "train.max_steps=3", "train.batch_size=8", "train.checkpoint_every=2",
        "train.sample_every=100", "train.log_every=1", "train.num_sample_images=4", "train.channels_last=true",
        "train.gradient_checkpointing=true"])
    student_dir = distill(recipe, output_dir=str(tmp_path / "run"))
    assert (student_dir / "model_index.json").exists()
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) >= 1
