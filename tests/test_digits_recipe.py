"""The shipped offline default, ``recipes/digits.yaml``, run end to end for two optimiser steps: it distils the
shipped digits teacher and ends by printing where the student is and the evaluation table (digits FID)."""
import json
from pathlib import Path

from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.commands import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits.yaml"


def test_digits_recipe_is_the_offline_evaluated_default():
    r = load_recipe(RECIPE)
    assert (ROOT / r.teacher.path / "model_index.json").is_file() and r.data.name == "digits"
    assert r.eval.at_end and r.eval.feature_net == "digits"
    assert r.loss.distance != "lpips"  # LPIPS needs an ImageNet download


def test_digits_recipe_ends_with_student_and_table(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's teacher path is relative to the repository root
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["distill", str(RECIPE), "-o", str(out), "--set", "train.max_steps=2",
                                    "--set", "train.batch_size=8", "--set", "eval.num_samples=24",
                                    "--set", "eval.batch_size=24", "--set", "eval.search_sigmas=false"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    for row in ("| teacher-ddim-50 | 50 |", "| student-1 | 1 |", "| student-2 | 2 |", "| student-4 | 4 |",
                "| teacher-ddim-1 | 1 |", "| teacher-ddim-4 | 4 |"):
        assert any(line.startswith(row) for line in lines), row
    assert str(out / "student") in lines[-1]  # the last line says where the student is
    report = json.loads((out / "report.json").read_text())
    assert report["feature_net"] == "digits" and report["fid_floor_real_vs_real"] > 0
    assert all(s["fid"] is not None and s["fid"] >= 0 for s in report["samplers"].values())
