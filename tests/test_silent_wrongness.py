"""Issue 24, items 6-10, 13 and 14: places where cmdistill was wrong in silence. Each test failed on 807096a (the
commit before the fix): schedules rescaled on resume without a word, a curriculum start above its end, fp16 steps
the grad scaler skipped still moving the target, EMA and LR, misread schedulers, registries that were not the single
source, a second network kept for a target that equals the student, and diffusers' cast warning at start-up."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.commands import load_recipe
from cmdistill.config import ConfigError, dump_recipe
from conftest import REPO, _threads, distill_digits, save_teacher, tiny_unet

DIGITS = REPO / "recipes" / "digits.yaml"


# --------------------------------------------------------------------------- 6. resume and the run's length


def _changes(before: list[str], after: list[str]) -> list[str]:
    from cmdistill.training.loop import recipe_changes

    return recipe_changes(dump_recipe(load_recipe(DIGITS, before)), dump_recipe(load_recipe(DIGITS, after)))


def test_ect_gap_depends_on_max_steps():
    """The example of the issue: gap_at(60) is 2 in a 100-step run and 4 in a 400-step one."""
    from cmdistill.core.schedules import PairSchedule

    def gap(total):
        return PairSchedule("karras", 0.01, 5.0, 8, total_steps=total, gap="ect_halving", gap_start=4).gap_at(60)

    assert (gap(100), gap(400)) == (2, 4)


@pytest.mark.parametrize("key, value", [("schedule.gap", "ect_halving"), ("solver.substep_schedule", "doubling"),
                                        ("loss.regression_schedule", "linear_decay"),
                                        ("schedule.curriculum", "ict_exponential"), ("optim.lr_schedule", "cosine")])
def test_resume_names_schedules_rescaled_by_max_steps(key, value):
    extra = ["bank.count=16", "loss.regression_weight=0.1"] if key.startswith("loss.") else []
    extra += ["schedule.num_scales_start=4"] if key == "schedule.curriculum" else []
    changes = _changes([f"{key}={value}", "train.max_steps=100", *extra], [f"{key}={value}", "train.max_steps=400",
                                                                         *extra])
    assert len(changes) == 1 and changes[0].startswith("train.max_steps: 100 -> 400"), changes
    assert key in changes[0]


def test_resume_may_change_max_steps_when_nothing_depends_on_it():
    assert _changes(["train.max_steps=100"], ["train.max_steps=400"]) == []


def test_a_registered_schedule_marked_as_scaled_is_picked_up(monkeypatch):
    """Which keys depend on max_steps is read from the registries: a new curriculum marked ``scaled_to_run`` counts
    without touching the loop."""
    from cmdistill.config import run_length_keys
    from cmdistill.core import schedules

    @schedules.scaled_to_run
    def halfway(step, total, n_start, n_end):
        return n_end if step >= total // 2 else n_start

    monkeypatch.setitem(schedules.CURRICULA, "halfway", halfway)
    r = load_recipe(DIGITS, ["schedule.curriculum=halfway", "schedule.num_scales_start=4"])
    assert run_length_keys(r) == ["schedule.curriculum"]
    assert run_length_keys(load_recipe(DIGITS)) == []


# --------------------------------------------------------------------------- 7. a curriculum start above its end


def test_curriculum_start_above_end_is_refused():
    with pytest.raises(ConfigError, match="num_scales_start' \\(11\\) is above 'schedule.num_scales' \\(8\\)"):
        load_recipe(DIGITS, ["schedule.curriculum=ict_exponential"])  # the default start is 11, digits uses 8
    assert load_recipe(DIGITS).schedule.num_scales_start == 11  # the constant curriculum never reads it
    res = CliRunner().invoke(main, ["distill", str(DIGITS), "--set", "schedule.curriculum=ict_exponential",
                                    "--dry-run"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def test_core_curriculum_refuses_a_start_above_its_end():
    from cmdistill.core.schedules import PairSchedule, ict_exponential_curriculum

    with pytest.raises(ValueError):
        ict_exponential_curriculum(0, 100, 11, 8)
    with pytest.raises(ValueError):
        PairSchedule("karras", 0.01, 5.0, 8, curriculum="ict_exponential", num_scales_start=11, total_steps=100)
    assert ict_exponential_curriculum(99, 100, 5, 17) == 17


# --------------------------------------------------------------------------- 8. fp16 steps the scaler skips


class _Task:
    """The smallest task :func:`optimizer_step` runs: one linear layer, a loss whose scaled gradient overflows."""

    def __init__(self, accelerator, overflow: bool):
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        self.model, self.optimizer = accelerator.prepare(model, opt)
        self.overflow, self.updates = overflow, 0

    def loss(self, step):  # finite, but 2^16 times it is not: the gradients overflow once scaled
        return self.model(torch.ones(2, 4)).sum() * (1e36 if self.overflow else 1.0)

    def after_update(self):
        self.updates += 1


@pytest.fixture
def fp16_state():
    """accelerate's process-wide state in fp16 for one test, then back to a fresh one (the runs set their own)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    yield
    reset()


@pytest.mark.parametrize("overflow", [True, False])
def test_scaler_skipped_step_holds_target_ema_and_lr(overflow, fp16_state):
    from accelerate import Accelerator

    from cmdistill.training.loop import NonFiniteGuard, optimizer_step

    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what accelerate makes on a GPU
    task = _Task(acc, overflow)
    w0 = task.model.weight.detach().clone()
    _, applied = optimizer_step(acc, task, 0, 1, None, NonFiniteGuard("stop", acc), check_grads=False)
    assert acc.optimizer_step_was_skipped == overflow
    assert applied == (not overflow)
    assert task.updates == (0 if overflow else 1)  # target and EMA updates
    assert task.lr_scheduler.last_epoch == (0 if overflow else 1)
    assert torch.equal(w0, task.model.weight) == overflow


# --------------------------------------------------------------------------- 9. schedulers that were misread


def _teacher_with(tmp_path, unet, sched_cfg: dict):
    folder = save_teacher(tmp_path / "t", unet, layout="flat")
    (folder / "scheduler_config.json").write_text(json.dumps(sched_cfg))
    return folder


def test_continuous_timestep_euler_teacher_is_refused(tmp_path):
    from diffusers import EulerDiscreteScheduler

    from cmdistill.teachers import TeacherLoadError, load_teacher

    cfg = dict(EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction").config)
    folder = _teacher_with(tmp_path, tiny_unet(), {"_class_name": "EulerDiscreteScheduler", **cfg})
    with pytest.raises(TeacherLoadError, match="timestep_type='continuous'"):
        load_teacher(str(folder))
    res = CliRunner().invoke(main, ["sample", "--teacher", str(folder), "--num", "2"])
    assert res.exit_code == 2 and "continuous" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    discrete = {**cfg, "_class_name": "EulerDiscreteScheduler", "timestep_type": "discrete"}
    (folder / "scheduler_config.json").write_text(json.dumps(discrete))
    assert load_teacher(str(folder)).kind == "ddpm"


# --------------------------------------------------------------------------- 10. registering is enough


def test_a_registered_solver_is_picked_up_everywhere(monkeypatch, tmp_path, tiny_teacher_dir):
    from cmdistill.core import solvers
    from cmdistill.evaluation.generate import teacher_fn
    from cmdistill.teachers import load_teacher

    calls = []

    def midpoint_step(denoiser, x, sigma_hi, sigma_lo, **cond):
        calls.append(1)
        mid = solvers.as_sigma((torch.as_tensor(sigma_hi) * torch.as_tensor(sigma_lo).clamp_min(1e-3)).sqrt(), x)
        return solvers.euler_step(denoiser, solvers.euler_step(denoiser, x, sigma_hi, mid, **cond), mid, sigma_lo,
                                  **cond)

    monkeypatch.setitem(solvers.SOLVERS, "midpoint", solvers.Solver(midpoint_step, nfe=2, nfe_to_zero=2))
    assert load_recipe(DIGITS, ["solver.name=midpoint", "bank.solver=midpoint"]).solver.name == "midpoint"
    assert solvers.solve(lambda x, s: torch.zeros_like(x), torch.ones(2, 1), 2.0, 1.0, "midpoint").shape == (2, 1)
    teacher = load_teacher(str(tiny_teacher_dir))
    calls.clear()
    teacher_fn(teacher, "midpoint", 3)(torch.randn(2, 1, 8, 8), None)
    assert len(calls) == 3  # 3 steps, the last one to sigma 0
    assert solvers.SOLVERS["midpoint"].sampler_nfe(3) == 6 and solvers.SOLVERS["heun"].sampler_nfe(50) == 99
    res = CliRunner().invoke(main, ["sample", "--teacher", str(tiny_teacher_dir), "--num", "2", "--steps", "2",
                                    "--sampler", "midpoint", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["sample", "--teacher", str(tiny_teacher_dir), "--num", "2", "--sampler", "rk4"])
    assert res.exit_code == 2 and "rk4" in res.stderr


def test_a_registered_grid_is_picked_up(monkeypatch):
    from cmdistill.core import schedules

    grid = schedules.Grid(build=lambda ps, step: torch.linspace(ps.sigma_max, ps.sigma_min, 5),
                          key=lambda ps, step: None)
    monkeypatch.setitem(schedules.GRIDS, "linear", grid)
    assert load_recipe(DIGITS, ["schedule.grid=linear"]).schedule.grid == "linear"
    ps = schedules.PairSchedule("linear", 1.0, 5.0, 8)
    torch.testing.assert_close(ps.grid_and_probs(0)[0], torch.linspace(5.0, 1.0, 5))
    with pytest.raises(ConfigError, match="schedule.grid"):
        load_recipe(DIGITS, ["schedule.grid=cosine"])


def test_a_registered_adapter_is_picked_up(monkeypatch):
    from cmdistill.core import denoisers

    class VEDenoiser(denoisers.EDMDenoiser):
        kind = "ve"
        scheduler_classes = frozenset({"MyVEScheduler"})

    monkeypatch.setitem(denoisers.ADAPTERS, "ve", VEDenoiser)
    assert denoisers.infer_kind({"_class_name": "MyVEScheduler"}) == "ve"
    assert isinstance(denoisers.build_denoiser(tiny_unet(), {"_class_name": "MyVEScheduler"}), VEDenoiser)
    assert load_recipe(DIGITS, ["teacher.kind=ve"]).teacher.kind == "ve"
    with pytest.raises(denoisers.UnsupportedTeacher, match="OtherScheduler"):
        denoisers.infer_kind({"_class_name": "OtherScheduler"})


# --------------------------------------------------------------------------- 13. the target without a copy


def _state(run):
    from safetensors.torch import load_file

    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    return {k: v for f in ("model.safetensors", "ema.safetensors") for k, v in load_file(str(ckpt / f)).items()}


def test_target_is_the_student_itself_when_mu_is_zero(tiny_teacher_dir):
    from cmdistill.core.consistency import make_student, make_target, update_target
    from cmdistill.teachers import load_teacher

    student = make_student(load_teacher(str(tiny_teacher_dir)))
    assert make_target(student, 0.0) is student
    copied = make_target(student, 0.5)
    assert copied is not student and not any(p.requires_grad for p in copied.parameters())
    update_target(student, student, 0.0)  # nothing to do


def test_shared_target_trains_bitwise_like_a_copied_one(tmp_path, tiny_teacher_dir, monkeypatch):
    """20 steps with the student as its own target (mu = 0) against the copy the package kept before: the same
    losses (TensorBoard-free: the checkpoints' weights and the loss history) bit for bit; dropout on, so the
    replayed RNG is exercised."""
    from cmdistill.core import consistency
    from cmdistill.training import distill

    dropout_teacher = save_teacher(tmp_path / "drop", tiny_unet(dropout=0.1))
    sets = [f"teacher.path={dropout_teacher}", "train.max_steps=20", "train.batch_size=8", "train.checkpoint_every=20",
            "loss.distance=l2", "train.num_sample_images=4", "eval.at_end=false", "eval.curve=false",
            "train.log_every=1", "train.sample_every=20"]
    losses = {}
    real_loss = distill.Distillation.loss

    def recording(name):
        def loss(self, step):
            out = real_loss(self, step)
            losses.setdefault(name, []).append(out.detach().clone())
            return out
        return loss

    monkeypatch.setattr(distill.Distillation, "loss", recording("shared"))
    shared = distill_digits(tmp_path / "shared", sets)
    monkeypatch.setattr(distill, "make_target", lambda student, mu=None: consistency.make_target(student))
    monkeypatch.setattr(distill.Distillation, "loss", recording("copy"))
    copied = distill_digits(tmp_path / "copy", sets)
    assert len(losses["shared"]) == len(losses["copy"]) == 20
    assert all(torch.equal(a, b) for a, b in zip(losses["shared"], losses["copy"]))
    a, b = _state(shared), _state(copied)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (sorted((shared / "checkpoints").glob("step_*"))[-1] / "target.safetensors").exists()
    assert (sorted((copied / "checkpoints").glob("step_*"))[-1] / "target.safetensors").exists()


# --------------------------------------------------------------------------- 14. a quiet start


def test_distill_prints_nothing_before_its_own_header(tmp_path, tiny_teacher_dir):
    """diffusers' "modules that should be kept in float32 ... Casting directly with `to()`" came twice before the
    header: the teacher and the student were cast with ``to(dtype)``. The command as a user runs it."""
    import os
    import subprocess
    import sys

    sets = [f"teacher.path={tiny_teacher_dir}", "train.max_steps=1", "train.batch_size=4", "loss.distance=l2",
            "eval.at_end=false", "eval.curve=false", "train.num_sample_images=4", "train.cpu_threads=1"]
    cmd = [sys.executable, "-m", "cmdistill", "distill", str(DIGITS), "-o", str(tmp_path / "quiet")]
    for x in sets:
        cmd += ["--set", x]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    first = (res.stdout + res.stderr).lstrip().splitlines()[0]
    assert first.startswith("distill: teacher:"), first
    assert "Casting directly" not in res.stderr


def test_bf16_teacher_is_loaded_in_its_dtype(tiny_teacher_dir, capfd):
    from cmdistill.training.distill import build_models

    r = load_recipe(DIGITS, [f"teacher.path={tiny_teacher_dir}", "teacher.dtype=bf16"])
    teacher, student, target, _ = build_models(r, torch.device("cpu"))
    assert next(teacher.net.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32 and target is student
    assert "Casting directly" not in capfd.readouterr().err


def test_a_target_of_its_own_is_checkpointed_and_resumed(tmp_path, tiny_teacher_dir):
    """mu > 0 keeps the target as a network of its own: saved with every checkpoint and restored on resume, so a
    run stopped at step 2 and resumed ends where an uninterrupted 4-step run does."""
    from safetensors.torch import load_file

    sets = [f"teacher.path={tiny_teacher_dir}", "train.batch_size=4", "train.checkpoint_every=2", "loss.distance=l2",
            "train.num_sample_images=4", "eval.at_end=false", "eval.curve=false", "student.target_decay=0.5"]
    whole = distill_digits(tmp_path / "whole", sets + ["train.max_steps=4"])
    part = distill_digits(tmp_path / "part", sets + ["train.max_steps=2"])
    args = ["distill", str(DIGITS), "-o", str(part), "--resume", "latest", "--set", "train.max_steps=4"]
    for x in sets:
        args += ["--set", x]
    with _threads(1):  # as distill_digits runs: another thread count rounds differently
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    a, b = (load_file(str(r / "checkpoints" / "step_00000004" / "target.safetensors")) for r in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = load_file(str(whole / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert any(not torch.equal(a[k], s[k]) for k in s)  # the target lags the student: a network of its own
