"""Issue 14, first part: class labels travel through the whole engine (data, teacher, student, target, pipeline,
`cmdistill sample --class-label`); unconditional teachers work unchanged. Guidance: test_guidance.py."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from conftest import distill_digits, save_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


def cond_unet(seed: int = 0, classes: int = 11):
    """A tiny class-conditional UNet2DModel: 10 digit classes and one spare (the null class of guidance)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=classes)


@pytest.fixture(scope="module")
def cond_teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("cond") / "teacher", cond_unet())


def test_datasets_yield_labels(tmp_path):
    from PIL import Image

    from cmdistill.data import digits_dataset, imagefolder_dataset, num_labels

    ds = digits_dataset("")
    x, y = ds[5]
    assert x.shape == (1, 8, 8) and 0 <= int(y) <= 9 and num_labels(ds) == 10
    for cls in ("cat", "ant"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "a.png")
    ds = imagefolder_dataset(str(tmp_path), 8, 3)
    assert [int(ds[i][1]) for i in range(len(ds))] == [0, 1]  # sorted folder names: ant 0, cat 1 (ImageFolder)


def _recording(net, seen, name):
    def hook(module, args, kwargs):
        seen.setdefault(name, []).append(kwargs.get("class_labels"))
    return net.register_forward_pre_hook(hook, with_kwargs=True)


def test_labels_reach_teacher_student_and_target():
    from diffusers import DDPMScheduler

    from cmdistill.core.cd_step import cd_loss
    from cmdistill.core.consistency import make_student, make_target
    from cmdistill.core.denoisers import DDPMDenoiser
    from cmdistill.core.losses import get_weighting, make_distance

    teacher = DDPMDenoiser(cond_unet().eval(), dict(DDPMScheduler(num_train_timesteps=1000).config))
    student = make_student(teacher)
    target = make_target(student)
    seen = {}
    for net, name in ((teacher.net, "teacher"), (student.denoiser.net, "student"), (target.denoiser.net, "target")):
        _recording(net, seen, name)
    y = torch.tensor([3, 7])
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    cd_loss(student, target, teacher, x0, torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), make_distance("l2"),
            get_weighting("uniform"), "heun", class_labels=y)
    assert len(seen["teacher"]) == 2 and len(seen["student"]) == 1 and len(seen["target"]) == 1
    assert all(torch.equal(v, y) for calls in seen.values() for v in calls)


def test_conditional_distill_and_pipeline_round_trip(cond_teacher_dir, tmp_path):
    from cmdistill.export.pipeline import ConsistencyPipeline

    run = distill_digits(tmp_path / "run", [f"teacher.path={cond_teacher_dir}", "train.max_steps=2",
                                            "train.batch_size=8", "loss.distance=l2", "train.num_sample_images=4",
                                            "eval.at_end=false", "eval.curve=false", "student.sigma_max=null"])
    pipe = ConsistencyPipeline.from_pretrained(run / "student")
    pipe.set_progress_bar_config(disable=True)

    def draw(labels, steps=2):
        return pipe(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="latent", class_labels=labels).images

    a = draw([1, 2, 3])
    assert torch.equal(a, draw(torch.tensor([1, 2, 3])))
    assert not torch.equal(a, draw([4, 5, 6]))  # the labels change the samples
    assert torch.equal(draw(4), draw([4, 4, 4]))  # one int for the batch
    with pytest.raises(ValueError, match="class-conditional .* pass class_labels"):
        draw(None)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\]"):
        draw(11)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        draw([1, 2])
    res = CliRunner().invoke(main, ["sample", "--student", str(run / "student"), "--class-label", "3", "--num", "4",
                                    "--out", str(tmp_path / "threes")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "threes" / "grid.png").is_file()
    res = CliRunner().invoke(main, ["sample", "--student", str(run / "student"), "--num", "4"])
    assert res.exit_code == 2 and "pass class_labels" in res.stderr
    res = CliRunner().invoke(main, ["evaluate", str(run), "--num", "4", "--guidance-scale", "2"])
    assert res.exit_code == 2 and "has no guidance built in" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unconditional_student_refuses_labels(tiny_run_dir):
    from cmdistill.export.pipeline import ConsistencyPipeline

    pipe = ConsistencyPipeline.from_pretrained(tiny_run_dir / "student")
    with pytest.raises(ValueError, match="unconditional: call it without class_labels"):
        pipe(batch_size=2, class_labels=3)
    res = CliRunner().invoke(main, ["sample", "--student", str(tiny_run_dir / "student"), "--class-label", "3",
                                    "--num", "2", "--out", "unused"])
    assert res.exit_code == 2 and "unconditional" in res.stderr
