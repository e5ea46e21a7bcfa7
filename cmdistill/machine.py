"""What a run's numbers depend on besides its recipe and seed: package versions, the processor, the kernels torch
picks for it and the thread count. Training on a CPU is bitwise repeatable when all of these match; a different
processor (AVX2 against AVX-512 kernels in MKL and oneDNN) or thread count rounds a few operations differently, and
1800 training steps amplify that into a different student (docs/digits.md, "Repeatability"). The run prints this
and ``report.json`` records it, so two runs can be told apart."""
from __future__ import annotations

import platform
from importlib import metadata

import torch


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_fingerprint(device: torch.device | str | None = None) -> dict:
    """Versions, processor, torch's CPU kernel level and threads (and the GPU, on one)."""
    device = torch.device(device or "cpu")
    out = {"python": platform.python_version(), "torch": torch.__version__,
           **{p: _version(p) for p in ("diffusers", "accelerate", "numpy")},
           "cpu": cpu_model(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def fingerprint_line(fp: dict) -> str:
    """One line for a run's header."""
    gpu = f", {fp['gpu']}" if "gpu" in fp else ""
    return (f"machine: {fp['cpu']} ({fp['cpu_kernels']} kernels, {fp['torch_threads']} torch threads){gpu}; "
            f"torch {fp['torch']}, diffusers {fp['diffusers']}, accelerate {fp['accelerate']}")
