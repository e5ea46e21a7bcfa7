"""Latent teachers end to end on tiny Fashion-MNIST IDX files made here: train-teacher makes an AutoencoderKL, then a
class-conditional DiT on its cached latents, exported as a DiTPipeline that diffusers loads and samples; the latent
cache is verified and reused; distillation runs on latents and the student pipeline decodes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from test_fashion_mnist import write_fashion

ROOT = Path(__file__).resolve().parents[1]

VAE = ["--set", "autoencoder.sample_size=8", "--set", "autoencoder.block_out_channels=[8,16]", "--set",
       "autoencoder.norm_num_groups=4", "--set", "data.resolution=8", "--set", "train.batch_size=4", "--set",
       "train.max_steps=3", "--set", "train.sample_every=3", "--set", "train.num_sample_images=4", "--set",
       "train.checkpoint_every=3"]
DIT = ["--set", "transformer.sample_size=4", "--set", "transformer.num_layers=1", "--set",
       "transformer.num_attention_heads=2", "--set", "transformer.attention_head_dim=8", "--set",
       "data.resolution=8", "--set", "train.batch_size=4", "--set", "train.max_steps=3", "--set",
       "train.sample_every=3", "--set", "train.num_sample_images=4", "--set", "train.sample_steps=2", "--set",
       "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def latent_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent")
    write_fashion(tmp / "data", n=16)
    common = ["--set", f"data.root={tmp / 'data'}", "--set", f"data.latent_cache={tmp / 'cache'}"]
    r = CliRunner().invoke(main, ["train-teacher", str(ROOT / "recipes" / "fashion-vae.yaml"), *VAE, *common,
                                  "--set", f"train.export_dir={tmp / 'vae'}", "--output-dir", str(tmp / "vae-run")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train-teacher", str(ROOT / "recipes" / "fashion-dit-teacher.yaml"), *DIT, *common,
                                  "--set", f"latent.vae={tmp / 'vae'}", "--set", f"train.export_dir={tmp / 'teacher'}",
                                  "--output-dir", str(tmp / "dit-run")])
    assert r.exit_code == 0, r.output
    return tmp


def test_autoencoder_export_has_unit_variance_scaling(latent_teacher):
    cfg = json.loads((latent_teacher / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] != 1.0
    from cmdistill.core.autoencoders import encode_latents
    from cmdistill.data import make_dataset
    from cmdistill.latents import load_vae

    vae = load_vae(latent_teacher / "vae")
    x = make_dataset("fashion_mnist", str(latent_teacher / "data"), 8, 1).tensors[0]
    z = encode_latents(vae, x)
    assert z.shape == (16, 4, 4, 4)
    # scaling_factor was measured on these images' posterior means: unit std
    assert abs(float(z.std()) - 1.0) < 1e-3


def test_dit_teacher_is_a_dit_pipeline_diffusers_samples(latent_teacher):
    from diffusers import DiTPipeline

    folder = latent_teacher / "teacher"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["scheduler"][1] == "DDIMScheduler"
    pipe = DiTPipeline.from_pretrained(folder)
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    images = pipe(class_labels=[7, 2], guidance_scale=4.0, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_latent_cache_is_verified_and_reused(latent_teacher):
    from cmdistill.data import make_dataset
    from cmdistill.latents import LatentCacheError, latent_dataset

    caches = list((latent_teacher / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "manifest.json").is_file()
    ds = make_dataset("fashion_mnist", str(latent_teacher / "data"), 8, 1)
    said = []
    lat, folder = latent_dataset(ds, latent_teacher / "vae", latent_teacher / "cache", echo=said.append)
    assert folder == caches[0] and said == [] and lat.tensors[0].shape == (16, 4, 4, 4)  # read, not re-encoded
    other = make_dataset("fashion_mnist", str(latent_teacher / "data"), 8, 1)
    other.tensors[0][0, 0, 0, 0] += 0.5  # other data: another cache folder
    _, folder2 = latent_dataset(other, latent_teacher / "vae", latent_teacher / "cache", echo=said.append)
    assert folder2 != folder and len(said) == 1
    data = folder / "latents.safetensors"
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(LatentCacheError, match="damaged"):
        latent_dataset(ds, latent_teacher / "vae", latent_teacher / "cache")
