"""Text-conditional teachers (issue 26): a Stable Diffusion-layout teacher through cmdistill's network seam equals
diffusers' StableDiffusionPipeline from the same latents and prompts; a student with LCM's native guidance input and
LCMScheduler's boundary is what diffusers' LatentConsistencyModelPipeline samples. Tiny random components, built
here (the tokenizer's vocabulary too): no downloads."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)

from cmdistill.core.autoencoders import decode_latents  # noqa: E402
from cmdistill.core.consistency import make_student  # noqa: E402
from cmdistill.core.guidance import NativeGuidanceEmbedding, attach_guidance, guided_teacher  # noqa: E402
from cmdistill.core.networks import (UnsupportedNetwork, condition_keys, family_of, guidance_input,  # noqa: E402
                                     null_condition)
from cmdistill.core.sampling import sample_consistency, sample_ode, teacher_sigmas  # noqa: E402

WORDS = ["a", "photo", "of", "sneaker", "grey", "ankle", "boot", "bag", "red", "trouser"]


def tiny_sd(folder, seed: int = 0, scheduler=None):
    """A StableDiffusionPipeline of tiny random components saved to ``folder`` (16x16 RGB images, 4x8x8 latents,
    a 2-layer CLIP text encoder of width 16 over a written 10-word vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from cmdistill.tokenizer import write_clip_tokenizer

    tok = write_clip_tokenizer(folder / "tok-src", WORDS, max_length=8)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    with torch.no_grad():  # diffusers zero-starts some output layers: make every part of the tiny U-Net matter
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = scheduler or DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("sd"))


def test_text_unet_family_keys_null_and_native_input(sd_folder):
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    assert family_of(unet).name == "unet_text" and condition_keys(unet) == ("encoder_hidden_states",)
    assert guidance_input(unet) is None  # a Stable Diffusion teacher has no guidance input of its own
    with pytest.raises(ValueError, match="empty prompt"):
        null_condition(unet)
    sdxl = UNet2DConditionModel.from_config({**dict(unet.config), "addition_embed_type": "text_time",
                                             "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 24})
    with pytest.raises(UnsupportedNetwork, match="SDXL"):
        family_of(sdxl)


def test_prompt_encoder_equals_the_pipelines_encode_prompt(sd_folder):
    from cmdistill.teachers import load_teacher, text_encoder

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    prompts = ["a photo of a sneaker", "a grey ankle boot"]
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    torch.testing.assert_close(text_encoder(sd_folder)(prompts), cond)
    teacher = load_teacher(str(sd_folder))  # loading a text teacher embeds the empty prompt once: guidance's null
    torch.testing.assert_close(teacher.empty_condition.expand_as(uncond), uncond)
    assert not torch.allclose(cond[0], cond[1])


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_text_teacher_cfg_ddim_equals_stable_diffusion_pipeline(sd_folder, guidance_scale):
    """The teacher's CFG DDIM-k through cmdistill (loaded from the StableDiffusionPipeline folder: network seam, VP
    adapter, guided teacher with the empty prompt as the null condition) equals diffusers' StableDiffusionPipeline
    with its DDIMScheduler from the same latents and prompts, decoded by the same VAE."""
    from cmdistill.latents import load_teacher_vae
    from cmdistill.teachers import load_teacher, text_encoder

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    prompts = ["a photo of a sneaker", "a red bag"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompts, latents=z.clone(), num_inference_steps=5, guidance_scale=guidance_scale,
               output_type="np").images
    teacher, vae = load_teacher(str(sd_folder)), load_teacher_vae(str(sd_folder))
    den = guided_teacher(teacher, guidance_scale)
    with torch.no_grad():
        lat = sample_ode(den, z, teacher_sigmas(den, 5, spacing=None), "ddim",
                         encoder_hidden_states=text_encoder(sd_folder)(prompts))
        ours = (decode_latents(vae, lat) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ref.shape == ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    other = pipe(["a grey ankle boot", "a photo of a trouser"], latents=z.clone(), num_inference_steps=5,
                 guidance_scale=guidance_scale, output_type="np").images
    assert np.abs(other - ref).max() > 1e-2  # the prompt matters at this tolerance


def lcm_student(sd_folder, seed: int = 1):
    """A guided student of the tiny SD teacher with LCM's conventions (native ``time_cond_proj_dim`` input, the
    lcm_scheduler boundary), its new guidance projection moved off zero so that ``w`` matters."""
    from cmdistill.teachers import load_teacher

    student = make_student(load_teacher(str(sd_folder)), boundary="lcm_scheduler").eval()
    attach_guidance(student, 3.0, (1.0, 8.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        student.denoiser.net.time_embedding.cond_proj.weight.normal_(0, 0.5)
    return student


def test_a_text_student_gets_a_zero_started_native_guidance_input(sd_folder):
    from cmdistill.teachers import load_teacher

    teacher = load_teacher(str(sd_folder))
    student = make_student(teacher, boundary="lcm_scheduler")
    attach_guidance(student, 3.0, (1.0, 8.0))
    net = student.denoiser.net
    assert isinstance(net, UNet2DConditionModel) and net.config.time_cond_proj_dim == 256
    assert isinstance(student.guidance_embedding, NativeGuidanceEmbedding) and guidance_input(net) == "timestep_cond"
    assert not list(student.guidance_embedding.parameters())  # its weights are the U-Net's cond_proj
    x, s = torch.randn(2, 4, 8, 8) * 3, torch.tensor([2.0, 0.5])
    cond = {"encoder_hidden_states": torch.randn(2, 8, 16)}
    with torch.no_grad():  # zero-started: at every w the student's F is the teacher's denoiser
        for w in (1.0, 6.0):
            torch.testing.assert_close(student.denoise(x, s, w, **cond), teacher(x, s, **cond))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_student_equals_diffusers_latent_consistency_pipeline(sd_folder, tmp_path, steps):
    """The student's U-Net, saved with the teacher's VAE, text encoder and tokenizer and an LCMScheduler of the
    teacher's betas, is a LatentConsistencyModelPipeline; sampled by diffusers at guidance_scale w from the same
    latents and generator it gives the images cmdistill's consistency sampler gives at w (LCM's w - 1 embedding,
    LCMScheduler's boundary, start and noise)."""
    from cmdistill.latents import load_teacher_vae
    from cmdistill.teachers import text_encoder

    student = lcm_student(sd_folder)
    sd = StableDiffusionPipeline.from_pretrained(sd_folder)
    lcm = LatentConsistencyModelPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                         unet=student.denoiser.net, scheduler=LCMScheduler.from_config(sd.scheduler.config),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lcm.save_pretrained(tmp_path / "lcm")
    lcm = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "lcm")
    prompts, w = ["a photo of a sneaker", "a red bag"], 4.0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = lcm(prompts, latents=z.clone(), num_inference_steps=steps, guidance_scale=w, output_type="np",
              generator=torch.Generator().manual_seed(7)).images
    lcm.scheduler.set_timesteps(steps)
    sigmas = student.denoiser.sigma_table[lcm.scheduler.timesteps].tolist()
    vae = load_teacher_vae(str(sd_folder))
    with torch.no_grad():
        lat = sample_consistency(student, z, sigmas, generator=torch.Generator().manual_seed(7), guidance_scale=w,
                                 encoder_hidden_states=text_encoder(sd_folder)(prompts))
        ours = (decode_latents(vae, lat) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    other = lcm(prompts, latents=z.clone(), num_inference_steps=steps, guidance_scale=1.5, output_type="np",
                generator=torch.Generator().manual_seed(7)).images
    assert np.abs(other - ref).max() > 1e-2  # w reaches the network through the native input


def test_lcm_scheduler_boundary_is_lcmschedulers_scalings(sd_folder):
    """The lcm_scheduler boundary in EDM space is LCMScheduler's discrete boundary on the VP sample: c_skip times
    sqrt(1 + sigma^2) and c_out equal ``get_scalings_for_boundary_condition_discrete(t)`` at the teacher's timesteps,
    and the student is exactly the identity on the VP sample at t = 0."""
    from cmdistill.core.consistency import lcm_scheduler_scalings
    from cmdistill.teachers import load_teacher

    teacher = load_teacher(str(sd_folder))
    sched = LCMScheduler.from_config(StableDiffusionPipeline.from_pretrained(sd_folder).scheduler.config)
    ts = torch.tensor([0, 1, 3, 19, 259, 999])
    sigma = teacher.sigma_table[ts].float()
    c_skip, c_out = lcm_scheduler_scalings(sigma, teacher.sigma_min, 0.5, 10.0, teacher)
    ref = [sched.get_scalings_for_boundary_condition_discrete(int(t)) for t in ts]
    torch.testing.assert_close(c_skip * (1 + sigma**2).sqrt(), torch.tensor([float(r[0]) for r in ref]))
    torch.testing.assert_close(c_out, torch.tensor([float(r[1]) for r in ref]))
    assert float(c_skip[0] * (1 + sigma[0] ** 2).sqrt()) == pytest.approx(1.0) and float(c_out[0]) == 0.0
    assert float(c_out[2]) > 0.99  # three timesteps up, the student is already (almost) its network's x0


def write_captions(folder, n: int = 8, side: int = 16, column: str = "text"):
    """An image folder with 🤗 imagefolder's metadata.jsonl: ``n`` random RGB images, two distinct captions."""
    import json

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", column: ["a photo of a sneaker", "a red bag"][i % 2], "label": i % 2})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


TEXT_RECIPE = """teacher: {{path: {teacher}}}
data: {{name: captions, root: {data}, hflip: false, num_workers: 0, latent_cache: {cache}}}
guidance: {{scale: 3.0, w_min: 1.0, w_max: 6.0}}
schedule: {{grid: teacher, skip: 100}}
solver: {{name: ddim}}
loss: {{distance: pseudo_huber}}
train: {{batch_size: 4, max_steps: 2, checkpoint_every: 2, sample_every: 2, num_sample_images: 4,
        mixed_precision: "no"}}
eval: {{at_end: false}}
"""


@pytest.fixture(scope="module")
def text_run(sd_folder, tmp_path_factory):
    """Two steps of guided distillation of the tiny SD teacher on a captioned folder (recipe defaults otherwise:
    the lcm_scheduler boundary over the teacher's whole range)."""
    from click.testing import CliRunner

    from cmdistill.cli import main
    from conftest import _threads

    tmp = tmp_path_factory.mktemp("textrun")
    write_captions(tmp / "data")
    recipe = tmp / "text.yaml"
    recipe.write_text(TEXT_RECIPE.format(teacher=sd_folder, data=tmp / "data", cache=tmp / "cache"))
    with _threads(1):
        res = CliRunner().invoke(main, ["distill", str(recipe), "-o", str(tmp / "run")])
    assert res.exit_code == 0, res.output
    return tmp


def test_captions_and_their_embeddings_are_cached_once(text_run, sd_folder):
    from safetensors.torch import load_file

    from cmdistill.teachers import text_encoder

    (cache,) = [p for p in (text_run / "cache").iterdir() if p.is_dir()]
    t = load_file(str(cache / "latents.safetensors"))
    assert t["latents"].shape == (8, 4, 8, 8) and t["prompt_ids"].tolist() == [0, 1] * 4
    # the distinct captions, sorted, embedded as diffusers embeds prompts
    torch.testing.assert_close(t["prompt_embeds"], text_encoder(sd_folder)(["a photo of a sneaker", "a red bag"]))
    manifest = (cache / "manifest.json").read_text()
    assert "text_encoder/model.safetensors" in manifest and "prompts_sha256" in manifest


def test_text_student_runs_in_both_pipelines(text_run):
    """The exported text student is a ConsistencyPipeline and, from the same folder, diffusers'
    LatentConsistencyModelPipeline: both sample it with the same images from the same latents and prompts."""
    from cmdistill import ConsistencyPipeline

    student = text_run / "run" / "student"
    ours = ConsistencyPipeline.from_pretrained(student)
    assert type(ours.scheduler).__name__ == "LCMScheduler" and ours.guidance_embedding is None
    lcm = LatentConsistencyModelPipeline.from_pretrained(student, safety_checker=None, feature_extractor=None,
                                                         requires_safety_checker=False)
    assert lcm.unet.config.time_cond_proj_dim == 256
    prompts, z = ["a red bag", "a photo of a sneaker"], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for steps in (1, 4):
        kw = dict(latents=z.clone(), num_inference_steps=steps, guidance_scale=4.5, output_type="np")
        a = ours(prompt=prompts, generator=torch.Generator().manual_seed(1), **kw).images
        b = lcm(prompts, generator=torch.Generator().manual_seed(1), **kw).images
        np.testing.assert_allclose(a, b, atol=1e-3)
    with pytest.raises(ValueError, match="guidance scales in"):
        ours(prompt=prompts, guidance_scale=7.0)
    with pytest.raises(ValueError, match="text-conditional"):
        ours(batch_size=2)
    with pytest.raises(ValueError, match="no negative_prompt"):
        ours(prompt=prompts, negative_prompt="blurry")


@pytest.mark.parametrize("damage, message", [
    ("column", "no 'text' column"), ("file", "missing image file"), ("empty", "empty or non-text"),
    ("nothing", "no captioned images")])
def test_bad_captions_are_one_line_and_nothing_is_written(sd_folder, tmp_path, damage, message):
    import json

    from click.testing import CliRunner

    from cmdistill.cli import main

    data = write_captions(tmp_path / "data", n=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    if damage == "column":
        rows = [{"file_name": r["file_name"], "caption": r["text"]} for r in rows]
    elif damage == "file":
        (data / rows[2]["file_name"]).unlink()
    elif damage == "empty":
        rows[1]["text"] = "  "
    else:
        rows = []
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "text.yaml"
    recipe.write_text(TEXT_RECIPE.format(teacher=sd_folder, data=data, cache=tmp_path / "cache"))
    res = CliRunner().invoke(main, ["distill", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_saved_hf_dataset_is_captioned_data(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from cmdistill.data import make_dataset

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(3)]
    datasets.Dataset.from_dict({"image": images, "caption": ["a red bag", "a grey boot", "a red bag"],
                                "label": [8, 9, 8]}).save_to_disk(str(tmp_path / "hf"))
    ds = make_dataset("hf_disk", str(tmp_path / "hf"), 8, 3, caption_column="caption")
    assert ds.prompts == ["a grey boot", "a red bag"] and ds.prompt_ids.tolist() == [1, 0, 1]
    x, y, pid = ds[1]
    assert x.shape == (3, 8, 8) and int(y) == 9 and int(pid) == 0 and -1 <= float(x.min()) < float(x.max()) <= 1
    from cmdistill.data import DataError

    with pytest.raises(DataError, match="no 'text' column"):
        make_dataset("hf_disk", str(tmp_path / "hf"), 8, 3)


def test_sample_prompt_for_text_student_and_teacher(text_run, sd_folder, tmp_path):
    """`cmdistill sample --prompt` on the text student and on the text teacher: images of that prompt, and the
    student's 1-step images are the pipeline's for that prompt; a prompt for a class teacher is one line."""
    from click.testing import CliRunner

    from cmdistill import ConsistencyPipeline
    from cmdistill.cli import main

    student = text_run / "run" / "student"
    res = CliRunner().invoke(main, ["sample", "--student", str(student), "--prompt", "a red bag", "-n", "3",
                                    "--guidance-scale", "2", "-o", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "s" / "samples.npz")["images"]
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ConsistencyPipeline.from_pretrained(student)(prompt="a red bag", num_images_per_prompt=3, latents=z,
                                                       guidance_scale=2.0, output_type="np").images
    assert got.shape == (3, 16, 16, 3) and np.abs(got / 255.0 - ref).max() < 1 / 255 + 1e-3
    res = CliRunner().invoke(main, ["sample", "--teacher", str(sd_folder), "--prompt", "a red bag", "-n", "2",
                                    "--steps", "3", "--guidance-scale", "3", "-o", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "t" / "samples.npz")["images"].shape == (2, 16, 16, 3)


def test_the_checkpoint_curve_of_a_text_run_scores_its_ema_like_the_exported_student(text_run, monkeypatch):
    """``evaluate --checkpoints`` on a text run: the last checkpoint's evaluation EMA, rebuilt from the teacher with the
    native guidance input and sampled on the data's captions, scores what the exported student (the same weights)
    scores from the same noise."""
    import cmdistill.evaluation.evaluate as E
    from cmdistill.evaluation.curve import evaluate_checkpoints

    run_dir = text_run / "run"
    curve = evaluate_checkpoints(run_dir, "all", num_samples=6, batch_size=6, feature_net=MeanColour(), steps=(1, 2),
                                 echo=lambda s: None)
    rep = E.evaluate(run_dir, num_samples=6, batch_size=6, max_steps=2, teacher_steps=4, feature_net=MeanColour(),
                     use_lpips=False, baselines=["dpm++2m"], baseline_nfe=[2], progress=False, echo=lambda s: None)
    last = curve["checkpoints"][-1]
    for k in (1, 2):
        assert last[str(k)]["fid"] == pytest.approx(rep["samplers"][f"student-{k}"]["fid"], rel=1e-4, abs=1e-6)


class MeanColour(torch.nn.Module):
    """A 3-number feature net (each channel's mean), enough for FID on a handful of images."""

    def forward(self, x):
        return x.float().mean(dim=(2, 3))


class AlwaysRedBag(torch.nn.Module):
    """A 'classifier' that answers class 1 (the folder's label of "a red bag") for every image."""

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.ones(len(x), dtype=torch.long), 2).float()


def test_a_text_run_is_evaluated_on_its_captions_with_prompt_agreement(text_run, sd_folder, monkeypatch):
    """``evaluate`` on a text run: the samples take the images' captions in a fixed random order, embedded as
    diffusers does and handed over batch by batch; the teacher's samplers are guided at the student's w; prompt
    agreement is the share of samples the classifier puts in their prompt's class (always "bag": the share of bag
    prompts on the captions, 1 on a file of bags), and a file of prompts the data do not know gives no agreement."""

    import cmdistill.evaluation.evaluate as E
    from cmdistill.teachers import text_encoder

    monkeypatch.setattr(E, "class_classifier", lambda run, search: AlwaysRedBag())
    run_dir = text_run / "run"
    kw = dict(num_samples=6, batch_size=4, max_steps=2, teacher_steps=4, feature_net=MeanColour(), use_lpips=False,
              baselines=["dpm++2m"], baseline_nfe=[2], progress=False, echo=lambda s: None)
    run = E.load_run(run_dir, None, "cpu")
    texts = [run.prompts.texts[int(i)] for i in run.prompts.index(6)]  # the images' captions, in a fixed random order
    assert sorted(set(texts)) == ["a photo of a sneaker", "a red bag"]
    torch.testing.assert_close(run.conditions(6)["encoder_hidden_states"][0:6], text_encoder(sd_folder)(texts))
    assert run.labels(6).tolist() == [int(t == "a red bag") for t in texts]  # the folder's label of each caption
    rep = E.evaluate(run_dir, **kw)
    assert rep["guidance_scale"] == 3.0 and rep["prompts"]["count"] == 2 and rep["prompts"]["with_classes"]
    assert {"teacher-ddim-4", "student-1", "student-2", "dpm++2m-2"} <= set(rep["samplers"])
    bags = texts.count("a red bag") / 6
    assert 0 < bags < 1 and all(e["class_accuracy"] == pytest.approx(bags) for e in rep["samplers"].values())
    assert "Prompt agreement" in (run_dir / "report.md").read_text()
    (text_run / "bags.txt").write_text("a red bag\n\n")
    rep = E.evaluate(run_dir, prompts=str(text_run / "bags.txt"), **kw)
    assert all(e["class_accuracy"] == 1.0 for e in rep["samplers"].values())
    (text_run / "other.txt").write_text("a red bag\na green hat\n")
    rep = E.evaluate(run_dir, prompts=str(text_run / "other.txt"), **kw)
    assert rep["prompts"]["count"] == 2 and not any("class_accuracy" in e for e in rep["samplers"].values())
    with pytest.raises(E.EvalError, match="no prompts"):
        (text_run / "empty.txt").write_text("\n")
        E.evaluate(run_dir, prompts=str(text_run / "empty.txt"), **kw)


def test_text_student_card_says_how_to_prompt_it(text_run):
    card = (text_run / "run" / "student" / "README.md").read_text()
    assert "text-to-image" in card and 'prompt="' in card and "LatentConsistencyModelPipeline" in card


def test_a_student_below_the_teachers_top_runs_in_lcm_pipeline_with_its_timesteps(sd_folder, tmp_path):
    """A text student distilled below the teacher's top (``student.sigma_max`` at timestep 649) stores LCM-style
    timesteps of its own range; diffusers' LatentConsistencyModelPipeline given those ``timesteps`` (stated in the
    model card) samples the images ConsistencyPipeline samples, at 1, 2 and 4 steps."""
    from cmdistill import ConsistencyPipeline
    from cmdistill.export.pipeline import lcm_scheduler_for, lcm_timesteps, save_student
    from cmdistill.latents import load_teacher_vae
    from cmdistill.teachers import load_teacher

    teacher = load_teacher(str(sd_folder))
    student = make_student(teacher, boundary="lcm_scheduler", sigma_max=float(teacher.sigma_table[649])).eval()
    attach_guidance(student, 3.0, (1.0, 8.0))
    with torch.no_grad():
        student.denoiser.net.time_embedding.cond_proj.weight.normal_(0, 0.5)
    sd = StableDiffusionPipeline.from_pretrained(sd_folder)
    save_student(student, tmp_path / "student", vae=load_teacher_vae(str(sd_folder)), text_encoder=sd.text_encoder,
                 tokenizer=sd.tokenizer)
    assert "timesteps=[649, 324]" in (tmp_path / "student" / "README.md").read_text()
    ours = ConsistencyPipeline.from_pretrained(tmp_path / "student")
    lcm = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "student", safety_checker=None,
                                                         feature_extractor=None, requires_safety_checker=False)
    prompts, z = ["a red bag", "a photo of a sneaker"], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for steps in (1, 2, 4):
        ts = lcm_timesteps(student, lcm_scheduler_for(student), steps)
        assert ts[0] == 649 and len(ts) == steps
        kw = dict(latents=z.clone(), guidance_scale=4.0, output_type="np")
        a = ours(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(1), **kw).images
        b = lcm(prompts, timesteps=ts, generator=torch.Generator().manual_seed(1), **kw).images
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_searched_sigmas_of_a_text_student_are_timesteps_its_card_gives_diffusers(text_run, tmp_path, monkeypatch):
    """``evaluate --search-sigmas --store`` on a text (lcm_scheduler) student: the candidates are moved onto the
    teacher's timesteps, so the stored 2-3-step levels are timesteps; the model card is rewritten with them, and
    diffusers' LatentConsistencyModelPipeline given those ``timesteps`` samples what ConsistencyPipeline samples."""
    import re
    import shutil

    import cmdistill.evaluation.evaluate as E
    from cmdistill import ConsistencyPipeline
    from cmdistill.commands import evaluate_and_store
    from cmdistill.export.pipeline import lcm_scheduler_for, lcm_timesteps, timesteps_at

    monkeypatch.setattr(E, "class_classifier", lambda run, search: AlwaysRedBag())
    run = shutil.copytree(text_run / "run", tmp_path / "run")
    evaluate_and_store(run, num_samples=6, batch_size=4, max_steps=3, teacher_steps=4, feature_net=MeanColour(),
                       use_lpips=False, baselines=["dpm++2m"], baseline_nfe=[2], search_num=6, search_candidates=6,
                       progress=False, echo=lambda s: None)
    ours = ConsistencyPipeline.from_pretrained(run / "student")
    fn, card = ours.consistency_function, (run / "student" / "README.md").read_text()
    assert "## Evaluation" in card and "student-3" in card  # the card carries this evaluation
    for k in (2, 3):
        ts, exact = timesteps_at(fn, ours.sigmas_for(k))
        assert exact and ts[0] == 999 and ts != lcm_timesteps(fn, lcm_scheduler_for(fn), k)
        assert f"{k} steps `timesteps={ts}`" in card
    ts = [int(t) for t in re.search(r"2 steps `timesteps=\[([0-9, ]+)\]`", card).group(1).split(",")]
    lcm = LatentConsistencyModelPipeline.from_pretrained(run / "student", safety_checker=None,
                                                         feature_extractor=None, requires_safety_checker=False)
    kw = dict(latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), guidance_scale=4.0,
              output_type="np")
    a = ours(prompt=["a red bag", "a photo of a sneaker"], num_inference_steps=2,
             generator=torch.Generator().manual_seed(1), **kw).images
    b = lcm(["a red bag", "a photo of a sneaker"], timesteps=ts, generator=torch.Generator().manual_seed(1),
            **kw).images
    np.testing.assert_allclose(a, b, atol=1e-3)
