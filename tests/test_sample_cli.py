"""``cmdistill sample``: finds the newest run, writes PNGs + grid + samples.npz equal to the pipeline's output,
samples a teacher the same way, and fails with one line when there is nothing to sample."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.teachers import load_teacher
from cmdistill.images import to_uint8
from cmdistill.export.pipeline import ConsistencyPipeline
from cmdistill.core.sampling import sample_ode, teacher_sigmas

pytestmark = pytest.mark.usefixtures("single_thread")


def invoke(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def npz(folder):
    with np.load(folder / "samples.npz") as f:
        return f["images"], json.loads(str(f["meta"]))


def pipeline_uint8(student_dir, n, seed, **kw):
    pipe = ConsistencyPipeline.from_pretrained(student_dir)
    x = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images
    return to_uint8(x)


def test_no_argument_uses_newest_run(tiny_run_dir, tmp_path, monkeypatch):
    for name in ("old", "new"):
        shutil.copytree(tiny_run_dir / "student", tmp_path / "runs" / name / "student")
    os.utime(tmp_path / "runs" / "old" / "student" / "model_index.json", (1, 1))
    monkeypatch.chdir(tmp_path)
    res = invoke("--steps", 1, "--num", 5)
    assert res.exit_code == 0, res.output
    assert "runs/new/student" in res.output
    out = tmp_path / "runs" / "new" / "generated" / "student-1step-seed0"
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert (out / "grid.png").is_file()
    images, meta = npz(out)
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert np.array_equal(images, pipeline_uint8(tiny_run_dir / "student", 5, 0, num_inference_steps=1))
    assert meta["steps"] == 1 and meta["seed"] == 0


def test_student_steps_seed_out_and_sigmas(tiny_run_dir, tmp_path):
    student = tiny_run_dir / "student"
    res = invoke("--student", student, "--steps", 2, "--num", 3, "--seed", 5, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    images, meta = npz(tmp_path / "a")
    assert np.array_equal(images, pipeline_uint8(student, 3, 5, num_inference_steps=2))
    assert meta["sigmas"] == ConsistencyPipeline.from_pretrained(student).sigmas_for(2)

    res = invoke("--student", student, "--sigmas", "100,1.5", "--num", 3, "--seed", 5, "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    images_b, meta_b = npz(tmp_path / "b")
    assert meta_b["sigmas"] == [100.0, 1.5] and meta_b["steps"] == 2
    assert np.array_equal(images_b, pipeline_uint8(student, 3, 5, sigmas=[100.0, 1.5]))


def test_batches_do_not_change_one_step_samples(tiny_run_dir, tmp_path):
    student = tiny_run_dir / "student"
    for bs, name in ((2, "small"), (64, "big")):
        assert invoke("--student", student, "--num", 5, "--batch-size", bs, "--out", tmp_path / name).exit_code == 0
    assert np.array_equal(npz(tmp_path / "small")[0], npz(tmp_path / "big")[0])


def test_teacher_sampling(tiny_teacher_dir, tmp_path):
    res = invoke("--teacher", tiny_teacher_dir, "--sampler", "ddim", "--steps", 5, "--num", 3, "--seed", 2,
                 "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output
    images, meta = npz(tmp_path / "t")
    den = load_teacher(str(tiny_teacher_dir))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = to_uint8(sample_ode(den, z, teacher_sigmas(den, 5), "ddim").clamp(-1, 1))
    assert np.array_equal(images, expected)
    assert meta["sampler"] == "ddim" and meta["steps"] == 5
    heun = invoke("--teacher", tiny_teacher_dir, "--sampler", "heun", "--steps", 3, "--num", 2, "--spacing", "trailing",
                  "--out", tmp_path / "h")
    assert heun.exit_code == 0, heun.output
    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = sample_ode(den, z0, teacher_sigmas(den, 3, "trailing"), "heun").clamp(-1, 1)
    assert np.array_equal(npz(tmp_path / "h")[0], to_uint8(expected))


@pytest.mark.parametrize("args, message", [
    ((), "no distilled student found"),
    (("--student", "{tmp}"), "expected a saved ConsistencyPipeline"),
    (("--student", "{run}/student", "--sigmas", "1,100"), "strictly descending"),
    (("--student", "{run}/student", "--sigmas", "100,1", "--steps", "3"), "does not match"),
])
def test_one_line_errors(tiny_run_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = invoke(*[a.format(tmp=tmp_path, run=tiny_run_dir) for a in args])
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("cmdistill: error:") and message in last
    assert res.output.count("cmdistill: error:") == 1 and "Traceback" not in res.output
