"""The 50-step DDIM teacher sampler reproduces diffusers' DDIMScheduler loop (eta = 0)."""
import pytest
import torch
from diffusers import DDIMScheduler

from cmdistill.core.denoisers import DDPMDenoiser
from cmdistill.core.sampling import sample_ode, teacher_sigmas
from conftest import tiny_unet


@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="linear", prediction_type="epsilon"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
         timestep_spacing="trailing"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddim50_matches_diffusers(cfg, dtype):
    """A random network's eps is inconsistent with x, so both loops end at |x| ~ 10^2-10^3: in float32 that
    is at the edge of 1e-4 absolute, so float32 is held to 1e-4 relative to the output scale and float64 to
    1e-4 absolute (the float32 noise table is shared, its square roots are not)."""
    unet = tiny_unet(sample_size=8, channels=3, seed=1).eval().to(dtype)
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, **cfg)
    sched.set_timesteps(50)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        x = noise.clone()
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        den = DDPMDenoiser(unet, dict(sched.config))
        sig = teacher_sigmas(den, 50, spacing=None)  # None: the scheduler's own timestep_spacing
        ours = sample_ode(den, noise, sig, "ddim")
    assert len(sig) == 51 and sig[-1] == 0
    assert ours.dtype == dtype
    err = (ours - x).abs().max().item()
    scale = 1.0 if dtype == torch.float64 else x.abs().max().item()
    assert err <= 1e-4 * scale, (err, scale)
