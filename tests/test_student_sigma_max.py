"""``student.sigma_max``: a student whose range stops below the teacher's top noise level trains on a Karras grid
capped there, starts its 1-step sampler there, and exports that range in its pipeline."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.commands import load_recipe
from cmdistill.config import ConfigError
from cmdistill.core.consistency import make_student
from cmdistill.teachers import load_teacher


def test_make_student_caps_the_range(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    assert make_student(teacher, "lcm").sigma_max == pytest.approx(teacher.sigma_max)
    f = make_student(teacher, "lcm", sigma_max=5.0)
    assert f.sigma_max == 5.0 and f.consistency_config()["sigma_max"] == 5.0
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(f(x, teacher.sigma_min), x)  # the boundary condition is unchanged
    with pytest.raises(ValueError, match="teacher's range"):
        make_student(teacher, "lcm", sigma_max=2 * teacher.sigma_max)


def test_recipe_key_is_checked():
    assert load_recipe(None, ["student.sigma_max=5"]).student.sigma_max == 5.0
    assert load_recipe(None).student.sigma_max is None
    with pytest.raises(ConfigError, match="student.sigma_max"):
        load_recipe(None, ["student.sigma_max=-1"])
    with pytest.raises(ConfigError, match="schedule.grid: karras"):
        load_recipe(None, ["student.sigma_max=5", "schedule.grid=teacher"])


def test_distilled_student_samples_from_its_own_sigma_max(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    sets = [f"teacher.path={tiny_teacher_dir}", "data.name=digits", "data.hflip=false", "data.num_workers=0",
            "loss.distance=l2", "train.batch_size=4", "train.log_every=1", "student.sigma_max=5",
            "schedule.num_scales=4", "eval.at_end=false"]
    args = ["distill", "-", "-o", str(out), "--steps", "2"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(main, [a if a != "-" else str(_empty(tmp_path)) for a in args])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "student" / "consistency_config" / "consistency_config.json").read_text())
    assert cfg["consistency"]["sigma_max"] == 5.0
    assert all(max(s) <= 5.0 for s in cfg["multistep_sigmas"].values())
    res = CliRunner().invoke(main, args[:1] + [str(_empty(tmp_path)), "-o", str(tmp_path / "bad"), "--steps", "1",
                                               "--set", f"teacher.path={tiny_teacher_dir}", "--set",
                                               "student.sigma_max=1000", "--set", "data.name=digits"])
    assert res.exit_code == 2 and "'student.sigma_max' must lie in the teacher's range" in res.output


def _empty(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p
