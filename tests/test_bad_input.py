"""Bad input to ``cmdistill distill`` (issue 6): each case prints exactly one line on stderr, exits with status 2,
shows no traceback (unless --debug) and leaves everything already on disk untouched. docs/reliability.md lists
the same cases with their messages."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cmdistill.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_recipe(folder: Path, teacher, **data) -> Path:
    d = {"name": "digits", "hflip": False, "num_workers": 0}
    d.update(data)
    r = {"teacher": {"path": str(teacher)}, "data": d, "loss": {"distance": "l2"},
         "train": {"batch_size": 8, "max_steps": 2, "checkpoint_every": 1, "log_every": 1, "sample_every": 100,
                   "num_sample_images": 4},
         "eval": {"at_end": False}}
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def snapshot(root: Path) -> dict:
    """Every file and folder under ``root`` with its size, modification time and hash."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            out[rel] = "dir"
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def fails(args, watch: Path, expect: str, debug=False):
    """Run the CLI; assert exit 2, one stderr line containing ``expect``, and ``watch`` unchanged."""
    before = snapshot(watch)
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cmdistill: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert snapshot(watch) == before, "files on disk changed"
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_dir):
    """Teachers (right, 3-channel, 16 px) and a finished run with checkpoints."""
    from conftest import save_teacher, tiny_unet

    d = tmp_path_factory.mktemp("bad_input")
    w = {"dir": d, "teacher": Path(tiny_teacher_dir),
         "rgb_teacher": save_teacher(d / "rgb", tiny_unet(channels=3)),
         "big_teacher": save_teacher(d / "big", tiny_unet(sample_size=16))}
    w["recipe"] = small_recipe(d, tiny_teacher_dir)
    run = d / "run"
    res = CliRunner().invoke(main, ["distill", str(w["recipe"]), "-o", str(run)])
    assert res.exit_code == 0, res.output
    w["run"] = run
    return w


@pytest.fixture
def run_copy(world, tmp_path):
    """A private copy of the finished run (some tests damage a checkpoint)."""
    dst = tmp_path / "run"
    shutil.copytree(world["run"], dst)
    return dst


# --------------------------------------------------------------------------- the recipe


def test_recipe_file_missing(tmp_path):
    fails(["distill", tmp_path / "nope.yaml", "-o", tmp_path / "out"], tmp_path, "recipe file")


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: [1,\n")
    fails(["distill", p, "-o", tmp_path / "out"], tmp_path, f"malformed YAML in {p} at line 3, column 1")
    assert not (tmp_path / "out").exists()


def test_unknown_key_suggests_the_closest(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", "train.batchsize=4"], tmp_path,
          "unknown key 'train.batchsize' (did you mean 'train.batch_size'?)")


@pytest.mark.parametrize("override, expect", [
    ("train.batch_size=big", "'train.batch_size' must be int, got 'big'"),
    ("optim.lr=-1", "'optim.lr' must be positive, got -1.0"),
    ("optim.lr=.nan", "'optim.lr' must be a finite number, got nan"),
    ("student.ema_decay=1.5", "'student.ema_decay' must be in [0, 1), got 1.5"),
    ("train.on_nonfinite=skp", "'train.on_nonfinite' must be one of stop, skip; got 'skp' (did you mean 'skip'?)"),
    ("data.num_workers=-1", "'data.num_workers' must be >= 0, got -1"),
])
def test_wrong_type_or_out_of_range(world, tmp_path, override, expect):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", override], tmp_path, expect)


@pytest.mark.parametrize("args, expect", [
    (["--steps", "0"], "Invalid value for '--steps': 0 is not in the range x>=1"),
    (["--steps", "-3"], "Invalid value for '--steps': -3 is not in the range x>=1"),
    (["--set", "train.max_steps=0"], "'train.max_steps' must be positive, got 0"),
    (["--set", "train.max_steps=-3"], "'train.max_steps' must be positive, got -3"),
])
def test_zero_or_negative_steps(world, tmp_path, args, expect):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", *args], tmp_path, expect)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the teacher


def test_teacher_folder_missing(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", f"teacher.path={tmp_path / 'none'}"],
          tmp_path, f"teacher folder '{tmp_path / 'none'}' does not exist")
    assert not (tmp_path / "out").exists()


def test_teacher_hub_id_offline(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", "teacher.path=nobody/no-such-teacher"],
          tmp_path, "cannot download teacher 'nobody/no-such-teacher' from the Hugging Face Hub")
    assert not (tmp_path / "out").exists()


def test_teacher_folder_malformed(world, tmp_path):
    (tmp_path / "empty_teacher").mkdir()
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", f"teacher.path={tmp_path / 'empty_teacher'}"],
          tmp_path, "no model config.json in")


def test_teacher_weights_corrupt(world, tmp_path):
    t = tmp_path / "teacher"
    shutil.copytree(world["teacher"], t)
    (t / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", f"teacher.path={t}"], tmp_path,
          f"cannot load teacher weights from {t / 'unet'}")


# --------------------------------------------------------------------------- teacher vs data, the data


def test_teacher_and_data_disagree_on_channels(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", f"teacher.path={world['rgb_teacher']}"],
          tmp_path, "dataset 'digits' gives images of shape (1, 8, 8) but the teacher expects (3, 8, 8)")


def test_teacher_and_data_disagree_on_resolution(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", f"teacher.path={world['big_teacher']}"],
          tmp_path, "dataset 'digits' gives images of shape (1, 8, 8) but the teacher expects (1, 16, 16)")
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", "data.resolution=16"], tmp_path,
          "data.resolution is 16 but the teacher")


def test_dataset_folder_missing(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", "data.name=imagefolder",
           "--set", f"data.root={tmp_path / 'images'}"], tmp_path,
          f"image folder '{tmp_path / 'images'}' does not exist")


def test_dataset_folder_empty(world, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here")
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--set", "data.name=imagefolder",
           "--set", f"data.root={tmp_path / 'images'}"], tmp_path,
          f"image folder '{tmp_path / 'images'}' holds no images")


# --------------------------------------------------------------------------- the output folder


def test_output_folder_holds_a_run_of_this_recipe(world, run_copy, tmp_path):
    fails(["distill", world["recipe"], "-o", run_copy], run_copy,
          f"output folder {run_copy} already holds a run; pass --resume latest to continue it or --overwrite")


def test_output_folder_holds_a_run_of_another_recipe(world, run_copy, tmp_path):
    """The hint fits the case: another recipe's run cannot be continued, so the fix is another --output-dir."""
    line = fails(["distill", world["recipe"], "-o", run_copy, "--set", "optim.lr=0.001"], run_copy,
                 f"output folder {run_copy} already holds a run of another recipe (optim.lr: 0.0004 -> 0.001); "
                 "choose another --output-dir")
    assert "--resume" not in line


def test_output_folder_not_empty_and_not_a_run(world, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    fails(["distill", world["recipe"], "-o", out], tmp_path, f"output folder {out} is not empty and holds no cmdistill run")


def test_overwrite_deletes_nothing_before_everything_is_validated(world, run_copy, tmp_path):
    fails(["distill", world["recipe"], "-o", run_copy, "--overwrite", "--set", f"teacher.path={tmp_path / 'gone'}"],
          run_copy, "does not exist")


def test_resume_and_overwrite_together(world, run_copy):
    fails(["distill", world["recipe"], "-o", run_copy, "--resume", "latest", "--overwrite"], run_copy,
          "--resume and --overwrite cannot be used together")


def test_resume_validates_the_teacher_before_writing(world, run_copy, tmp_path):
    """--resume into an existing run with a teacher that cannot load: recipe.yaml and checkpoints untouched."""
    fails(["distill", world["recipe"], "-o", run_copy, "--resume", "latest",
           "--set", f"teacher.path={tmp_path / 'gone'}"], run_copy, "does not exist")


# --------------------------------------------------------------------------- resume checkpoints


def test_resume_latest_without_checkpoint(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--resume", "latest"], tmp_path,
          f"--resume latest: no checkpoint in {tmp_path / 'out' / 'checkpoints'}")


def test_resume_path_missing(world, tmp_path):
    fails(["distill", world["recipe"], "-o", tmp_path / "out", "--resume", tmp_path / "ckpt"], tmp_path,
          f"--resume: checkpoint folder '{tmp_path / 'ckpt'}' does not exist")


@pytest.mark.parametrize("damage, expect", [
    ("truncate", "is corrupt or truncated: model.safetensors has 100 bytes, expected"),
    ("flip", "is corrupt: optimizer.bin does not match its checksum"),
    ("manifest", "is incomplete or not a cmdistill checkpoint (no manifest.json)"),
    ("missing", "is incomplete: ema.safetensors is missing"),
])
def test_corrupt_or_truncated_checkpoint(world, run_copy, damage, expect):
    last = run_copy / "checkpoints" / "step_00000002"
    if damage == "truncate":
        with open(last / "model.safetensors", "r+b") as fh:
            fh.truncate(100)
    elif damage == "flip":
        b = bytearray((last / "optimizer.bin").read_bytes())
        b[len(b) // 2] ^= 0xFF
        (last / "optimizer.bin").write_bytes(bytes(b))
    elif damage == "manifest":
        (last / "manifest.json").unlink()
    else:
        (last / "ema.safetensors").unlink()
    line = fails(["distill", world["recipe"], "-o", run_copy, "--resume", "latest", "--steps", "3"], run_copy, expect)
    assert f"checkpoint {last} " in line


def test_checkpoint_of_another_network(world, run_copy, tmp_path):
    """A sound checkpoint that does not fit the recipe's teacher (another architecture) is refused, unchanged."""
    from conftest import save_teacher
    from diffusers import UNet2DModel

    other = save_teacher(tmp_path / "other", UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8))
    fails(["distill", world["recipe"], "-o", run_copy, "--resume", "latest", "--steps", "3",
           "--set", f"teacher.path={other}"], run_copy,
          f"cannot restore checkpoint {run_copy / 'checkpoints' / 'step_00000002'}: RuntimeError:")


def test_debug_shows_the_traceback(world, tmp_path):
    res = CliRunner().invoke(main, ["distill", str(world["recipe"]), "-o", str(tmp_path / "out"), "--debug",
                                    "--set", f"teacher.path={tmp_path / 'none'}"])
    assert res.exit_code != 0 and type(res.exception).__name__ == "TeacherLoadError"
