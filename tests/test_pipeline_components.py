"""ConsistencyPipeline as a diffusers pipeline (issue "A headline a user can trust", items 15-19): its components
carry everything (``ConsistencyPipeline(**pipe.components)``, ``from_pipe``, save/load, the old folder layout), its
progress bar obeys ``set_progress_bar_config``, a replaced component is used at once, and the denoiser runs a U-Net
under diffusers' layerwise casting."""
import io
import json
import logging
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from cmdistill.core.consistency import make_student
from cmdistill.core.denoisers import DDPMDenoiser
from cmdistill.core.guidance import GuidanceEmbedding, attach_guidance
from cmdistill.evaluation.evaluate import store_multistep_sigmas
from cmdistill.export.pipeline import (ConsistencyConfig, ConsistencyPipeline, GuidanceEmbeddingModel, StudentLoadError,
                                       config_file)
from conftest import tiny_unet
from test_conditioning import cond_unet

pytestmark = pytest.mark.usefixtures("single_thread")
SCHEDULER = dict(DDPMScheduler(num_train_timesteps=1000).config)


def unconditional_student():
    """Settings that differ from every default (sigma_max, boundary, stored 2-step sigmas), so a pipeline that lost
    its configuration samples differently."""
    f = make_student(DDPMDenoiser(tiny_unet(seed=3), SCHEDULER), boundary="cm", sigma_max=5.0).eval()
    return ConsistencyPipeline.from_student(f, {2: [5.0, 0.7]})


def guided_student():
    """A class-conditional student for guidance scales in [1, 5] (default 2) with a trained (nonzero) embedding."""
    f = make_student(DDPMDenoiser(cond_unet(seed=2), SCHEDULER), sigma_max=5.0).eval()
    attach_guidance(f, 2.0, (1.0, 5.0))
    torch.manual_seed(4)
    torch.nn.init.normal_(f.guidance_embedding.mlp[-1].weight)
    return ConsistencyPipeline.from_student(f, {2: [5.0, 0.7]})


STUDENTS = {"unconditional": (unconditional_student, [{}]),
            "guided": (guided_student, [{"class_labels": [1, 5, 9]},
                                        {"class_labels": [1, 5, 9], "guidance_scale": 3.5}])}


@pytest.fixture(params=sorted(STUDENTS))
def case(request):
    build, calls = STUDENTS[request.param]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return pipe, calls


def draw(p, steps=1, **kw):
    p.set_progress_bar_config(disable=True)
    return p(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="latent", **kw).images


def outputs(p, calls):
    return [draw(p, steps, **kw) for steps in (1, 2) for kw in calls]


def assert_same_images(p, q, calls):
    for a, b in zip(outputs(p, calls), outputs(q, calls)):
        assert torch.equal(a, b)


def test_components_and_from_pipe_rebuild_the_same_pipeline(case):
    pipe, calls = case
    assert set(pipe.components) == {"unet", "transformer", "consistency_config", "guidance_embedding", "vae",
                                    "text_encoder", "tokenizer", "scheduler"}
    assert pipe.transformer is None and pipe.vae is None and pipe.network is pipe.unet
    for rebuilt in (ConsistencyPipeline(**pipe.components), ConsistencyPipeline.from_pipe(pipe)):
        assert all(rebuilt.components[k] is v for k, v in pipe.components.items())  # shared, as in diffusers
        assert_same_images(pipe, rebuilt, calls)


def test_save_load_round_trip_of_the_rebuilt_pipeline(case, tmp_path):
    pipe, calls = case
    ConsistencyPipeline(**pipe.components).save_pretrained(tmp_path / "student")
    assert config_file(tmp_path / "student").is_file()
    for loaded in (ConsistencyPipeline.from_pretrained(tmp_path / "student"),
                   DiffusionPipeline.from_pretrained(tmp_path / "student")):  # cmdistill is imported
        assert type(loaded) is ConsistencyPipeline and type(loaded.consistency_config) is ConsistencyConfig
        assert (loaded.guidance_embedding is None) == (pipe.guidance_embedding is None)
        assert_same_images(pipe, loaded, calls)


def to_old_layout(folder):
    """Rewrite a saved student into the layout before the configuration was a component: its keys in
    model_index.json, no consistency_config/."""
    index, config = (json.loads(p.read_text()) for p in (folder / "model_index.json", config_file(folder)))
    del index["consistency_config"]
    index.update({k: config[k] for k in ("adapter", "consistency", "multistep_sigmas")})
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(config_file(folder).parent)


class Recorder(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_folder_of_the_old_layout_loads_and_storing_sigmas_upgrades_it(tmp_path):
    pipe = unconditional_student()
    pipe.save_pretrained(tmp_path / "student")
    to_old_layout(tmp_path / "student")
    warnings = Recorder(logging.WARNING)
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        loaded = ConsistencyPipeline.from_pretrained(tmp_path / "student")
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)
    assert not [r for r in warnings.records if "ignored" in r.getMessage()]  # the old keys were read, not ignored
    assert_same_images(pipe, ConsistencyPipeline(**loaded.components), [{}])
    store_multistep_sigmas(loaded, {3: [5.0, 1.0, 0.3]}, tmp_path / "student")
    assert config_file(tmp_path / "student").is_file()
    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["consistency_config"] == ["cmdistill.export.pipeline", "ConsistencyConfig"] and "adapter" not in index
    again = DiffusionPipeline.from_pretrained(tmp_path / "student")
    assert again.sigmas_for(3) == [5.0, 1.0, 0.3] and again.sigmas_for(2) == [5.0, 0.7]


def test_a_folder_without_its_configuration_is_refused_in_one_line(tmp_path):
    """Not sampled with default settings: the student would sample differently from how it was distilled."""
    unconditional_student().save_pretrained(tmp_path / "student")
    shutil.rmtree(config_file(tmp_path / "student").parent)
    with pytest.raises(StudentLoadError, match=r"incomplete: no consistency_config/consistency_config\.json$"):
        ConsistencyPipeline.from_pretrained(tmp_path / "student")


def test_store_multistep_sigmas_replaces_only_the_config_file(tmp_path):
    pipe = unconditional_student()
    folder = tmp_path / "student"
    pipe.save_pretrained(folder)
    loaded = ConsistencyPipeline.from_pretrained(folder)
    kept = {p: p.stat().st_ino for p in (folder / "model_index.json", folder / "unet" / "config.json",
                                         folder / "unet" / "diffusion_pytorch_model.safetensors")}
    before = config_file(folder).stat().st_ino
    store_multistep_sigmas(loaded, {2: [5.0, 2.0]}, folder)
    assert {p: p.stat().st_ino for p in kept} == kept and config_file(folder).stat().st_ino != before
    assert ConsistencyPipeline.from_pretrained(folder).sigmas_for(2) == [5.0, 2.0]


def test_progress_bar_follows_set_progress_bar_config(capsys):
    pipe = unconditional_student()
    sigmas = [5.0, 1.0, 0.3]
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=2, sigmas=sigmas, output_type="latent")
    assert capsys.readouterr() == ("", "")
    pipe.set_progress_bar_config()  # diffusers' default: a bar on stderr
    pipe(batch_size=2, sigmas=sigmas, output_type="latent")
    assert "3/3" in capsys.readouterr().err
    buf = io.StringIO()
    pipe.set_progress_bar_config(file=buf, ascii=True)
    pipe(batch_size=2, num_inference_steps=2, output_type="latent")  # the stored 2-step sigmas
    text = buf.getvalue()
    assert "2/2" in text and "3/2" not in text and capsys.readouterr() == ("", "")


def test_a_replaced_component_is_used_at_once():
    pipe = guided_student()
    kw = {"class_labels": [1, 5, 9], "guidance_scale": 3.5}
    first = draw(pipe, 2, **kw)
    torch.manual_seed(9)
    other = GuidanceEmbedding(pipe.guidance_embedding.config.embedding_dim)
    torch.nn.init.normal_(other.mlp[-1].weight)
    pipe.guidance_embedding = GuidanceEmbeddingModel.wrap(other)
    fresh = ConsistencyPipeline(pipe.unet, pipe.consistency_config, pipe.guidance_embedding)
    assert not torch.equal(draw(pipe, 2, **kw), first)
    assert torch.equal(draw(pipe, 2, **kw), draw(fresh, 2, **kw))
    for change in ({"consistency": {**pipe.consistency_config.config.consistency, "boundary": "cm"}},
                   {"multistep_sigmas": {2: [5.0, 2.0]}}):
        now = {k: pipe.consistency_config.config[k] for k in ("adapter", "consistency", "multistep_sigmas")}
        before = draw(pipe, 2, **kw)
        pipe.consistency_config = ConsistencyConfig(**{**now, **change})
        assert not torch.equal(draw(pipe, 2, **kw), before)
        fresh = ConsistencyPipeline(pipe.unet, pipe.consistency_config, pipe.guidance_embedding)
        assert torch.equal(draw(pipe, 2, **kw), draw(fresh, 2, **kw))


def test_denoiser_runs_under_layerwise_casting():
    """fp8 storage, fp32 compute (diffusers' ``enable_layerwise_casting``): the denoiser and the pipeline compute as
    the fp32 U-Net with the same (fp8-rounded) weights does."""
    cast = tiny_unet(seed=5)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert next(cast.parameters()).dtype == torch.float8_e4m3fn
    ref = tiny_unet(seed=5)
    ref.load_state_dict({k: v.float() for k, v in cast.state_dict().items()})
    x, sigma = 3 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 0.5])
    with torch.no_grad():
        out, expected = (DDPMDenoiser(net, SCHEDULER)(x, sigma) for net in (cast, ref))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    config = unconditional_student().consistency_config
    a, b = (draw(ConsistencyPipeline(net, config), 2) for net in (cast, ref))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
