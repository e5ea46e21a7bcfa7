"""The shipped digits teacher (recipes/teachers/digits): it loads through diffusers and through cmdistill, and
its 50-step DDIM samples are digits: the shipped digits classifier recognises them confidently, every class
appears, and their pixel statistics match the data's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEACHER = Path(__file__).resolve().parents[1] / "recipes" / "teachers" / "digits"
N = 300


@pytest.fixture(scope="module")
def teacher():
    from cmdistill.teachers import load_teacher

    return load_teacher(str(TEACHER))


@pytest.fixture(scope="module")
def samples(teacher):
    """``N`` deterministic 50-step DDIM samples in [-1, 1], through the package's own sampler."""
    from cmdistill.core.sampling import sample_ode, teacher_sigmas

    noise = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return sample_ode(teacher, noise, teacher_sigmas(teacher, 50), "ddim").clamp(-1, 1)


@pytest.fixture(scope="module")
def data():
    from cmdistill.data import digits_dataset

    return digits_dataset("").tensors[0]


@pytest.fixture(scope="module")
def classifier():
    from cmdistill.evaluation.features import find_digits_classifier, load_classifier

    folder = find_digits_classifier([TEACHER / "classifier"])
    assert folder is not None, "the digits classifier is not shipped"
    return load_classifier(folder)[0]


def test_ships_small_safetensors_in_the_ddpm_pipeline_layout():
    weights = TEACHER / "unet" / "diffusion_pytorch_model.safetensors"
    assert (TEACHER / "model_index.json").is_file() and (TEACHER / "scheduler" / "scheduler_config.json").is_file()
    assert weights.is_file() and weights.stat().st_size < 10 * 2**20
    assert not list(TEACHER.rglob("*.bin")) and not list(TEACHER.rglob("*.pt"))


def test_loads_in_diffusers_and_samples():
    from diffusers import DDPMPipeline, UNet2DModel

    pipe = DDPMPipeline.from_pretrained(TEACHER)
    assert isinstance(pipe.unet, UNet2DModel)
    assert (pipe.unet.config.sample_size, pipe.unet.config.in_channels) == (8, 1)
    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (1000, "linear", "epsilon")
    img = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (2, 8, 8, 1) and 0 <= img.min() and img.max() <= 1


def test_loads_as_a_ddpm_denoiser(teacher):
    from cmdistill.core.denoisers import DDPMDenoiser

    assert isinstance(teacher, DDPMDenoiser)
    assert teacher.sigma_min == pytest.approx(0.0100, rel=1e-2)
    assert teacher.sigma_max == pytest.approx(157.4, rel=1e-3)


def test_ddim_samples_are_recognised_as_digits(samples, classifier, data):
    from cmdistill.data import digits_labels

    with torch.no_grad():
        p = classifier(samples).softmax(1)
        p_real = classifier(data).softmax(1)
    conf, label = p.max(1)
    assert conf.mean() > 0.85, f"mean classifier confidence {conf.mean():.3f} (chance: 0.1)"
    assert conf.mean() > p_real.max(1).values.mean() - 0.1
    counts = torch.bincount(label, minlength=10).float() / N
    assert counts.min() > 0.03 and counts.max() < 0.2, f"class frequencies {counts.tolist()}"
    assert (p_real.argmax(1) == digits_labels()).float().mean() > 0.95  # the judge itself is sound


def test_pixel_statistics_match_the_data(samples, data):
    assert float(samples.mean()) == pytest.approx(float(data.mean()), abs=0.05)
    assert float(samples.std()) == pytest.approx(float(data.std()), abs=0.05)
    # the per-pixel mean image (where the strokes are) matches
    assert float((samples.mean(0) - data.mean(0)).abs().max()) < 0.25
    # background: the share of nearly-blank pixels matches
    blank, blank_real = float((samples < -0.9).float().mean()), float((data < -0.9).float().mean())
    assert blank == pytest.approx(blank_real, abs=0.07)
