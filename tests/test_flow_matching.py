"""Flow-matching teachers (rectified flow, FlowMatchEulerDiscreteScheduler) through the one contract D(x, sigma):
the adapter's sampling equals diffusers' own FlowMatchEuler loop on a tiny random model from the same noise."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cmdistill.core.denoisers import FlowMatchDenoiser, UnsupportedTeacher, build_denoiser, flow_shift
from cmdistill.core.sampling import sample_ode, teacher_sigmas
from conftest import tiny_unet


def diffusers_loop(net, sched, z):
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(net(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_sampling_equals_diffusers_flow_match_euler(shift, solver):
    net = tiny_unet(sample_size=8, channels=2, seed=3).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = [0.95, 0.8, 0.6, 0.4, 0.2, 0.05]  # the scheduler shifts these
    sched.set_timesteps(sigmas=u)
    den = build_denoiser(net, {"_class_name": type(sched).__name__, **sched.config})
    assert isinstance(den, FlowMatchDenoiser)
    t = flow_shift(torch.tensor(u, dtype=torch.float64), shift)
    sigmas = torch.cat([t / (1 - t), torch.zeros(1, dtype=torch.float64)])
    z = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = diffusers_loop(net, sched, z)
        ours = sample_ode(den, z, sigmas, solver)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours.float(), ref, rtol=1e-4, atol=1e-4)


def test_velocity_is_read_as_x0_and_range_is_the_trained_one():
    """With an oracle velocity ``v = z - x0`` the adapter returns ``x0`` exactly, at every sigma of its range."""
    x0, z = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t):
            return z - x0  # the true velocity of this (x0, z) pair, whatever t

    den = FlowMatchDenoiser(Oracle(), {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    for sigma in (den.sigma_min, 0.5, 7.0, den.sigma_max):
        t = sigma / (1 + sigma)
        x = ((1 - t) * x0 + t * z) / (1 - t)  # EDM's x = x0 + sigma z
        torch.testing.assert_close(den(x, torch.full((4,), sigma)), x0, rtol=1e-5, atol=1e-5)
    t_lo, t_hi = 3 * 0.001 / (1 + 2 * 0.001), 3 * 0.999 / (1 + 2 * 0.999)
    assert den.sigma_min == pytest.approx(t_lo / (1 - t_lo)) and den.sigma_max == pytest.approx(t_hi / (1 - t_hi))
    assert den.prior_std(4.0) == 5.0  # the sampler's start x_t = z is (1 + sigma) z in EDM space


def test_default_grid_is_diffusers_with_a_finite_start():
    net = tiny_unet(sample_size=8, channels=1, seed=0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    den = build_denoiser(net, {"_class_name": type(sched).__name__, **sched.config})
    sig = teacher_sigmas(den, 10)
    t = sig / (1 + sig)
    assert len(sig) == 11 and sig[-1] == 0 and torch.isfinite(sig).all()
    torch.testing.assert_close(t[1:].float(), sched.sigmas[1:].float(), rtol=1e-5, atol=1e-6)
    assert sched.sigmas[0] == 1.0 and float(t[0]) == pytest.approx(den.t_max)


def test_inverted_flow_is_refused():
    with pytest.raises(UnsupportedTeacher, match="invert_sigmas"):
        build_denoiser(tiny_unet(), {"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True})
