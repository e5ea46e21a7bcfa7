"""The offline text-conditional teacher of issue 26 on tiny sizes: Fashion-MNIST captions from the class names,
`train-teacher model: sd` (a UNet2DConditionModel + a frozen random CLIP text encoder over a tokenizer cmdistill
writes), exported as a StableDiffusionPipeline that diffusers samples, then distilled into a student that diffusers'
LatentConsistencyModelPipeline samples. Tiny IDX files and a tiny autoencoder made here."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from cmdistill.cli import main  # noqa: E402
from cmdistill.data import FASHION_SYNONYMS, fashion_words, make_dataset  # noqa: E402
from test_fashion_mnist import write_fashion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = ["text_unet.sample_size=4", "text_unet.block_out_channels=[8,16]", "text_unet.norm_num_groups=4",
        "text_unet.attention_head_dim=4", "text_encoder.hidden_size=16", "text_encoder.intermediate_size=32",
        "text_encoder.num_attention_heads=2", "data.resolution=8", "train.batch_size=4", "train.max_steps=3",
        "train.sample_every=3", "train.num_sample_images=4", "train.sample_steps=2", "train.checkpoint_every=3"]


def test_fashion_captions_name_each_image_class(tmp_path):
    write_fashion(tmp_path, n=30)
    ds = make_dataset("fashion_captions", str(tmp_path), 32, 1)
    assert len(ds) == 30 and len(ds.prompts) > 5
    for i in range(30):
        x, y, pid = ds[i]
        caption = ds.prompts[int(pid)]
        assert any(name in caption for name in FASHION_SYNONYMS[int(y)]), (int(y), caption)
        assert set(caption.split()) <= set(fashion_words())
    again = make_dataset("fashion_captions", str(tmp_path), 32, 1)  # the same caption for the same image
    assert again.prompts == ds.prompts and torch.equal(again.prompt_ids, ds.prompt_ids)


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    from diffusers import AutoencoderKL

    from conftest import _threads

    tmp = tmp_path_factory.mktemp("fashiontext")
    write_fashion(tmp / "data", n=16)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(tmp / "vae")
    args = ["train-teacher", str(ROOT / "recipes" / "fashion-text-teacher.yaml"), "--output-dir", str(tmp / "run")]
    for s in TINY + [f"data.root={tmp / 'data'}", f"data.latent_cache={tmp / 'cache'}", f"latent.vae={tmp / 'vae'}",
                     f"train.export_dir={tmp / 'teacher'}"]:
        args += ["--set", s]
    with _threads(1):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return tmp


def test_text_teacher_is_a_stable_diffusion_pipeline_diffusers_samples(text_teacher):
    from diffusers import StableDiffusionPipeline

    from cmdistill.teachers import load_teacher

    folder = text_teacher / "teacher"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"][1] == "UNet2DConditionModel"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    out = pipe(["a photo of a sneaker", "an image of jeans"], num_inference_steps=2, guidance_scale=2.0,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()  # the tiny autoencoder's grey images
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    for caption in make_dataset("fashion_captions", str(text_teacher / "data"), 8, 1).prompts:
        assert pipe.tokenizer.tokenize(caption) == [w + "</w>" for w in caption.split()]  # a word is a token
    teacher = load_teacher(str(folder))
    assert teacher.empty_condition.shape == (1, 16, 16)
    assert (text_teacher / "run" / "samples").is_dir() and list((text_teacher / "run" / "samples").glob("*.png"))


def test_the_text_teacher_distils_into_an_lcm_student(text_teacher, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    from conftest import _threads

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""teacher: {{path: {text_teacher / 'teacher'}}}
data: {{name: fashion_captions, root: {text_teacher / 'data'}, resolution: 8, hflip: false, num_workers: 0,
       latent_cache: {text_teacher / 'cache'}}}
guidance: {{scale: 2.0, w_min: 1.0, w_max: 4.0}}
schedule: {{grid: teacher, skip: 100}}
solver: {{name: ddim}}
loss: {{distance: pseudo_huber}}
train: {{batch_size: 4, max_steps: 2, checkpoint_every: 2, sample_every: 2, num_sample_images: 4}}
eval: {{at_end: false}}
""")
    with _threads(1):
        res = CliRunner().invoke(main, ["distill", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    lcm = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "run" / "student", safety_checker=None,
                                                         feature_extractor=None, requires_safety_checker=False)
    out = lcm("a photo of a bag", num_inference_steps=1, guidance_scale=3.0, output_type="np").images
    assert out.shape == (1, 8, 8, 1) and np.isfinite(out).all()


def test_written_tokenizer_makes_every_listed_word_one_token(tmp_path):
    """Words that share prefixes and pieces ("an", "and", "handbag", "sandal", "sandals") each stay one token, any
    other word still tokenizes, and the vocabulary round-trips through diffusers' tokenizer loading."""
    from transformers import CLIPTokenizer

    from cmdistill.tokenizer import write_clip_tokenizer

    words = fashion_words()
    tok = write_clip_tokenizer(tmp_path / "tok", words, 16)
    assert all(tok.tokenize(w) == [w + "</w>"] for w in words)
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    ids = again("a black and white photo of a handbag", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == again.bos_token_id and ids[9] == again.eos_token_id
