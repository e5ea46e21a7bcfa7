"""Teacher adapters: sigma tables vs diffusers, true x0 from true eps/v/sample, fractional t, loading."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from cmdistill.core.denoisers import DDPMDenoiser, EDMDenoiser
from cmdistill.teachers import TeacherLoadError, load_teacher
from cmdistill.core.schedules import ddpm_betas, vp_sigmas_from_betas
from conftest import save_teacher, tiny_unet


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()),
])
def test_sigma_table_matches_diffusers(kw):
    sched = DDPMScheduler(num_train_timesteps=1000, **kw)
    ref = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    ours = vp_sigmas_from_betas(ddpm_betas(1000, sched.config.beta_start, sched.config.beta_end,
                                           sched.config.beta_schedule, sched.config.trained_betas))
    assert torch.allclose(ours, ref, rtol=1e-5)


def test_cifar_range():
    table = vp_sigmas_from_betas(ddpm_betas(1000, 1e-4, 0.02, "linear"))
    assert abs(table[0].item() - 0.0100) < 1e-4 and abs(table[-1].item() - 157.4) < 0.1


class Oracle(nn.Module):
    """A 'network' that returns the true eps / v / x0 for known (x0, eps), in VP variables."""

    def __init__(self, x0, eps, table, kind):
        super().__init__()
        self.x0, self.eps, self.table, self.kind = x0, eps, table, kind
        self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.seen_t = None

    def forward(self, x_in, t):
        self.seen_t = t
        s = torch.exp(torch.lerp(self.table.log()[t.floor().long()], self.table.log()[t.ceil().long()],
                                 (t - t.floor()).double()))[:, None, None, None]
        a, b = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
        assert torch.allclose(x_in, a * self.x0 + b * self.eps, atol=1e-9)  # the VP input
        if self.kind == "epsilon":
            return self.eps
        if self.kind == "v_prediction":
            return a * self.eps - b * self.x0
        return self.x0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_adapter_returns_true_x0(kind):
    torch.manual_seed(0)
    x0, eps = torch.rand(5, 3, 4, 4).double() * 2 - 1, torch.randn(5, 3, 4, 4).double()
    cfg = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": kind}
    table = vp_sigmas_from_betas(ddpm_betas(1000, 1e-4, 0.02))
    den = DDPMDenoiser(Oracle(x0, eps, table, kind), cfg)
    sigma = torch.tensor([0.0101, 0.3, 1.0, 20.0, 157.0], dtype=torch.float64)  # fractional timesteps
    x = x0 + sigma[:, None, None, None] * eps
    assert torch.allclose(den(x, sigma), x0, atol=1e-9)
    # fp32 path: error grows like sigma * eps * 1e-7
    assert torch.allclose(den(x.float(), sigma.float()).double(), x0, atol=1e-3)


def test_sigma_to_t_exact_on_table_and_range_check():
    table = vp_sigmas_from_betas(ddpm_betas(1000))
    den = DDPMDenoiser(nn.Identity(), {})
    t = den.sigma_to_t(table[[0, 1, 500, 980, 999]].float())
    assert torch.allclose(t, torch.tensor([0.0, 1.0, 500.0, 980.0, 999.0]), atol=1e-3)
    with pytest.raises(ValueError, match="outside the teacher's trained range"):
        den(torch.zeros(1, 1, 2, 2), torch.tensor([200.0]))
    with pytest.raises(ValueError, match="outside"):
        den(torch.zeros(1, 1, 2, 2), torch.tensor([0.001]))


def test_edm_adapter_matches_diffusers_preconditioning():
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler()
    net = tiny_unet(channels=1)
    den = EDMDenoiser(net, dict(sched.config))
    x, sigma = torch.randn(2, 1, 8, 8) * 3, torch.tensor([2.0, 2.0])
    with torch.no_grad():
        inp = sched.precondition_inputs(x, sigma[0])
        out = net(inp, sched.precondition_noise(sigma[0]).expand(2)).sample
        ref = sched.precondition_outputs(x, out, sigma[0])
        assert torch.allclose(den(x, sigma), ref, atol=1e-5)
    assert den.sigma_min == 0.002 and den.sigma_max == 80.0


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_load_both_layouts(tmp_path, layout):
    folder = save_teacher(tmp_path / layout, tiny_unet(), layout=layout, prediction_type="v_prediction")
    den = load_teacher(str(folder))
    assert isinstance(den, DDPMDenoiser) and den.prediction_type == "v_prediction"
    assert math.isclose(den.sigma_max, 157.4, rel_tol=1e-3)
    x = torch.randn(2, 1, 8, 8)
    assert den(x, torch.tensor([1.0, 2.0])).shape == x.shape


def test_old_style_flat_config(tmp_path):
    """google/ddpm-cifar10-32's root scheduler_config.json predates num_train_timesteps."""
    import json

    folder = save_teacher(tmp_path / "old", tiny_unet(), layout="flat")
    (folder / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
        "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_large"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))  # but no unet/
    den = load_teacher(str(folder))
    assert isinstance(den, DDPMDenoiser) and len(den.sigma_table) == 1000
    assert abs(den.sigma_max - 157.4) < 0.1


def test_load_errors(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="config.json"):
        load_teacher(str(tmp_path / "empty"))
    with pytest.raises(TeacherLoadError, match="cannot download teacher 'org/no-such-model'"):
        load_teacher("org/no-such-model")  # HF_HUB_OFFLINE=1 in the tests
