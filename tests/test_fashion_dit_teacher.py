"""The shipped latent teacher (recipes/teachers/fashion-dit): a DiTPipeline that diffusers' own DiTPipeline loads and
samples with guidance, whose samples through cmdistill's adapter the shipped Fashion-MNIST classifier recognises."""
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "recipes" / "teachers" / "fashion-dit"


def test_layout_and_size():
    index = json.loads((TEACHER / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["transformer"][1] == "DiTTransformer2DModel" and index["vae"][1] == "AutoencoderKL"
    size = sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file())
    assert size < 20e6


def test_diffusers_dit_pipeline_samples_it():
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(TEACHER)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=10, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()
    assert images[:, 2:30, 2:30].std() > 0.1  # not blank


def test_cmdistill_samples_of_each_class_are_recognised():
    """20 guided DDIM-20 samples (2 per class) through cmdistill's adapter and the teacher's autoencoder: the shipped
    classifier assigns most to the class asked for (a random teacher scores 0.1)."""
    from cmdistill.core.autoencoders import decode_latents
    from cmdistill.core.guidance import guided_teacher
    from cmdistill.core.sampling import sample_ode, teacher_sigmas
    from cmdistill.evaluation.features import accuracy, find_classifier, load_classifier
    from cmdistill.latents import load_teacher_vae
    from cmdistill.teachers import load_teacher

    den = guided_teacher(load_teacher(str(TEACHER)), 2.0)
    vae = load_teacher_vae(str(TEACHER))
    labels = torch.arange(20) % 10
    z = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = decode_latents(vae, sample_ode(den, z, teacher_sigmas(den, 20), "ddim", class_labels=labels))
    clf = load_classifier(find_classifier("fashion_mnist"))[0]
    assert accuracy(clf, x.clamp(-1, 1), labels) >= 0.8
