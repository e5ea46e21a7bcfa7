"""LoRA students (issue 26, item 4): adapters on the teacher's own network, the teacher being that network with the
adapters off; target and EMA over the adapters alone; the export loads in diffusers with ``load_lora_weights`` and
samples with ``LCMScheduler`` to the images of the merged student (tiny random SD components, no downloads)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import LCMScheduler, StableDiffusionPipeline  # noqa: E402

from test_text_teacher import TEXT_RECIPE, tiny_sd, write_captions  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("sd"), seed=3)


def states(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 16, generator=g)  # [B, L=8 tokens, D=16] text-encoder states of the tiny encoder


def test_adapters_share_the_teachers_network_and_the_teacher_is_the_base(sd_folder):
    """After the student's adapter has moved, the teacher view still computes the original network exactly, the
    student differs, the target/EMA adapters follow only by their lerps, and a gradient reaches the student's adapter
    even when another view ran between its forward and backward passes."""
    from cmdistill.core.consistency import make_student, make_target, update_target
    from cmdistill.core.lora import DEFAULT_TARGET_MODULES, LoraSpec, adapter_tensors
    from cmdistill.teachers import load_teacher

    teacher = load_teacher(str(sd_folder))
    reference = load_teacher(str(sd_folder))  # an untouched copy
    x, sigma, c = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0]), {"encoder_hidden_states": states()}
    before = reference(x, sigma, **c)
    student = make_student(teacher, lora=LoraSpec(4, 8.0, DEFAULT_TARGET_MODULES))
    target = make_target(student, 0.5)
    assert student.denoiser.net is teacher.net is target.denoiser.net  # one network
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in teacher.net.named_parameters() if p.requires_grad)
    assert {id(p) for p in trainable} == {id(p) for p in adapter_tensors(teacher.net, "student")}
    torch.testing.assert_close(student.denoise(x, sigma, **c), before)  # B = 0: the student starts as the teacher
    with torch.no_grad():
        for p in adapter_tensors(teacher.net, "student"):
            p.add_(0.05 * torch.randn_like(p))
    out = student(x, sigma, **c)
    with torch.no_grad():
        t_out = target(x, sigma, **c)  # another view between forward and backward
        assert torch.equal(teacher(x, sigma, **c), before)  # adapters off: the base network, bit for bit
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_tensors(teacher.net, "student")
               if ".lora_B." in next(n for n, q in teacher.net.named_parameters() if q is p))
    assert all(p.grad is None for p in adapter_tensors(teacher.net, "target"))
    with torch.no_grad():  # the target adapter is still the start (B = 0): the teacher's denoiser
        torch.testing.assert_close(target.denoise(x, sigma, **c), before)
        assert not torch.allclose(t_out, out)
    s0 = [t.clone() for t in adapter_tensors(teacher.net, "student")]
    g0 = [t.clone() for t in adapter_tensors(teacher.net, "target")]
    update_target(target, student, 0.5)
    for t, a, b in zip(adapter_tensors(teacher.net, "target"), g0, s0):
        torch.testing.assert_close(t, 0.5 * a + 0.5 * b)


LORA_RECIPE = TEXT_RECIPE.replace("guidance: {{scale: 3.0, w_min: 1.0, w_max: 6.0}}", "guidance: {{scale: 3.0}}") \
    + "student: {{target_decay: 0.5, ema_decay: 0.9, lora: {{rank: 4, alpha: 8}}}}\noptim: {{lr: 0.01}}\n"


@pytest.fixture(scope="module")
def lora_run(sd_folder, tmp_path_factory):
    from click.testing import CliRunner

    from cmdistill.cli import main
    from conftest import _threads

    tmp = tmp_path_factory.mktemp("lorarun")
    write_captions(tmp / "data")
    recipe = tmp / "lora.yaml"
    recipe.write_text(LORA_RECIPE.format(teacher=sd_folder, data=tmp / "data", cache=tmp / "cache")
                      .replace("max_steps: 2, checkpoint_every: 2", "max_steps: 3, checkpoint_every: 1"))
    with _threads(1):
        res = CliRunner().invoke(main, ["distill", str(recipe), "-o", str(tmp / "run")])
    assert res.exit_code == 0, res.output
    return tmp


def test_lora_export_loads_with_load_lora_weights_and_equals_the_merged_student(lora_run, sd_folder):
    """``<run>/lora`` onto the teacher's StableDiffusionPipeline (``load_lora_weights``, LCMScheduler, no CFG: the
    guidance is distilled) gives the images of ``<run>/student`` (the same adapter merged) through
    ConsistencyPipeline, at 1 and 4 steps from the same latents, prompts and generator; the adapter moved."""
    from safetensors.torch import load_file

    from cmdistill import ConsistencyPipeline

    lora = lora_run / "run" / "lora"
    tensors = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert tensors and all(k.startswith("unet.") and "lora_" in k for k in tensors)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in tensors.items())  # trained away from B = 0
    sd = StableDiffusionPipeline.from_pretrained(sd_folder)
    sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
    sd.load_lora_weights(str(lora))
    ours = ConsistencyPipeline.from_pretrained(lora_run / "run" / "student")
    assert ours.unet.config.time_cond_proj_dim is None  # a fixed-w student: no guidance input, as LCM-LoRA
    prompts = ["a red bag", "a photo of a sneaker"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for steps in (4, 1):
        kw = dict(latents=z.clone(), num_inference_steps=steps, output_type="np")
        a = ours(prompt=prompts, generator=torch.Generator().manual_seed(2), **kw).images
        b = sd(prompts, guidance_scale=1.0, generator=torch.Generator().manual_seed(2), **kw).images
        np.testing.assert_allclose(a, b, atol=1e-3)
    sd.unload_lora_weights()  # the base alone samples other images: the LoRA is what made them
    base = sd(prompts, guidance_scale=1.0, generator=torch.Generator().manual_seed(2), latents=z.clone(),
              num_inference_steps=1, output_type="np").images
    assert np.abs(base - a).max() > 1e-3


def test_lora_checkpoints_hold_the_adapters_only(lora_run):
    from safetensors.torch import load_file

    ckpt = sorted((lora_run / "run" / "checkpoints").glob("step_*"))[-1]
    for name in ("ema", "target"):
        t = load_file(str(ckpt / f"{name}.safetensors"))
        assert set(t) - {"step"} and all(k.startswith("lora.") and "lora_" in k for k in t if k != "step")
    student = load_file(str(ckpt / "model.safetensors"))  # accelerate's file: the student's adapter, not the base
    assert student and all("lora_" in k and ".student." in k for k in student)
    assert sum(v.numel() for v in student.values()) == sum(
        v.numel() for v in load_file(str(lora_run / "run" / "lora" / "pytorch_lora_weights.safetensors")).values())
    card = (lora_run / "run" / "lora" / "README.md").read_text()
    assert "load_lora_weights" in card and "LCMScheduler" in card


@pytest.mark.parametrize("line, override, message", [
    ("guidance: {{scale: 3.0}}", "guidance: {{scale: 3.0, w_min: 1.0, w_max: 6.0}}", "no guidance-scale input"),
    ("eval: {{at_end: false}}", "eval: {{at_end: false, curve: true}}", "curve of LoRA students is not built"),
    ("lora: {{rank", "boundary: lcm, lora: {{rank", "sampled by diffusers' LCMScheduler"),
    ("lora: {{rank", "prior: data_mean, lora: {{rank", "student.prior: 'data_mean'"),
    ("lora: {{rank", "lora: {{target_modules: [no_such_layer], rank", "'student.lora.target_modules': LoRA target"),
])
def test_lora_refusals_are_one_line(sd_folder, tmp_path, line, override, message):
    from click.testing import CliRunner

    from cmdistill.cli import main

    recipe = tmp_path / "r.yaml"
    text = LORA_RECIPE.replace(line, override)
    recipe.write_text(text.format(teacher=sd_folder, data=write_captions(tmp_path / "data", n=2),
                                  cache=tmp_path / "cache"))
    res = CliRunner().invoke(main, ["distill", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_resumed_lora_run_ends_with_the_same_adapter(lora_run):
    """Resumed from its step-2 checkpoint (student, target and EMA adapters, optimizer, RNG), the run's third step
    gives the adapter the uninterrupted run exported, bit for bit."""
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from cmdistill.cli import main
    from conftest import _threads

    copy = lora_run / "resumed"
    shutil.copytree(lora_run / "run", copy)
    for done in ("checkpoints/step_00000003", "lora", "student"):  # the resumed run must write them itself
        shutil.rmtree(copy / done)
    with _threads(1):
        res = CliRunner().invoke(main, ["distill", str(lora_run / "lora.yaml"), "-o", str(copy), "--resume", "latest"])
    assert res.exit_code == 0 and "at step 2" in res.output, res.output
    a = load_file(str(lora_run / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(copy / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_student_of_a_pixel_teacher_is_one_line(tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from cmdistill.cli import main
    from test_distill_cli import tiny_args

    res = CliRunner().invoke(main, tiny_args(tiny_teacher_dir, tmp_path / "run", 2) + ["--set", "student.lora.rank=4"])
    assert res.exit_code == 2 and "built for text-conditional U-Nets" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_teacher_fingerprint_ignores_the_adapters(sd_folder):
    """A LoRA student's teacher is the base network: its fingerprint (which names a trajectory bank) is the plain
    teacher's, before and after the adapters move."""
    from cmdistill.core.consistency import make_student
    from cmdistill.core.lora import LoraSpec, adapter_tensors
    from cmdistill.teachers import load_teacher
    from cmdistill.training.bank import teacher_fingerprint

    plain = teacher_fingerprint(load_teacher(str(sd_folder)))
    teacher = load_teacher(str(sd_folder))
    make_student(teacher, lora=LoraSpec(4, 4.0))
    assert teacher_fingerprint(teacher) == plain
    with torch.no_grad():
        adapter_tensors(teacher.net, "student")[0].add_(1.0)
    assert teacher_fingerprint(teacher) == plain
    with torch.no_grad():
        next(p for n, p in teacher.net.named_parameters() if "lora_" not in n).add_(1.0)
    assert teacher_fingerprint(teacher) != plain


def lora_pair(folder, dtype=None, rank: int = 4):
    from cmdistill.core.consistency import make_student, make_target
    from cmdistill.core.lora import LoraSpec, adapter_tensors
    from cmdistill.teachers import load_teacher

    teacher = load_teacher(str(folder), dtype=dtype)
    student = make_student(teacher, lora=LoraSpec(rank, 2.0 * rank))
    with torch.no_grad():  # move the student's adapter off its start (B = 0)
        for t in adapter_tensors(teacher.net, "student"):
            t.add_(0.02 * torch.randn_like(t))
    return teacher, student, make_target(student, 0.5)


def test_gradient_checkpointing_recomputes_with_the_students_adapter(sd_folder):
    """diffusers' checkpointing re-runs the student's blocks in backward, outside the call that switched its adapter
    on: at rest the student's adapter is the one on, so the gradients equal those without checkpointing (with the
    target's adapter called between forward and backward)."""
    x, sigma, c = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 9.0]), {"encoder_hidden_states": states()}
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        teacher, student, target = lora_pair(sd_folder)
        if ckpt:
            teacher.net.enable_gradient_checkpointing()
        out = student(x, sigma, **c)
        with torch.no_grad():
            target(x, sigma, **c)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_an_fp16_base_gets_fp32_adapters_and_merges_in_fp32(sd_folder):
    """On a teacher loaded in fp16 the adapters are fp32 master weights, and the exported merge is
    ``W + (alpha / r) B A`` computed in fp32 (an fp16 merge would round small updates away)."""
    from cmdistill.core.lora import ADAPTERS, adapter_tensors, merged_network

    teacher, student, _ = lora_pair(sd_folder, dtype=torch.float16)
    assert {t.dtype for name in ADAPTERS for t in adapter_tensors(teacher.net, name)} == {torch.float32}
    merged = merged_network(teacher.net, "student")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    layer = teacher.net.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    delta = layer.scaling["student"] * layer.lora_B["student"].weight @ layer.lora_A["student"].weight
    want = layer.base_layer.weight.float() + delta
    got = merged.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert (got != layer.base_layer.weight.float()).any()
