"""`cmdistill train-teacher`: a few steps of a tiny U-Net write a DDPMPipeline folder that diffusers and
cmdistill both load; resuming repeats an uninterrupted run; recipe errors name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.config import ConfigError
from cmdistill.commands import load_teacher_recipe
from cmdistill.training.teacher import TARGETS, make_scheduler

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "digits-teacher.yaml")

TINY = ["unet.block_out_channels=[8, 16]", "unet.layers_per_block=1", "unet.attention_head_dim=4",
        "unet.norm_num_groups=4", "train.batch_size=8", "train.log_every=1", "train.sample_every=1000",
        "train.sample_steps=2", "train.num_sample_images=4", "optim.warmup_steps=0", "optim.lr_schedule=constant"]


def _train(out, steps: int, *extra: str, ckpt_every: int = 1000):
    args = ["train-teacher", RECIPE, "-o", str(out)]
    for kv in TINY + [f"train.max_steps={steps}", f"train.checkpoint_every={ckpt_every}"]:
        args += ["--set", kv]
    res = CliRunner().invoke(main, args + list(extra))
    assert res.exit_code == 0, res.output
    return res


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_writes_a_ddpm_pipeline_that_loads_and_samples(tmp_path):
    from diffusers import DDPMPipeline

    from cmdistill.core.denoisers import DDPMDenoiser
    from cmdistill.teachers import load_teacher

    _train(tmp_path / "run", 3)
    folder = tmp_path / "run" / "pipeline"
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step_00000003.png").is_file()
    pipe = DDPMPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(2)
    img = pipe(batch_size=2, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 8, 8, 1) and img.min() >= 0 and img.max() <= 1
    den = load_teacher(str(folder))
    assert isinstance(den, DDPMDenoiser)
    assert den.sigma_max == pytest.approx(157.4, rel=1e-3)  # linear betas 1e-4..0.02 over 1000 steps


def test_export_dir_keeps_other_subfolders(tmp_path):
    export = tmp_path / "shipped"
    (export / "classifier").mkdir(parents=True)
    (export / "classifier" / "keep.txt").write_text("x")
    _train(tmp_path / "run", 1, "--set", f"train.export_dir={export}")
    assert (export / "model_index.json").is_file()
    assert (export / "classifier" / "keep.txt").read_text() == "x"


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    _train(tmp_path / "a", 4)
    _train(tmp_path / "b", 2, ckpt_every=2)
    _train(tmp_path / "b", 4, "--resume", "latest", ckpt_every=2)
    a, b = _weights(tmp_path / "a" / "pipeline"), _weights(tmp_path / "b" / "pipeline")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_second_run_into_the_same_folder_is_refused(tmp_path):
    _train(tmp_path / "run", 1)
    args = ["train-teacher", RECIPE, "-o", str(tmp_path / "run")]
    for kv in TINY + ["train.max_steps=1", "train.checkpoint_every=1000"]:
        args += ["--set", kv]
    res = CliRunner().invoke(main, args)  # the same recipe: it can be continued
    assert res.exit_code == 2 and "--resume latest" in res.output
    res = CliRunner().invoke(main, ["train-teacher", RECIPE, "-o", str(tmp_path / "run"),
                                    "--set", "train.max_steps=1"])  # another recipe: another folder
    assert res.exit_code == 2 and "--output-dir" in res.output and "--resume" not in res.output


@pytest.mark.parametrize("override, fragment", [
    ("unet.block_out_chanels=[8]", "did you mean 'unet.block_out_channels'"),
    ("scheduler.prediction_type=eps", "'scheduler.prediction_type' must be one of"),
    ("train.max_steps=0", "'train.max_steps' must be positive"),
    ("unet.down_block_types=[DownBlock2D]", "same length"),
    ("train.batch_size=1.5", "'train.batch_size' must be int"),
])
def test_recipe_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_teacher_recipe(RECIPE, [override])
    res = CliRunner().invoke(main, ["train-teacher", RECIPE, "--set", override, "--dry-run"])
    assert res.exit_code == 2 and fragment in res.output


def test_prediction_targets_match_the_scheduler_definitions():
    r = load_teacher_recipe(None, ["scheduler.prediction_type=v_prediction"])
    sched = make_scheduler(r.scheduler)
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t].sqrt()[:, None, None, None]
    b = (1 - sched.alphas_cumprod[t]).sqrt()[:, None, None, None]
    torch.testing.assert_close(TARGETS["v_prediction"](sched, x0, eps, t), a * eps - b * x0)
    assert TARGETS["epsilon"](sched, x0, eps, t) is eps and TARGETS["sample"](sched, x0, eps, t) is x0


def test_class_conditional_teacher_with_label_dropout(tmp_path, monkeypatch):
    """A class-conditional teacher (num_class_embeds = 10 digits + 1 null class): the network sees the labels, each
    replaced by the null class with probability train.label_dropout; the export keeps the class embedding."""
    import cmdistill.training.teacher as T
    from diffusers import UNet2DModel

    seen = []
    orig = T.ddpm_loss

    def recording(unet, sched, x0, **cond):
        seen.append(cond["class_labels"].clone())
        return orig(unet, sched, x0, **cond)

    monkeypatch.setattr(T, "ddpm_loss", recording)
    _train(tmp_path / "run", 20, "--set", "unet.num_class_embeds=11", "--set", "train.label_dropout=0.5")
    labels = torch.cat(seen)
    null = (labels == 10).float().mean().item()
    assert len(labels) == 160 and 0.3 < null < 0.7 and set(labels[labels < 10].tolist()) <= set(range(10))
    unet = UNet2DModel.from_pretrained(tmp_path / "run" / "pipeline" / "unet")
    assert unet.config.num_class_embeds == 11
    res = CliRunner().invoke(main, ["train-teacher", RECIPE, "-o", str(tmp_path / "other"), "--set",
                                    "unet.num_class_embeds=10", "--set", "train.label_dropout=0.1"] +
                             sum([["--set", kv] for kv in TINY + ["train.max_steps=1"]], []))
    assert res.exit_code == 2 and "null class" in res.stderr
