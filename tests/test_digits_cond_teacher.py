"""The shipped class-conditional digits teacher (recipes/teachers/digits-cond, issue 14): a diffusers DDPMPipeline
folder under 10 MB with 11 class embeddings (row 10: the null class), and its guided 50-step DDIM samples are the
digits asked for: the shipped digits classifier assigns nearly all of them to the requested class, and guidance
raises that share over the conditional teacher alone."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEACHER = Path(__file__).resolve().parents[1] / "recipes" / "teachers" / "digits-cond"
N = 200


@pytest.fixture(scope="module")
def teacher():
    from cmdistill.teachers import load_teacher

    return load_teacher(str(TEACHER))


@pytest.fixture(scope="module")
def classifier():
    from cmdistill.evaluation.features import find_digits_classifier, load_classifier

    return load_classifier(find_digits_classifier())[0]


def accuracy_at(teacher, classifier, w: float) -> float:
    from cmdistill.core.guidance import guided_teacher
    from cmdistill.core.sampling import sample_ode, teacher_sigmas
    from cmdistill.evaluation.features import accuracy

    labels = torch.arange(N) % 10
    noise = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = sample_ode(guided_teacher(teacher, w), noise, teacher_sigmas(teacher, 50), "ddim", class_labels=labels)
    return accuracy(classifier, x.clamp(-1, 1), labels)


def test_folder_is_a_small_conditional_diffusers_pipeline():
    from diffusers import DDPMPipeline

    size = sum(p.stat().st_size for p in TEACHER.rglob("*") if p.is_file())
    assert size < 10 * 2**20
    pipe = DDPMPipeline.from_pretrained(str(TEACHER))
    assert pipe.unet.config.num_class_embeds == 11 and pipe.unet.config.sample_size == 8


def test_guided_samples_are_the_digits_asked_for(teacher, classifier):
    acc_cond, acc_guided = accuracy_at(teacher, classifier, 1.0), accuracy_at(teacher, classifier, 3.0)
    assert acc_cond >= 0.9 and acc_guided >= 0.97
    assert acc_guided >= acc_cond
