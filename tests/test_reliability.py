"""Reliability (issue 6): a run killed with SIGKILL mid-step, or during a checkpoint save, and resumed with
``--resume latest`` ends bitwise identical to an uninterrupted run; non-finite losses and gradients are skipped
or stop the run as the recipe says, and non-finite weights are never saved.

The killed runs are real subprocesses: a small runner patches one function to write a marker file and stall at
the chosen moment, and the test sends SIGKILL from outside.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cmdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2

RUNNER = r'''
import os, sys, time
from pathlib import Path

what, _, at = os.environ.get("CMD_STALL", "").partition(":")
if what:
    calls = {"n": 0}

    def wrap(orig):
        def patched(*a, **k):
            calls["n"] += 1
            if calls["n"] == int(at):  # announce the moment, then wait for the SIGKILL
                Path(os.environ["CMD_MARKER"]).write_text(str(os.getpid()))
                time.sleep(600)
            return orig(*a, **k)
        return patched

    if what == "loss":  # at the start of a training step's loss (data and noise levels already drawn)
        import cmdistill.training.distill as T
        T.cd_loss = wrap(T.cd_loss)
    elif what == "save":  # inside save_checkpoint: every file written, manifest and rename not yet done
        import cmdistill.training.checkpoint as C
        C._write_manifest = wrap(C._write_manifest)

from cmdistill.cli import main
main(sys.argv[1:], prog_name="cmdistill")
'''


def write_recipe(folder: Path, teacher, **train) -> Path:
    """A small self-contained recipe (independent of recipes/digits.yaml, which is tuned elsewhere)."""
    t = {"batch_size": 8, "max_steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 3, "log_every": 3,
         "sample_every": 100, "num_sample_images": 4, "seed": 3}
    t.update(train)
    r = {"teacher": {"path": str(teacher)},
         "data": {"name": "digits", "hflip": True, "num_workers": 1},  # hflip: its generator must resume too
         "schedule": {"grid": "karras", "num_scales": 18}, "solver": {"name": "heun"},
         "student": {"ema_decay": 0.99}, "loss": {"distance": "l2"}, "optim": {"name": "radam", "lr": 2e-4},
         "train": t, "eval": {"at_end": False}}
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


class Run:
    """``cmdistill distill`` in a subprocess through the runner (optionally stalling at ``stall``)."""

    def __init__(self, setup, out: Path, *extra, stall: str = ""):
        self.out, self.marker = out, out.parent / f"{out.name}.marker"
        self.log = open(out.parent / f"{out.name}.log", "w")
        env = dict(setup["env"], CMD_STALL=stall, CMD_MARKER=str(self.marker))
        cmd = [sys.executable, str(setup["runner"]), "distill", str(setup["recipe"]), "-o", str(out), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def wait(self, timeout=240) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc

    def kill_when_stalled(self, timeout=240) -> None:
        t0 = time.time()
        while not self.marker.exists():
            assert self.proc.poll() is None, f"run ended before the kill point:\n{self.output()}"
            assert time.time() - t0 < timeout, "kill point never reached"
            time.sleep(0.1)
        self.proc.send_signal(signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in the subprocesses: tiny convolutions are fastest so, even on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import save_teacher, tiny_unet

    d = tmp_path_factory.mktemp("reliability")
    teacher = save_teacher(d / "teacher", tiny_unet(dropout=0.1))  # dropout: the RNG replay must resume too
    runner = d / "runner.py"
    runner.write_text(RUNNER)
    # one thread in every run: the same kernels, so equal inputs give bitwise-equal weights
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return {"dir": d, "teacher": teacher, "runner": runner, "env": env, "recipe": write_recipe(d, teacher)}


@pytest.fixture(scope="module")
def killed(setup):
    """Both runs to be killed, started at once: their imports overlap each other and the baseline."""
    runs = {"mid_step": Run(setup, setup["dir"] / "killed", stall="loss:5"),  # step 5 under way
            "in_save": Run(setup, setup["dir"] / "killed_in_save", stall="save:2")}  # inside the step-4 save
    yield runs
    for r in runs.values():
        if r.proc.poll() is None:
            r.proc.kill()
            r.wait()


def distill_inprocess(setup, out: Path, *extra):
    """The same command as the subprocesses run, in this process (one thread, like them)."""
    res = CliRunner().invoke(main, ["distill", str(setup["recipe"]), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def baseline(setup, killed):
    """The uninterrupted run (in this process, while the killed runs start up)."""
    out = setup["dir"] / "baseline"
    distill_inprocess(setup, out)
    return out


def tensors_of(run_dir: Path) -> dict[str, torch.Tensor]:
    """Everything numeric a finished run leaves: the exported student and the last checkpoint's networks and
    optimiser state."""
    out = {f"student/{k}": v for k, v in
           load_file(run_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors").items()}
    last = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    for name in ("model", "target", "ema"):  # target: only a network of its own when student.target_decay > 0
        if (last / f"{name}.safetensors").exists():
            out.update({f"{name}/{k}": v for k, v in load_file(last / f"{name}.safetensors").items()})
    opt = torch.load(last / "optimizer.bin", weights_only=True)
    for i, st in opt["state"].items():
        out.update({f"opt/{i}/{k}": torch.as_tensor(v) for k, v in st.items()})
    return out


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def assert_trained(run_dir: Path, teacher: Path) -> None:
    """The comparison means something: the exported student is not the teacher any more."""
    s = load_file(run_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    t = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(s[k], t[k]) for k in t)


def test_sigkill_mid_step_then_resume_is_bitwise_identical(setup, killed, baseline):
    run = killed["mid_step"]
    run.kill_when_stalled()
    out = run.out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert not (out / "student").exists()

    res = distill_inprocess(setup, out, "--resume", "latest")
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in res.output
    assert_bitwise_equal(baseline, out)
    assert_trained(out, setup["teacher"])


def test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly(setup, killed, baseline):
    run = killed["in_save"]
    run.kill_when_stalled()
    ckpts = run.out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_00000004", "step_00000002"]
    assert json.loads((ckpts / "step_00000002" / "manifest.json").read_text())["step"] == 2

    res = distill_inprocess(setup, run.out, "--resume", "latest")
    assert "at step 2" in res.output
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert_bitwise_equal(baseline, run.out)


def test_resume_exact_with_grad_accum_warmup_and_lognormal_pairs(setup, tmp_path):
    """Stopping at a checkpoint and continuing equals one run, also with gradient accumulation (accelerate's
    micro-step counter), an LR warm-up (the scheduler state) and iCT's lognormal pairs."""
    extra = ["--set", "train.grad_accum=2", "--set", "optim.warmup_steps=3", "--set", "schedule.pairs=lognormal",
             "--set", "data.num_workers=0"]
    distill_inprocess(setup, tmp_path / "one", *extra)
    distill_inprocess(setup, tmp_path / "two", *extra, "--steps", "4")
    res = distill_inprocess(setup, tmp_path / "two", *extra, "--resume", "latest")
    assert "at step 4" in res.output and "warning" not in res.output  # max_steps may change on resume
    assert_bitwise_equal(tmp_path / "one", tmp_path / "two")


# --------------------------------------------------------------------------- non-finite values (in-process)


def nan_at(monkeypatch, step: int, where: str):
    """Make training step ``step`` produce a NaN ``loss`` or a NaN gradient (with a finite loss)."""
    import cmdistill.training.distill as T

    orig, calls = T.cd_loss, {"n": 0}

    def patched(student, *a, **k):
        calls["n"] += 1
        res = orig(student, *a, **k)
        if calls["n"] == step:
            if where == "loss":
                res.loss = res.loss * float("nan")
            else:
                res.loss.register_hook(lambda g: g * float("nan"))
        return res

    monkeypatch.setattr(T, "cd_loss", patched)


def run_inprocess(setup, tmp_path, *extra):
    recipe = write_recipe(tmp_path, setup["teacher"], log_every=100)
    args = ["distill", str(recipe), "-o", str(tmp_path / "run"), "--set", "data.num_workers=0",
            "--set", "data.hflip=false", "--steps", "4", *extra]
    return CliRunner().invoke(main, args)


def test_nonfinite_gradient_is_skipped(setup, tmp_path, monkeypatch):
    nan_at(monkeypatch, 2, "grad")
    # a target of its own (mu > 0), so that its weights are checked too
    res = run_inprocess(setup, tmp_path, "--set", "train.on_nonfinite=skip", "--set", "student.target_decay=0.5")
    assert res.exit_code == 0, res.output
    assert "non-finite loss or gradient at step 2; step skipped" in res.stderr
    last = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert json.loads((last / "train_state.json").read_text())["train"] == {"step": 4, "skipped": 1}
    opt = torch.load(last / "optimizer.bin", weights_only=True)
    assert all(float(st["step"]) == 3 for st in opt["state"].values())  # 4 steps, one not applied
    assert int(load_file(last / "ema.safetensors")["step"]) == 3
    for f in ("model", "target", "ema"):
        assert all(torch.isfinite(t).all() for t in load_file(last / f"{f}.safetensors").values()
                   if t.is_floating_point())


def test_nonfinite_loss_stops_naming_the_step_and_saves_nothing_after(setup, tmp_path, monkeypatch):
    nan_at(monkeypatch, 3, "loss")
    res = run_inprocess(setup, tmp_path, "--set", "train.on_nonfinite=stop", "--set", "student.target_decay=0.5")
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if "cmdistill:" in ln]  # besides the progress bar
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    assert lines[0].startswith("cmdistill: error: non-finite loss or gradient at step 3; stopped")
    assert "step_00000002" in lines[0]
    run = tmp_path / "run"
    # detected at the next sync point (the step-4 checkpoint), before anything was written
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert not (run / "student").exists()
    for f in ("model", "target", "ema"):
        assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoints" / "step_00000002" /
                                                             f"{f}.safetensors").values() if t.is_floating_point())
