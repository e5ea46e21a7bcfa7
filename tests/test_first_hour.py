"""Issue 15: what a new user tripped over in the first hour. Nothing overwritten without --overwrite, one line per
error under accelerate launch too, recipe paths relative to the recipe, a model card in every student, outputs
under runs/, readable weight files, a header before the progress bar, threads chosen and a warning when the step
rate collapses, grids worth looking at."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

from cmdistill.cli import main
from conftest import REPO, _threads

TEACHER_RECIPE = REPO / "recipes" / "digits-teacher.yaml"


def _one_line(res, expect: str):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr


# --------------------------------------------------------------------------- 1. nothing overwritten


def test_train_teacher_refuses_an_existing_export(tmp_path, tiny_teacher_dir):
    import shutil

    export = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "model"))
    before = (export / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    res = CliRunner().invoke(main, ["train-teacher", str(TEACHER_RECIPE), "-o", str(tmp_path / "run"),
                                    "--set", f"train.export_dir={export}", "--set", "train.max_steps=1"])
    _one_line(res, "already holds a model; pass --overwrite")
    assert (export / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 2. under accelerate launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_conflict_prints_one_line(tmp_path, tiny_teacher_dir):
    """Both processes find the conflict; only the main one prints it (once), with the hint that fits. The exit
    status is the launcher's: accelerate/torchrun report any failed worker as a failure of their own (see
    docs/multigpu.md), which cmdistill cannot change from inside the workers."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump({"teacher": {"path": "elsewhere"}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "cmdistill", "distill",
           str(REPO / "recipes" / "digits.yaml"), "-o", str(out), "--set", f"teacher.path={tiny_teacher_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("cmdistill: error:")]
    assert len(ours) == 1, proc.stderr[-3000:]
    assert "holds a run of another recipe" in ours[0] and "choose another --output-dir" in ours[0]
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]


# --------------------------------------------------------------------------- 3. recipe paths


def test_recipe_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    from cmdistill.commands import load_recipe

    monkeypatch.chdir(tmp_path)  # neither the repository nor the recipe's folder
    r = load_recipe(REPO / "recipes" / "digits.yaml")
    assert Path(r.teacher.path) == (REPO / "recipes" / "teachers" / "digits").resolve()
    assert r.train.output_dir == "runs/digits"  # outputs stay relative to where the command runs
    res = CliRunner().invoke(main, ["distill", str(REPO / "recipes" / "digits.yaml"), "--dry-run"])
    assert res.exit_code == 0 and str((REPO / "recipes" / "teachers" / "digits").resolve()) in res.output
    # a path that exists only relative to the working directory still works, hub ids are left alone
    (tmp_path / "mine").mkdir()
    assert load_recipe(None, ["teacher.path=mine"]).teacher.path == str((tmp_path / "mine").resolve())
    assert load_recipe(None, []).teacher.path == "google/ddpm-cifar10-32"


# --------------------------------------------------------------------------- 4. model card


def test_student_folder_has_a_model_card_with_the_evaluation(tiny_run_dir):
    card = (tiny_run_dir / "student" / "README.md").read_text()
    assert "import cmdistill" in card and "DiffusionPipeline.from_pretrained" in card
    assert "## Evaluation" in card and "| student-1 | 1 |" in card and "| teacher-ddim-50 | 50 |" in card
    assert "teachers" in card or "digits_tiny" in card  # names the teacher


def test_readme_says_import_cmdistill_registers_the_pipeline():
    text = (REPO / "README.md").read_text()
    assert "import cmdistill  # registers ConsistencyPipeline with diffusers" in text


# --------------------------------------------------------------------------- 7. outputs under runs/


def test_sample_teacher_writes_under_runs_and_says_where(tmp_path, monkeypatch, tiny_teacher_dir):
    monkeypatch.chdir(tmp_path)
    with _threads(1):
        res = CliRunner().invoke(main, ["sample", "--teacher", str(tiny_teacher_dir), "--steps", "2", "--num", "4"])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "runs" / "generated" / "teacher-ddim2-seed0"
    assert (folder / "grid.png").is_file() and not (tmp_path / "generated").exists()
    assert "runs/generated/teacher-ddim2-seed0" in res.output.strip().splitlines()[-1]
    assert "runs/" in (REPO / ".gitignore").read_text()


# --------------------------------------------------------------------------- 8. header, 10. permissions


def test_distill_header_and_readable_files(tiny_run_dir):
    for f in [*(tiny_run_dir / "student").rglob("*.safetensors"), *(tiny_run_dir / "checkpoints").rglob("*")]:
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f  # group and others can read


def test_header_says_what_is_about_to_run(tiny_teacher_dir, tmp_path):
    args = ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(tmp_path / "run"), "--set",
            f"teacher.path={tiny_teacher_dir}", "--set", "train.max_steps=1", "--set", "train.batch_size=4",
            "--set", "eval.at_end=false", "--set", "eval.curve=false", "--set", "train.num_sample_images=2"]
    with _threads(1):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    head = [line for line in res.output.splitlines() if line.startswith("distill: ")]
    text = "\n".join(head)
    for part in ("teacher: ", "data: digits, 1797 images of 1x8x8", "student: sigma (", "training: steps 0 -> 1",
                 "batch 4", "1 process(es) on cpu", f"output: {tmp_path / 'run'}"):
        assert part in text, (part, text)
    assert "Loading pipeline components" not in res.output


# --------------------------------------------------------------------------- 5. threads and contention


def test_step_rate_collapse_warns_once():
    from cmdistill.training.loop import StepRateWatch

    w = StepRateWatch()
    rates = [0.5, 2.4, 2.5, 2.3, 0.6, 2.4, 0.5, 0.4, 0.3, 0.2]  # a warm-up interval, then a dip, then a collapse
    out = [w.update(r) for r in rates]
    assert [i for i, m in enumerate(out) if m] == [7]  # two slow intervals in a row, reported once
    assert "2.50 to 0.40 steps/s" in out[7] and "OMP_NUM_THREADS=1" in out[7]


def test_threads_are_chosen_deliberately(monkeypatch):
    from cmdistill.training.loop import configure_threads

    class Acc:
        device, num_processes = torch.device("cpu"), 2

    old = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        cores = len(os.sched_getaffinity(0))
        assert configure_threads(None, Acc()) == max(1, cores // 2) == torch.get_num_threads()
        assert configure_threads(1, Acc()) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- 6. pictures


def test_grids_separate_and_frame_small_images():
    from cmdistill.images import FRAME, GAP, PAGE, make_grid

    x = torch.full((4, 1, 8, 8), -1.0)  # black digits-like cells that used to touch
    g = make_grid(x, nrow=2, upscale=8)
    cell = 8 * 8 + 2
    assert g.shape == (2 * (cell + GAP) + GAP, 2 * (cell + GAP) + GAP, 1)
    assert (g[:GAP] == PAGE).all() and (g[GAP + cell:2 * GAP + cell] == PAGE).all()  # a clear gap between rows
    assert (g[GAP, GAP:GAP + cell] == FRAME).all()  # each image framed
    inner = g[GAP + 1:GAP + 1 + 64, GAP + 1:GAP + 1 + 64, 0]
    assert (inner == 0).all()
    y = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    big = make_grid(y, upscale=8)[GAP + 1:GAP + 65, GAP + 1:GAP + 65, 0]
    blocks = big.reshape(8, 8, 8, 8)
    assert (blocks == blocks[:, :1, :, :1]).all()  # nearest-neighbour: 8x8 blocks of one value


# --------------------------------------------------------------------------- 10. TensorBoard after a resume


def test_resume_purges_the_logged_steps_after_the_checkpoint(tiny_teacher_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(out), "--set", f"teacher.path={tiny_teacher_dir}",
            "--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2",
            "--set", "train.log_every=1", "--set", "eval.at_end=false", "--set", "eval.curve=false",
            "--set", "train.num_sample_images=2", "--set", "train.sample_every=100"]
    with _threads(1):
        assert CliRunner().invoke(main, args).exit_code == 0
        # as if killed after step 4 and resumed from the checkpoint at step 2: steps 3 and 4 are logged again.
        # TensorBoard orders event files by name (time in seconds, then a per-process counter): a real resume
        # starts in a later second; here, wait for one
        time.sleep(1.1)
        res = CliRunner().invoke(main, args + ["--resume", str(out / "checkpoints" / "step_00000002")])
    assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(out / "logs" / "distill"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
