"""Shared fixtures: tiny random diffusers teachers written to disk, never the network."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def tiny_unet(sample_size: int = 8, channels: int = 1, seed: int = 0, dropout: float = 0.0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8, dropout=dropout,
    )


def save_teacher(folder, unet, layout: str = "pipeline", **sched_kw):
    """Write ``unet`` + a DDPMScheduler in the DDPMPipeline layout or the flat google/ddpm-cifar10-32 one."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, **sched_kw)
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    else:
        unet.save_pretrained(folder)
        sched.save_config(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A random 1-channel 8x8 DDPM teacher (DDPMPipeline layout) matching the digits data."""
    return save_teacher(tmp_path_factory.mktemp("teacher") / "digits_tiny", tiny_unet())


# --------------------------------------------------------------------------- sampling and evaluation (issue 4)
# Tiny random models run fastest on one thread (two threads spin-wait when the machine is busy).

import contextlib  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module's tiny models on one thread."""
    with _threads(1):
        yield


def distill_digits(out: Path, sets: list[str]) -> Path:
    """``cmdistill distill recipes/digits.yaml -o out --set ...`` on one thread; asserts it succeeded."""
    from click.testing import CliRunner

    from cmdistill.cli import main

    args = ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(out)]
    for s in sets:
        args += ["--set", s]
    with _threads(1):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_teacher_dir):
    """A finished 2-step ``cmdistill distill`` run of the tiny teacher on digits with ``eval.at_end`` on
    (16 samples per sampler, digits features), so it also holds the end-of-run report. Copy before changing it."""
    return distill_digits(tmp_path_factory.mktemp("run") / "digits", [
        f"teacher.path={tiny_teacher_dir}", "train.max_steps=2", "train.batch_size=8", "train.checkpoint_every=2",
        "loss.distance=l2", "train.num_sample_images=8", "eval.at_end=true", "eval.num_samples=16",
        "eval.batch_size=16", "eval.search_sigmas=false",
        "student.sigma_max=null"])  # the teacher's full range: tests sample from sigma 100


@pytest.fixture
def run_copy(tiny_run_dir, tmp_path):
    """A private copy of the tiny run (without checkpoints and logs)."""
    return Path(shutil.copytree(tiny_run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "logs")))
