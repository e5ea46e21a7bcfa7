"""Multi-process training on this CPU machine: two gloo processes launched by ``accelerate launch``.

Two checks, because a loss-curve comparison alone cannot tell a correct DDP run from two processes that each
train on their own (which is what ``Accelerator()`` silently does on a CPU-only machine unless asked for CPU):

1. exact: DDP steps on one global batch split across 2 processes equal the same steps in one process on the
   whole batch (weights to float rounding), and the replicas stay identical (``multiprocess_check.py``);
2. end to end: ``cmdistill distill`` under ``accelerate launch --multi_gpu --num_processes 2`` (run by the same
   launch, through the command line's own entry point; l2 distance, global batch 128, lr 4e-3, 30 steps, the
   tests' tiny random teacher) really runs 2 processes and follows the loss curve of a 1-process run with the same
   global batch. Each process draws its own pairs
   and noise (``set_seed(device_specific=True)``), so the curves agree in distribution, not value by value: over
   16 runs of this setting (seeds 0-3, 10-40 and 50-80, 1 and 2 processes) the curve mean varied by at most 8 %
   and the mean of the last 10 steps by at most 12 % around its average, while the loss falls about 3x over the
   30 steps. The tolerances below (15 % / 25 %) sit above that noise and far below what a wrong effective batch
   or learning rate produces.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 30, 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (torchrun underneath, gloo), one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)  # cmdistill must pick CPU processes by itself
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port())] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(run / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files  # one writer: the main process
    acc = EventAccumulator(files[0])
    acc.Reload()
    return [e.value for e in acc.Scalars("loss")]


def write_recipe(folder: Path, teacher: Path) -> Path:
    """Every value that shapes the loss curve, pinned (recipes/digits.yaml and the defaults are tuned elsewhere;
    the tolerances below were calibrated with exactly this recipe)."""
    import yaml

    r = {"teacher": {"path": str(teacher)},
         "data": {"name": "digits", "hflip": False, "num_workers": 0},
         "schedule": {"grid": "karras", "num_scales": 18, "rho": 7.0, "pairs": "uniform", "curriculum": "constant"},
         "solver": {"name": "heun", "substeps": 1},
         "student": {"boundary": "cm", "sigma_data": 0.5, "target_decay": 0.0, "ema_decay": 0.999},
         "loss": {"distance": "l2", "weighting": "uniform"},
         "optim": {"name": "radam", "lr": 4.0e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "eps": 1.0e-8,
                   "warmup_steps": 0, "grad_clip": 1.0},
         "train": {"seed": 0, "batch_size": BATCH, "grad_accum": 1, "max_steps": STEPS, "mixed_precision": "no",
                   "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000, "num_sample_images": 4},
         "eval": {"at_end": False}}
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture(scope="module")
def launched(tiny_teacher_dir, tmp_path_factory):
    """One 2-process launch serves both tests (process start-up is most of their cost): the exact DDP check, then
    ``cmdistill distill`` (the recipe of ``write_recipe``) in the same processes."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    check, run, recipe = tmp / "check.json", tmp / "two", write_recipe(tmp, tiny_teacher_dir)
    _launch([str(REPO / "tests" / "multiprocess_check.py"), str(check), "--", "distill", str(recipe), "-o", str(run)])
    return json.loads(check.read_text()), run, recipe


def test_ddp_steps_equal_one_process_on_the_global_batch(launched):
    r = launched[0]
    assert r["world"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU"
    assert r["max_weight_diff_across_ranks"] == 0.0
    assert r["max_weight_change"] > 1e-5  # the steps did move the weights ...
    assert r["max_weight_diff_vs_one_process"] < 1e-6  # ... exactly as one process on the whole batch
    for a, b in zip(r["losses"], r["ref_losses"]):
        assert a == pytest.approx(b, rel=1e-5)


def test_two_processes_follow_the_one_process_loss_curve(launched, tmp_path):
    from cmdistill.commands import load_recipe
    from cmdistill.commands import distill

    _, two, recipe = launched
    ckpt = next((two / "checkpoints").iterdir())
    assert sorted(p.name for p in ckpt.glob("rng_state_*")) == ["rng_state_0.safetensors", "rng_state_1.safetensors"]

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each launched process (and no thread fight on a 2-core machine)
    try:
        distill(load_recipe(recipe), output_dir=str(one))
    finally:
        torch.set_num_threads(threads)

    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == STEPS
    for curve in (l1, l2):  # both learn: the loss falls about 3x over the run
        assert statistics.mean(curve[-10:]) < 0.5 * statistics.mean(curve[:10])
    m1, m2 = statistics.mean(l1), statistics.mean(l2)
    assert abs(m2 - m1) / m1 < 0.15, (m1, m2)
    e1, e2 = statistics.mean(l1[-10:]), statistics.mean(l2[-10:])
    assert abs(e2 - e1) / e1 < 0.25, (e1, e2)
