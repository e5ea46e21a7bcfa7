"""student.parametrization: the boundary holds exactly for each entry, each survives save -> from_pretrained with
identical outputs, the v head is the teacher's own denoiser for a v-prediction teacher (EDM and DDPM), and its factor
on the network's output stays bounded where the epsilon denoiser's grows like sigma."""
import pytest
import torch
from diffusers import DDPMScheduler

from cmdistill import ConsistencyPipeline
from cmdistill.core.consistency import make_student
from cmdistill.core.denoisers import DDPMDenoiser, EDMDenoiser
from cmdistill.core.parametrizations import PARAMETRIZATIONS
from conftest import tiny_unet

pytestmark = pytest.mark.usefixtures("single_thread")


def ddpm_teacher(prediction_type="epsilon", seed=3):
    cfg = dict(DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).config)
    return DDPMDenoiser(tiny_unet(seed=seed).eval().requires_grad_(False), cfg)


@pytest.mark.parametrize("param", sorted(PARAMETRIZATIONS))
@pytest.mark.parametrize("boundary", ["cm", "lcm"])
def test_boundary_condition_is_exact(param, boundary):
    f = make_student(ddpm_teacher(), boundary=boundary, parametrization=param)
    x = torch.randn(4, 1, 8, 8) * 3
    with torch.no_grad():
        assert torch.equal(f(x, torch.full((4,), f.sigma_min)), x)
        assert not torch.allclose(f(x, torch.full((4,), 1.0)), x)


@pytest.mark.parametrize("param", sorted(PARAMETRIZATIONS))
def test_save_load_round_trip_is_identical(param, tmp_path):
    f = make_student(ddpm_teacher(), parametrization=param, sigma_max=5.0).eval()
    pipe = ConsistencyPipeline.from_student(f, {2: [5.0, 0.8]})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "student")
    loaded = ConsistencyPipeline.from_pretrained(tmp_path / "student")
    assert loaded.consistency_config.config.consistency["parametrization"] == param
    assert loaded.consistency_function.parametrization == param
    for steps in (1, 2):
        kw = dict(batch_size=3, num_inference_steps=steps, output_type="latent")
        a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        b = loaded(generator=torch.Generator().manual_seed(0), **kw).images
        assert torch.equal(a, b)


def test_parametrizations_differ_for_an_epsilon_teacher():
    teacher = ddpm_teacher()
    x, s = torch.randn(2, 1, 8, 8) * 5, torch.tensor([5.0, 5.0])
    with torch.no_grad():
        d = make_student(teacher, parametrization="denoiser")(x, s)
        v = make_student(teacher, parametrization="v")(x, s)
    assert not torch.allclose(d, v, atol=1e-2)


@pytest.mark.parametrize("make", [
    lambda: ddpm_teacher("v_prediction"),
    lambda: EDMDenoiser(tiny_unet(seed=4).eval().requires_grad_(False),
                        {"sigma_min": 0.002, "sigma_max": 80.0, "prediction_type": "v_prediction"}),
])
def test_v_head_of_a_v_prediction_teacher_is_its_denoiser(make):
    teacher = make()
    x, s = torch.randn(3, 1, 8, 8) * 4, torch.tensor([0.05, 1.0, 40.0])
    with torch.no_grad():
        ref = teacher(x, s)
        got = PARAMETRIZATIONS["v"](teacher, x, s)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_v_head_bounds_the_factor_on_the_network_output():
    """A unit change of the network's output moves F by sigma (epsilon denoiser) but by at most 1 (v head)."""
    teacher = ddpm_teacher()
    net = teacher.net
    x, s = torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 150.0])
    with torch.no_grad():
        base = {k: fn(teacher, x, s) for k, fn in PARAMETRIZATIONS.items()}
        bias = net.conv_out.bias
        bias.add_(1.0)
        moved = {k: (fn(teacher, x, s) - base[k]).abs().amax(dim=(1, 2, 3)) for k, fn in PARAMETRIZATIONS.items()}
        bias.sub_(1.0)
    torch.testing.assert_close(moved["denoiser"], s, rtol=1e-4, atol=1e-4)
    expected = s / (s**2 + 1).sqrt()
    torch.testing.assert_close(moved["v"], expected, rtol=1e-4, atol=1e-4)
    assert float(moved["v"].max()) <= 1.0
