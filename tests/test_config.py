"""Strict recipes: unknown keys, wrong types, overrides, and the shipped recipes resolving."""
from pathlib import Path

import pytest
import yaml

from cmdistill.commands import load_recipe
from cmdistill.config import ConfigError, dump_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.batchsize' \(did you mean 'train.batch_size'\?\)"):
        load_recipe(write(tmp_path, "train:\n  batchsize: 4\n"))
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_recipe(write(tmp_path, "trian: {}\n"))


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(ConfigError, match="'train.batch_size' must be int, got 'big'"):
        load_recipe(write(tmp_path, "train:\n  batch_size: big\n"))
    with pytest.raises(ConfigError, match="'optim.lr' must be positive"):
        load_recipe(None, ["optim.lr=0"])
    with pytest.raises(ConfigError, match="'solver.name' must be one of heun, euler, ddim; got 'hune'"):
        load_recipe(None, ["solver.name=hune"])
    with pytest.raises(ConfigError, match="student.target_decay"):
        load_recipe(None, ["student.target_decay=1.5"])


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML .* at line 3, column 1"):
        load_recipe(write(tmp_path, "train:\n  batch_size: [1,\n"))


def test_overrides_and_int_to_float(tmp_path):
    r = load_recipe(write(tmp_path, "optim:\n  lr: 1\n"), ["train.max_steps=7", "loss.huber_c=null",
                                                          "schedule.pairs=lognormal"])
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert r.train.max_steps == 7 and r.loss.huber_c is None and r.schedule.pairs == "lognormal"
    # the dump round-trips
    again = load_recipe(write(tmp_path, dump_recipe(r)))
    assert again == r


def test_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML reads ``6e-4`` as a string (YAML 1.1); a float key takes it as the number, other strings fail."""
    r = load_recipe(write(tmp_path, "optim:\n  lr: 6e-4\n"), ["student.target_decay=1E-1"])
    assert r.optim.lr == 6e-4 and r.student.target_decay == 0.1
    with pytest.raises(ConfigError, match="'optim.lr' must be float, got '6e-4x'"):
        load_recipe(None, ["optim.lr=6e-4x"])


@pytest.mark.parametrize("name", ["cifar.yaml", "digits.yaml"])
def test_shipped_recipes_resolve(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert yaml.safe_load(dump_recipe(r))["teacher"]["path"] == r.teacher.path


def test_cifar_recipe_values():
    r = load_recipe(ROOT / "recipes" / "cifar.yaml")
    assert r.teacher.path == "google/ddpm-cifar10-32" and r.data.name == "cifar10"
    assert (r.loss.distance, r.solver.name, r.schedule.num_scales, r.train.batch_size) == ("lpips", "heun", 18, 512)
    assert r.train.mixed_precision == "bf16" and r.student.target_decay == 0.0 and r.optim.name == "radam"
    assert (r.student.parametrization, r.student.sigma_max, r.student.prior) == ("v", None, "zero")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule(schedule):
    """``optim.lr_schedule``: linear warm-up, then constant (CM) or a cosine decay reaching 0 at max_steps."""
    import torch

    from cmdistill.training.optim import make_lr_schedule

    r = load_recipe(None, [f"optim.lr_schedule={schedule}", "optim.warmup_steps=2", "optim.lr=1e-3"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=r.optim.lr)
    sched = make_lr_schedule(opt, r.optim, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    if schedule == "constant":
        assert lrs[2:] == pytest.approx([1e-3] * 8)
    else:
        assert lrs[2] == pytest.approx(1e-3) and lrs[6] == pytest.approx(5e-4)
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and opt.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)


def test_data_free_keys_are_checked():
    """eval.data takes a real data set (or null); a teacher recipe cannot train on a teacher's samples."""
    from cmdistill.config import TeacherRecipe

    assert load_recipe(ROOT / "recipes" / "digits.yaml", ["eval.data=digits"]).eval.data == "digits"
    with pytest.raises(ConfigError, match=r"'eval.data' must be one of .*\(or null\); got 'digts' \(did you mean"):
        load_recipe(ROOT / "recipes" / "digits.yaml", ["eval.data=digts"])
    with pytest.raises(ConfigError, match="for distillation"):
        load_recipe(ROOT / "recipes" / "digits-teacher.yaml", ["data.name=teacher"], cls=TeacherRecipe)
