"""ConsistencyPipeline: save/load round trip, CM Algorithm 1 step by step, config contents, diffusers loading,
and running without accelerate or cmdistill's training code."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from cmdistill import ConsistencyPipeline
from cmdistill.core.consistency import make_student
from cmdistill.core.denoisers import DDPMDenoiser
from cmdistill.core.sampling import sample_consistency
from conftest import tiny_unet

SIGMAS4 = [157.40726936571173, 20.0, 2.0, 0.2]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def student():
    """A tiny random student (DDPM adapter + CM boundary), in eval mode like a loaded one."""
    teacher = DDPMDenoiser(tiny_unet(seed=3), dict(DDPMScheduler(num_train_timesteps=1000).config))
    return make_student(teacher).eval()


@pytest.fixture(scope="module")
def pipe(student):
    p = ConsistencyPipeline.from_student(student, {2: [student.sigma_max, 5.0], 4: SIGMAS4})
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "student"
    pipe.save_pretrained(folder)
    return folder


def run(p, steps, seed=0, **kw):
    kw.setdefault("output_type", "latent")
    return p(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw).images


def test_save_writes_model_index_config_and_safetensors(saved, student):
    """model_index.json names the components; the sampling configuration is a component of its own, saved in its
    subfolder as a scheduler's is."""
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(saved.rglob("*.bin"))
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["consistency_config"] == ["cmdistill.export.pipeline", "ConsistencyConfig"]
    assert not {"adapter", "consistency", "multistep_sigmas"} & set(index)
    config = json.loads((saved / "consistency_config" / "consistency_config.json").read_text())
    assert config["_class_name"] == "ConsistencyConfig"
    sched = config["adapter"]["scheduler"]
    assert config["adapter"]["kind"] == "ddpm"
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (1e-4, 0.02, "linear")
    assert sched["prediction_type"] == "epsilon" and sched["num_train_timesteps"] == 1000
    cc = config["consistency"]
    assert cc["sigma_min"] == student.sigma_min and cc["sigma_max"] == student.sigma_max
    assert cc["sigma_data"] == 0.5 and cc["boundary"] == "lcm"  # the one default (core.consistency)
    assert config["multistep_sigmas"]["4"] == SIGMAS4


@pytest.mark.parametrize("steps", [1, 4])
def test_round_trip_identical(pipe, saved, steps):
    loaded = ConsistencyPipeline.from_pretrained(saved)
    a, b = run(pipe, steps), run(loaded, steps)
    assert torch.equal(a, b)
    assert not torch.equal(run(loaded, steps, seed=1), b)  # the generator really drives the output
    assert loaded.sigmas_for(steps) == pipe.sigmas_for(steps)


def test_diffusion_pipeline_from_pretrained_returns_it(pipe, saved):
    loaded = DiffusionPipeline.from_pretrained(saved)  # cmdistill is imported: the class is registered
    assert type(loaded) is ConsistencyPipeline
    assert torch.equal(run(loaded, 2), run(pipe, 2))


def test_one_step_is_f_at_sigma_max(pipe, student):
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(student.sigma_max * z, student.sigma_max)
    out = run(pipe, 1)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-5)
    assert torch.allclose(run(pipe, 1, output_type="pt"), (expected / 2 + 0.5).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("clip", [True, False])
def test_multistep_follows_algorithm_1(pipe, student, clip):
    """CM Algorithm 1; with ``clip_denoised`` (as CM's code; off by default) each intermediate sample is clamped to
    the data range before it is noised again."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        x = student(SIGMAS4[0] * z, SIGMAS4[0])
        for tau in SIGMAS4[1:]:
            x = x.clamp(-1, 1) if clip else x
            x = student(x + math.sqrt(tau**2 - student.sigma_min**2) * torch.randn(3, 1, 8, 8, generator=g), tau)
    out = run(pipe, 4, seed=7, clip_denoised=clip)  # the stored 4-step sigmas are SIGMAS4
    assert torch.allclose(out, x, rtol=1e-6, atol=1e-5)
    if clip:
        assert not torch.allclose(out, run(pipe, 4, seed=7), rtol=1e-6, atol=1e-5)  # the random student overshoots
    # explicit sigmas override the table; the package's sampler agrees
    out2 = pipe(batch_size=3, sigmas=[100.0, 1.0], generator=torch.Generator().manual_seed(1),
                output_type="latent").images
    g2 = torch.Generator().manual_seed(1)
    ref = sample_consistency(student, torch.randn(3, 1, 8, 8, generator=g2), [100.0, 1.0], generator=g2)
    assert torch.allclose(out2, ref, atol=1e-5)


def test_default_sigmas_and_checks(pipe, student):
    three = pipe.sigmas_for(3)  # not stored: the default schedule
    assert len(three) == 3 and three[0] == student.sigma_max and three[1] > three[2] > student.sigma_min
    for bad in ([1.0, 10.0], [], [student.sigma_max * 2], [1.0, student.sigma_min]):
        with pytest.raises(ValueError):
            run(pipe, 1, sigmas=bad)
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, 1, output_type="jpg")


def test_output_types(pipe):
    pt = run(pipe, 2, output_type="pt")
    npy = run(pipe, 2, output_type="np")
    pil = run(pipe, 2, output_type="pil")
    assert pt.shape == (3, 1, 8, 8) and float(pt.min()) >= 0 and float(pt.max()) <= 1
    assert npy.shape == (3, 8, 8, 1) and np.allclose(npy, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 3 and pil[0].size == (8, 8)
    out = pipe(batch_size=2, generator=torch.manual_seed(0), output_type="np", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 8, 8, 1)
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]  # one generator per image, as in diffusers
    both = pipe(batch_size=2, generator=gens, output_type="latent").images
    single = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.allclose(both[1:], single, rtol=1e-4, atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_torch_dtype_and_to(saved, pipe):
    lo = ConsistencyPipeline.from_pretrained(saved, torch_dtype=torch.bfloat16).to("cpu")
    assert lo.unet.dtype == torch.bfloat16
    out, ref = run(lo, 2, output_type="pt"), run(pipe, 2, output_type="pt")
    assert out.dtype == torch.float32 and (out - ref).abs().mean() < 0.05


def test_set_multistep_sigmas_persists(pipe, tmp_path, student):
    p = ConsistencyPipeline.from_student(student)
    p.set_multistep_sigmas({3: [student.sigma_max, 4.0, 0.5]})
    with pytest.raises(ValueError):
        p.set_multistep_sigmas({2: [student.sigma_max]})
    p.save_pretrained(tmp_path / "s")
    assert ConsistencyPipeline.from_pretrained(tmp_path / "s").sigmas_for(3) == [student.sigma_max, 4.0, 0.5]


def test_push_to_hub_uploads_a_loadable_folder(pipe, tmp_path, monkeypatch):
    import shutil

    import diffusers.utils.hub_utils as hub

    class Repo:
        repo_id = "me/cm"

    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(hub, "load_or_create_model_card", lambda *a, **kw: hub.ModelCard(""))
    monkeypatch.setattr(hub, "upload_folder", lambda repo_id, folder_path, **kw: shutil.copytree(folder_path, uploaded))
    pipe.push_to_hub("me/cm")
    assert torch.equal(run(ConsistencyPipeline.from_pretrained(uploaded), 2), run(pipe, 2))


SUBPROCESS = textwrap.dedent("""
    import json, sys
    sys.modules["accelerate"] = None          # any `import accelerate` now raises ImportError
    sys.modules["peft"] = None                # peft requires accelerate: without one a user has neither
    sys.modules["cmdistill.training"] = None  # and so does importing the training code
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    folder, expected = sys.argv[1], np.load(sys.argv[2])
    try:
        DiffusionPipeline.from_pretrained(folder)
        before = "loaded"
    except AttributeError as e:
        before = str(e)
    from cmdistill.export.pipeline import ConsistencyPipeline
    pipe = DiffusionPipeline.from_pretrained(folder)
    out = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    print(json.dumps({"before": before, "cls": type(pipe).__name__, "same": bool(np.allclose(out.numpy(), expected)),
                      "accelerate": sys.modules.get("accelerate") is None,
                      "train": sys.modules.get("cmdistill.training") is None}))
""")


def test_runs_without_accelerate_or_training_code(pipe, saved, tmp_path):
    np.save(tmp_path / "expected.npy", run(pipe, 4).numpy())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", SUBPROCESS, str(saved), str(tmp_path / "expected.npy")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # diffusers resolves `_class_name` on its own module: unknown before cmdistill registers the class
    assert "ConsistencyPipeline" in out["before"]
    assert out == {"before": out["before"], "cls": "ConsistencyPipeline", "same": True, "accelerate": True,
                   "train": True}
