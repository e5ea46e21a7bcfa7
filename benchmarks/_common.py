"""Shared helpers of the benchmarks: interleaved timing, machine load, peak memory, model configs."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CIFAR_UNET_CONFIG = HERE / "configs" / "ddpm-cifar10-32-unet.json"

# the tests' tiny U-Net (tests/conftest.py::tiny_unet), 1 channel 8x8 like the digits data
TINY_UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def make_unet(model: str, seed: int = 0):
    """A random-weight ``UNet2DModel``: ``tiny`` (the tests' U-Net) or ``cifar`` (google/ddpm-cifar10-32's
    architecture, 35.7 M parameters, from its public config committed in ``configs/``)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    if model == "tiny":
        return UNet2DModel(**TINY_UNET_CONFIG)
    if model == "cifar":
        return UNet2DModel.from_config(json.loads(CIFAR_UNET_CONFIG.read_text()))
    raise ValueError(f"unknown model {model!r}: tiny | cifar")


def save_random_teacher(model: str, folder: Path, seed: int = 0) -> Path:
    """Write a random teacher (``make_unet`` + google/ddpm-cifar10-32's DDPMScheduler: linear betas 1e-4..0.02,
    1000 steps, epsilon) in the DDPMPipeline layout, so the benchmarks load it the way training does."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = make_unet(model, seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device,
              setup: Callable[[], object] | None = None) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one call of ``fn`` (``setup`` runs first, untimed), device work included.

    ``cpu`` is the CPU time of this process (all its threads): on a CPU shared with other jobs it stays close to
    what the call costs on an idle machine, while the wall time grows with the other jobs' load."""
    if setup is not None:
        setup()
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(cases: dict[str, tuple], device: torch.device, reps: int,
                warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every case ``name -> (fn, setup)`` round-robin, ``warmup`` untimed rounds then ``reps`` timed ones;
    returns ``(wall, cpu)`` lists per case.

    Interleaving matters on a shared machine: a burst of load from another process then slows every case of a
    round alike instead of biasing whichever case happened to run during it.
    """
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(warmup + reps):
        for name, (fn, setup) in cases.items():
            w, c = time_once(fn, device, setup)
            if r >= warmup:
                wall[name].append(w)
                cpu[name].append(c)
    return wall, cpu


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load_avg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (peak RSS of the process)"


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1/5/15": load_avg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def header(title: str, device: torch.device) -> None:
    m = machine(device)
    print(f"# {title}")
    print("# " + ", ".join(f"{k} {v}" for k, v in m.items()))
    print("# command: " + " ".join([Path(sys.executable).name] + sys.argv))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def write_rows(path, rows: list[dict], num_samples: int, t0: float) -> dict:
    """The result of a CPU quality benchmark (its rows, the machine, the sample count, the seconds since ``t0``),
    written to ``path`` as JSON when given; returned."""
    result = {"machine": machine(torch.device("cpu")), "num_samples": num_samples,
              "seconds": time.perf_counter() - t0, "rows": rows}
    write_json(path, result)
    return result
