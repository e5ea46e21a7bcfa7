"""End-to-end ``cmdistill distill`` on a tiny random teacher: checkpoints, resume, student folder,
--dry-run, and the offline failure of the CIFAR recipe."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from cmdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(teacher, out, steps):
    return ["distill", str(ROOT / "recipes" / "digits.yaml"), "-o", str(out),
            "--set", f"teacher.path={teacher}", "--set", "loss.distance=pseudo_huber",
            "--set", "train.batch_size=8", "--set", f"train.max_steps={steps}",
            "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2", "--set", "train.log_every=1",
            "--set", "train.sample_every=2", "--set", "train.num_sample_images=4", "--set", "data.num_workers=0",
            "--set", "eval.at_end=false"]


def test_distill_checkpoints_resume_and_student(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, tiny_args(tiny_teacher_dir, out, 3), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000003"]
    assert (out / "recipe.yaml").exists() and (out / "checkpoints" / "step_00000003" / "recipe.yaml").exists()
    assert list((out / "samples").glob("*.png"))
    assert list((out / "logs").rglob("events.out.tfevents*"))

    res = runner.invoke(main, tiny_args(tiny_teacher_dir, out, 5) + ["--resume", "latest"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "at step 3" in res.output
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000005"]  # keep_checkpoints = 2

    student = out / "student"
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert (student / "unet" / "diffusion_pytorch_model.safetensors").exists()
    from cmdistill import ConsistencyPipeline

    pipe = ConsistencyPipeline.from_pretrained(str(student))
    img = pipe(batch_size=2, num_inference_steps=1, output_type="pt", generator=torch.manual_seed(0)).images
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()
    # the exported weights are the evaluation EMA's, which differ from the teacher's after training
    from safetensors.torch import load_file

    w_s = load_file(student / "unet" / "diffusion_pytorch_model.safetensors")
    w_t = load_file(Path(tiny_teacher_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(w_s[k], w_t[k]) for k in w_t)


def test_dry_run_prints_resolved_recipe():
    res = CliRunner().invoke(main, ["distill", str(ROOT / "recipes" / "cifar.yaml"), "--dry-run",
                                    "--set", "train.max_steps=10"])
    assert res.exit_code == 0
    assert "path: google/ddpm-cifar10-32" in res.output and "max_steps: 10" in res.output


def test_cifar_offline_fails_with_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "cmdistill", "distill", str(ROOT / "recipes" / "cifar.yaml"),
                        "-o", str(tmp_path / "c")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot download teacher 'google/ddpm-cifar10-32'" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
