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
