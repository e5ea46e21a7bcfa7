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


@pytest.fixture(scope="module")
def latent_run(latent_teacher):
    """A 2-step guided distillation of the tiny latent DiT (recipes/fashion-dit.yaml, tiny sizes)."""
    from conftest import _threads

    out = latent_teacher / "distill"
    args = ["distill", str(ROOT / "recipes" / "fashion-dit.yaml"), "-o", str(out)]
    for s in [f"teacher.path={latent_teacher / 'teacher'}", f"data.root={latent_teacher / 'data'}", "data.resolution=8",
              f"data.latent_cache={latent_teacher / 'cache2'}", "train.max_steps=2", "train.batch_size=4",
              "train.checkpoint_every=2", "train.sample_every=2", "train.num_sample_images=4", "student.sigma_max=5",
              "eval.at_end=false"]:
        args += ["--set", s]
    with _threads(1):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return out


def test_latent_student_carries_the_vae_and_decodes(latent_run, latent_teacher, tmp_path):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from cmdistill import ConsistencyPipeline

    student = latent_run / "student"
    index = json.loads((student / "model_index.json").read_text())
    assert index["transformer"][1] == "DiTTransformer2DModel" and index["vae"][1] == "AutoencoderKL"
    assert index["unet"] == [None, None] and (student / "vae" / "config.json").is_file()
    pipe = ConsistencyPipeline.from_pretrained(student)
    assert isinstance(pipe.transformer, DiTTransformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.image_shape == (1, 8, 8)
    def kw():
        return dict(batch_size=2, class_labels=[1, 7], guidance_scale=3.0, generator=torch.Generator().manual_seed(0))

    lat = pipe(output_type="latent", **kw()).images
    img = pipe(output_type="pt", **kw()).images
    assert lat.shape == (2, 4, 4, 4) and img.shape == (2, 1, 8, 8)
    from cmdistill.core.autoencoders import decode_latents

    torch.testing.assert_close(img, (decode_latents(pipe.vae, lat) / 2 + 0.5).clamp(0, 1))
    pipe.save_pretrained(tmp_path / "again")
    again = ConsistencyPipeline.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(again(output_type="pt", **kw()).images, img)
    grids = sorted((latent_run / "samples").glob("*.png"))
    from PIL import Image

    assert grids and Image.open(grids[-1]).size[0] > 8  # decoded 8x8 images, framed


def test_latent_student_refuses_lpips_on_latents(latent_teacher, tmp_path):
    res = CliRunner().invoke(main, ["distill", str(ROOT / "recipes" / "fashion-dit.yaml"), "-o", str(tmp_path / "r"),
                                    "--set", f"teacher.path={latent_teacher / 'teacher'}", "--set",
                                    f"data.root={latent_teacher / 'data'}", "--set", "data.resolution=8", "--set",
                                    "loss.distance=lpips", "--set", f"data.latent_cache={tmp_path / 'c'}"])
    assert res.exit_code == 2 and "loss.decode" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_evaluate_scores_decoded_pixels_with_a_reconstruction_floor(latent_run, tmp_path):
    """`cmdistill evaluate` on a latent run: every sampler's samples are decoded to pixels before the features (here
    the digits classifier's, which takes these tiny runs' 8x8 images), and the VAE-reconstruction floor is a row."""
    import shutil

    from conftest import _threads

    run = Path(shutil.copytree(latent_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "logs")))
    with _threads(1):
        res = CliRunner().invoke(main, ["evaluate", str(run), "--num", "16", "--batch-size", "16", "--feature-net",
                                        "digits", "--max-steps", "2", "--teacher-steps", "4", "--no-lpips"])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "report.json").read_text())
    vr, rr = report["vae_reconstruction"], report["real_vs_real"]
    assert (vr["num_a"], vr["num_b"]) == (rr["num_a"], rr["num_b"]) and vr["fid"] > 0 and vr["fid"] != rr["fid"]
    assert "VAE reconstructions vs real" in (run / "report.md").read_text()
    assert {"student-1", "student-2", "teacher-ddim-4"} <= set(report["samplers"])
    side = json.loads(json.dumps(report["samplers"]["student-1"]))
    assert side["fid"] > 0 and (run / "side_by_side.png").is_file()


def test_checkpoint_curve_of_a_latent_run_starts_from_the_latent_mean(latent_run, tmp_path):
    """`evaluate --checkpoints` on a latent run: the 1-step start is the mean of the cached latents (the exported
    student's, or recomputed from the cache when the run has no student/ yet), so both give the same scores."""
    import shutil

    from conftest import _threads

    def curve(run):
        with _threads(1):
            res = CliRunner().invoke(main, ["evaluate", str(run), "--checkpoints", "all", "--num", "8",
                                            "--batch-size", "8", "--feature-net", "digits"])
        assert res.exit_code == 0, res.output
        return json.loads((run / "curve.json").read_text())["checkpoints"]

    with_student = curve(Path(shutil.copytree(latent_run, tmp_path / "a", ignore=shutil.ignore_patterns("logs"))))
    bare = Path(shutil.copytree(latent_run, tmp_path / "b", ignore=shutil.ignore_patterns("logs", "student")))
    assert [c["step"] for c in with_student] == [2] and with_student == curve(bare)
