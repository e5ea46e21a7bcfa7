"""Issue 11: the layer rule, and one test per defect fixed there (half-precision timesteps, the student's
initial weights, the teacher grid's last point, teachers that loaded silently wrong, defaults that disagreed, the
install, one-line errors in every command, the recipe left unmodified, the multistep clamp)."""
from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from conftest import REPO, save_teacher, tiny_unet

PKG = REPO / "cmdistill"


# --------------------------------------------------------------------------- the layer rule


def _cmdistill_imports(path: Path) -> set[str]:
    """Absolute names of the cmdistill modules a file imports (relative imports resolved)."""
    mod = path.relative_to(REPO).with_suffix("").parts
    package = mod[:-1] if mod[-1] != "__init__" else mod[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + tuple(filter(None, [node.module])))
            else:
                name = node.module or ""
            targets = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] == "cmdistill")
    return out


# every layer of the package and the layers it may import from (docs/architecture.md): arrows point down only, and
# training and export/evaluation are two columns that never import each other (commands.py composes them)
BASE = {"core", "files", "images", "machine"}
INPUTS = BASE | {"prompts", "tokenizer", "data", "teachers", "latents", "config"}
MAY_IMPORT = {
    "core": set(), "files": set(), "images": {"core"}, "machine": set(),
    "prompts": BASE, "tokenizer": BASE, "data": BASE, "teachers": BASE | {"prompts"},
    "latents": BASE | {"prompts", "data", "teachers"}, "config": BASE | {"data", "teachers"},
    "training": INPUTS, "export": BASE | {"prompts"}, "evaluation": INPUTS | {"export"},
    "commands": INPUTS | {"training", "export", "evaluation"},
    "cli": INPUTS | {"training", "export", "evaluation", "commands"},
    "__main__": {"cli"}, "__init__": {"export", "core", "teachers", "commands"},
}
PACKAGES = ("core", "training", "export", "evaluation")


def _layer(name: str) -> str:
    """The layer of a dotted cmdistill module name: its sub-package, or the edge module itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def upward_imports(path: Path) -> list[str]:
    """The imports of ``path`` that break the layer rule."""
    me = _layer(_module_name(path))
    bad = []
    for name in _cmdistill_imports(path):
        other = _layer(name)
        if other not in MAY_IMPORT:  # ``from cmdistill import something``: the package's top level
            other = "__init__"
        if (other == me and me in PACKAGES) or (name == "cmdistill" and me == "__init__"):
            continue
        if other not in MAY_IMPORT[me]:
            bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_every_module_has_a_layer():
    modules = sorted(PKG.rglob("*.py"))
    assert len(modules) > 40
    assert {_layer(_module_name(f)) for f in modules} <= MAY_IMPORT.keys()


def test_layers_import_only_downwards():
    """Every module of the package, core to cli, imports only from the layers below it."""
    bad = [b for f in sorted(PKG.rglob("*.py")) for b in upward_imports(f)]
    assert not bad, bad


@pytest.mark.parametrize("where, line", [
    ("core", "from ..training.loop import train\n"),
    ("core", "from .. import config\n"),
    ("training", "from ..export.pipeline import save_student\n"),
    ("evaluation", "from ..training.distill import Distillation\n"),
    ("export", "from ..config import Recipe\n"),
    ("config", "from .training.loop import train\n"),  # config.py importing training: the cycle the rule forbids
    ("files", "from .data import DATASETS\n"),
])
def test_layer_check_catches_a_violation(where, line):
    """The check above can fail: an upward import planted in each layer is found."""
    package = where in PACKAGES
    f = PKG / where / "_probe_upward.py" if package else PKG / f"_probe_{where}.py"
    if not package:
        MAY_IMPORT[f.stem] = MAY_IMPORT[where]
    f.write_text(line)
    try:
        assert upward_imports(f), line
    finally:
        f.unlink()
        MAY_IMPORT.pop(f.stem, None)


def test_docstrings_cite_papers_not_design_notes():
    hits = [str(f.relative_to(REPO)) for f in PKG.rglob("*.py") if "DESIGN §" in f.read_text()]
    assert not hits, hits


# --------------------------------------------------------------------------- 6. half-precision timesteps


class RecordingNet(torch.nn.Module):
    """Stands in for a U-Net with bf16 weights: records what it is called with, returns zeros."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((x.dtype, t.clone()))
        return torch.zeros_like(x)


def test_teacher_timesteps_stay_fp32_with_half_weights():
    from diffusers import DDPMScheduler

    from cmdistill.core.denoisers import DDPMDenoiser

    net = RecordingNet()
    den = DDPMDenoiser(net, dict(DDPMScheduler(num_train_timesteps=1000).config))
    sigma = den.sigma_table[[600, 801, 950]].float() * 1.001  # fractional timesteps in [512, 1024)
    den(torch.randn(3, 1, 4, 4), sigma)
    x_dtype, t = net.calls[-1]
    assert x_dtype == torch.bfloat16  # the network input follows the weights
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, den.sigma_to_t(sigma), rtol=0, atol=0)
    assert not torch.equal(t, t.round())  # fractional, and not rounded to bf16's multiples of 4
    assert not torch.equal(t, t.to(torch.bfloat16).float())


# --------------------------------------------------------------------------- 7. the student's initial weights


def test_student_starts_from_full_precision_weights_with_a_half_teacher(tiny_teacher_dir):
    from cmdistill.commands import load_recipe
    from cmdistill.teachers import load_teacher
    from cmdistill.training.distill import build_models

    recipe = load_recipe(None, [f"teacher.path={tiny_teacher_dir}", "teacher.dtype=bf16", "data.name=digits"])
    teacher, student, target, _ = build_models(recipe, torch.device("cpu"))
    ref = load_teacher(str(tiny_teacher_dir)).net.state_dict()
    assert next(teacher.net.parameters()).dtype == torch.bfloat16  # teacher.dtype is honoured
    for k, v in student.denoiser.net.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ref[k]), k
    assert torch.equal(next(target.parameters()), next(student.parameters()))


# --------------------------------------------------------------------------- 8. teacher grid reaches sigma_min


def test_teacher_grid_pairs_reach_the_boundary():
    from cmdistill.core.schedules import PairSchedule, ddpm_betas, vp_sigmas_from_betas

    table = vp_sigmas_from_betas(ddpm_betas())
    ps = PairSchedule("teacher", float(table[0]), float(table[-1]), 18, table=table, skip=20)
    _, lo = ps.sample(4096, 0)
    assert torch.isclose(lo.min(), table[0].float())


# --------------------------------------------------------------------------- 9. teachers that loaded silently wrong


@pytest.mark.parametrize("sched_cfg, name", [
    ({"_class_name": "CMStochasticIterativeScheduler", "num_train_timesteps": 40, "sigma_min": 0.002,
      "sigma_max": 80.0}, "CMStochasticIterativeScheduler"),
    ({"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000, "sigma_min": 0.01, "sigma_max": 1348.0},
     "ScoreSdeVeScheduler"),
])
def test_unsupported_scheduler_is_refused_in_one_line(tmp_path, sched_cfg, name):
    from cmdistill.teachers import TeacherLoadError, load_teacher

    folder = save_teacher(tmp_path / "t", tiny_unet(), layout="flat")
    (folder / "scheduler_config.json").write_text(json.dumps(sched_cfg))
    for kind in ("auto", "ddpm"):
        with pytest.raises(TeacherLoadError, match=name):
            load_teacher(str(folder), kind)
    res = CliRunner().invoke(main, ["sample", "--teacher", str(folder), "--num", "2"])
    assert res.exit_code == 2 and name in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_zero_terminal_snr_teacher_has_the_rescaled_table(tmp_path):
    from diffusers import DDPMScheduler

    from cmdistill.teachers import load_teacher

    folder = save_teacher(tmp_path / "zsnr", tiny_unet(), rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    den = load_teacher(str(folder))
    abar = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    assert abar[-1] == 0  # sigma = inf at t = 999: outside EDM space, so the trained range ends at t = 998
    ref = ((1 - abar[:-1]) / abar[:-1]).sqrt()
    assert len(den.sigma_table) == 999
    torch.testing.assert_close(den.sigma_table, ref, rtol=1e-6, atol=0)
    plain = load_teacher(str(save_teacher(tmp_path / "plain", tiny_unet(), beta_schedule="scaled_linear",
                                          beta_start=0.00085, beta_end=0.012)))
    assert den.sigma_max > 10 * plain.sigma_max  # the rescaled table, not the default one
    from cmdistill.core.sampling import teacher_sigmas

    s = teacher_sigmas(den, 4)
    assert torch.isfinite(s).all() and s[0] == den.sigma_table[-1].float()


# --------------------------------------------------------------------------- 10. one default each


def test_boundary_default_is_the_same_everywhere():
    import inspect

    from diffusers import DDPMScheduler

    from cmdistill.config import StudentConfig
    from cmdistill.core.consistency import DEFAULT_BOUNDARY, ConsistencyFunction, make_student, resolve_boundary
    from cmdistill.core.denoisers import DDPMDenoiser

    # the recipe's "auto" is the one default for every teacher but a text U-Net (LCMScheduler's boundary there)
    assert DEFAULT_BOUNDARY == "lcm" and StudentConfig().boundary == "auto"
    den = DDPMDenoiser(tiny_unet(), dict(DDPMScheduler(num_train_timesteps=1000).config))
    assert resolve_boundary("auto", den) == DEFAULT_BOUNDARY == make_student(den, "auto").boundary
    for fn in (ConsistencyFunction.__init__, make_student):
        assert inspect.signature(fn).parameters["boundary"].default == DEFAULT_BOUNDARY


def test_pipeline_without_a_boundary_key_uses_the_default(tmp_path):
    from diffusers import DDPMScheduler

    from cmdistill.core.denoisers import DDPMDenoiser
    from cmdistill.export.pipeline import ConsistencyConfig, ConsistencyPipeline

    den = DDPMDenoiser(tiny_unet(), dict(DDPMScheduler(num_train_timesteps=1000).config))
    pipe = ConsistencyPipeline(unet=den.net, consistency_config=ConsistencyConfig(adapter=den.adapter_config(),
                                                                                  consistency={}))
    assert pipe.consistency_function.boundary == "lcm"


def test_teacher_spacing_default_is_the_same_everywhere():
    from cmdistill.cli import evaluate, sample
    from cmdistill.core.schedules import DEFAULT_TEACHER_SPACING

    opts = {p.name: p for p in sample.params} | {p.name: p for p in evaluate.params}
    assert opts["spacing"].default == opts["teacher_spacing"].default == DEFAULT_TEACHER_SPACING


# --------------------------------------------------------------------------- 11. install


def test_non_editable_install_finds_its_assets_from_any_folder(tmp_path):
    """``pip install .`` (not editable) into a folder, then run from elsewhere: the digits classifier that the
    offline FID needs is found inside the installed package."""
    import shutil

    src, target = tmp_path / "src", tmp_path / "site"  # a copy: building writes build/ and *.egg-info beside it
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import cmdistill.evaluation.features as F; p = F.find_digits_classifier(); "
            "print(p); assert p is not None and 'site' in str(p), p; F.load_classifier(p)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("CMDISTILL_DIGITS_CLASSIFIER", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_torch_floor_is_stated_and_no_newer_api_is_used():
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.13"' in text
    src = "\n".join(f.read_text() for f in PKG.rglob("*.py"))
    assert "get_total_norm" not in src  # torch >= 2.6 only; the loop uses its own total_norm


def test_total_norm_matches_torch():
    from cmdistill.training.optim import total_norm

    grads = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2)]
    ref = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(total_norm(grads), ref)


# --------------------------------------------------------------------------- 12. one line for bad input


def _one_line_exit_2(args, expect: str):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmdistill: error: ") and expect in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory, tiny_teacher_dir):
    d = tmp_path_factory.mktemp("bad_students")
    (d / "empty").mkdir()
    (d / "corrupt").mkdir()
    (d / "corrupt" / "model_index.json").write_text("{not json")
    (d / "run").mkdir()
    (d / "run" / "recipe.yaml").write_text("train: {max_steps: 2}\n")
    return {"missing": (d / "missing", "does not exist"), "empty": (d / "empty", "no model_index.json"),
            "corrupt": (d / "corrupt", "not valid JSON"),
            "foreign": (Path(tiny_teacher_dir), "DDPMPipeline pipeline, not a ConsistencyPipeline"),
            "run without a student": (d / "run", "run folder without a student")}


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "foreign", "run without a student"])
def test_sample_and_pipeline_refuse_bad_student_folders(bad_folders, case):
    from cmdistill.export.pipeline import ConsistencyPipeline, StudentLoadError

    folder, expect = bad_folders[case]
    _one_line_exit_2(["sample", "--student", folder, "--num", "2"], expect)
    with pytest.raises(StudentLoadError, match=expect):
        ConsistencyPipeline.from_pretrained(str(folder))


@pytest.mark.parametrize("case, expect", [("missing", "no recipe.yaml"), ("empty", "no recipe.yaml"),
                                          ("run without a student", "run folder without a student")])
def test_evaluate_refuses_bad_run_folders(bad_folders, case, expect):
    folder, _ = bad_folders[case]
    if case == "run without a student":  # a real recipe that names a loadable teacher and data
        (folder / "recipe.yaml").write_text(f"teacher: {{path: {bad_folders['foreign'][0]}}}\n"
                                            "data: {name: digits}\n")
    _one_line_exit_2(["evaluate", folder, "--num", "2", "--feature-net", "digits"], expect)


def test_evaluate_refuses_a_corrupt_recipe(tmp_path):
    (tmp_path / "recipe.yaml").write_text("train: [unclosed\n")
    _one_line_exit_2(["evaluate", tmp_path, "--num", "2"], "malformed YAML")


def test_train_teacher_refuses_bad_data_before_writing(tmp_path):
    out = tmp_path / "run"
    _one_line_exit_2(["train-teacher", REPO / "recipes" / "digits-teacher.yaml", "-o", out, "--set",
                      "data.name=imagefolder", "--set", f"data.root={tmp_path / 'nowhere'}"], "does not exist")
    assert not out.exists()  # data checked before the output folder is prepared


def test_train_classifier_never_overwrites(tmp_path):
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "model.safetensors").write_text("x")
    _one_line_exit_2(["train-classifier", "--out", tmp_path / "clf"], "already exists")
    assert (tmp_path / "clf" / "model.safetensors").read_text() == "x"
    out = [p for p in main.commands["train-classifier"].params if p.name == "out"][0]
    assert out.default is None and "runs/<data>-classifier" in out.help  # never inside the package


def _options():
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help", "version"):
                yield name, p


@pytest.mark.parametrize("name, opt", list(_options()), ids=lambda v: v if isinstance(v, str) else v.name)
def test_every_option_is_documented(name, opt):
    assert opt.help and len(opt.help) > 8, f"{name} {opt.opts}: no help text"
    if not opt.is_flag:
        assert opt.show_default, f"{name} {opt.opts}: default not shown"
    if isinstance(opt.type, (click.types.IntParamType, click.types.FloatParamType)):
        assert isinstance(opt.type, (click.IntRange, click.FloatRange)), f"{name} {opt.opts}: numbers need a range"


# --------------------------------------------------------------------------- 13. small truths


def test_distill_does_not_modify_its_recipe(tiny_teacher_dir, tmp_path):
    from cmdistill.commands import distill
    from cmdistill.commands import load_recipe

    r = load_recipe(None, [f"teacher.path={tiny_teacher_dir}", "data.name=digits", "data.hflip=false",
                           "data.num_workers=0", "loss.distance=l2", "train.batch_size=4", "train.max_steps=1",
                           "train.num_sample_images=2", "eval.at_end=false"])
    before = copy.deepcopy(r)
    torch.set_num_threads(1)
    distill(r, output_dir=tmp_path / "run")
    assert r == before and r.train.output_dir == "runs/cd"
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()


def test_multistep_sampler_clamps_between_steps_only_when_asked():
    """CM Algorithm 1 with clip_denoised: each intermediate x is clamped to [-1, 1] before it is noised again (as
    CM's code and diffusers' CMStochasticIterativeScheduler do); the returned sample is not clamped. The default
    is not to clamp (measured worse on digits), and the pipeline follows it."""
    import inspect

    from cmdistill.core.sampling import sample_consistency
    from cmdistill.export.pipeline import ConsistencyPipeline

    assert inspect.signature(sample_consistency).parameters["clip_denoised"].default is False
    assert inspect.signature(ConsistencyPipeline.__call__).parameters["clip_denoised"].default is False

    class Loud(torch.nn.Module):  # f(x, sigma) = 3 x: pushes samples far outside the data range
        sigma_min, sigma_max = 0.002, 80.0

        def forward(self, x, sigma):
            return 3 * x

    z = torch.randn(2, 1, 4, 4)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = sample_consistency(Loud(), z, [80.0, 1.0], generator=g1, clip_denoised=True)
    x1 = 3 * (80.0 * z)
    expect = 3 * (x1.clamp(-1, 1) + (1.0 - 0.002**2) ** 0.5 * torch.randn(x1.shape, generator=g2))
    torch.testing.assert_close(out, expect)
    assert out.abs().max() > 1  # the final sample is returned as is
    raw = sample_consistency(Loud(), z, [80.0, 1.0], generator=torch.Generator().manual_seed(0))
    assert raw.abs().max() > 100

