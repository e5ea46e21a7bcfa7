"""The network seam (cmdistill.core.networks): each diffusers family called, split, conditioned and guided in one
place; a DiT teacher through cmdistill equals diffusers' own DiTPipeline from the same latents and labels."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, ModelMixin, UNet2DModel

from cmdistill.core.autoencoders import decode_latents, encode_latents
from cmdistill.core.denoisers import UnsupportedTeacher, build_denoiser
from cmdistill.core.guidance import GuidanceEmbedding, GuidedDenoiser, guided_teacher
from cmdistill.core.networks import (UnsupportedNetwork, added_to_embedding, call_network, class_rows, condition_keys,
                                     embedding_width, family_of, image_shape, null_class, null_condition,
                                     prepare_network)
from cmdistill.core.sampling import sample_ode, teacher_sigmas


def tiny_dit(classes: int = 10, learn_sigma: bool = True, seed: int = 0, side: int = 4):
    torch.manual_seed(seed)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=8 if learn_sigma else 4, num_layers=2, sample_size=side, patch_size=2,
                                num_embeds_ada_norm=classes)
    with torch.no_grad():  # diffusers zero-initialises the output and the adaLN modulation: make them matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def tiny_vae(seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.7).eval()


def test_dit_family_call_split_classes_and_null():
    net = tiny_dit()
    assert family_of(net).name == "dit" and image_shape(net) == (4, 4, 4)
    assert class_rows(net) == 11 and null_class(net) == 10  # 10 classes + diffusers' null row
    assert condition_keys(net) == ("class_labels",) and int(null_condition(net)["class_labels"]) == 10
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([10.0, 500.0, 999.0]), torch.tensor([0, 3, 10])
    full = net(x, timestep=t, class_labels=y).sample
    assert full.shape[1] == 8
    torch.testing.assert_close(call_network(net, x, t, {"class_labels": y}), full[:, :4])  # DiTPipeline's split
    out4 = call_network(tiny_dit(learn_sigma=False), x, t, {"class_labels": y})
    assert out4.shape == (3, 4, 4, 4)


def test_dit_label_dropout_is_turned_off_for_training():
    """diffusers' LabelEmbedding drops labels at random in train mode; the seam turns that off (the package drops
    labels itself, from its checkpointed RNG), keeping the null row."""
    net = tiny_dit().train()
    x, t, y = torch.randn(64, 4, 4, 4), torch.full((64,), 300.0), torch.arange(64) % 10
    torch.manual_seed(0)
    a = call_network(net, x, t, {"class_labels": y})
    torch.manual_seed(1)
    b = call_network(net, x, t, {"class_labels": y})
    assert not torch.allclose(a, b)  # labels were dropped at random
    prepare_network(net)
    torch.manual_seed(0)
    a = call_network(net, x, t, {"class_labels": y})
    torch.manual_seed(1)
    torch.testing.assert_close(a, call_network(net, x, t, {"class_labels": y}))
    assert class_rows(net) == 11


def test_guidance_embedding_enters_every_dit_conditioning_embedding():
    net = tiny_dit()
    emb = GuidanceEmbedding.for_net(net)
    assert embedding_width(net) == 16 and emb.mlp[-1].out_features == 16
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([100.0, 700.0]), torch.tensor([1, 2])
    base = call_network(net, x, t, {"class_labels": y})
    with added_to_embedding(net, emb(torch.tensor([2.0, 5.0]))):  # zero-started: no change
        torch.testing.assert_close(call_network(net, x, t, {"class_labels": y}), base)
    extra = torch.randn(2, 16)
    calls = []
    hooks = [b.norm1.emb.register_forward_hook(lambda m, a, o: calls.append(1)) for b in net.transformer_blocks]
    with added_to_embedding(net, extra):
        moved = call_network(net, x, t, {"class_labels": y})
    for h in hooks:
        h.remove()
    assert not torch.allclose(moved, base) and len(calls) == len(net.transformer_blocks) + 1  # + the output layer's
    torch.testing.assert_close(call_network(net, x, t, {"class_labels": y}), base)  # hooks removed


def test_unknown_diffusers_model_is_refused_naming_its_class():
    class Mystery(ModelMixin):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(UnsupportedNetwork, match="does not know how to call a Mystery"):
        family_of(Mystery())
    with pytest.raises(UnsupportedTeacher, match="Mystery"):
        build_denoiser(Mystery(), {"_class_name": "DDPMScheduler"})


def test_text_conditional_transformer_is_refused():
    from diffusers import Transformer2DModel

    net = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, sample_size=4, patch_size=2,
                             num_layers=1, norm_type="ada_norm_zero", num_embeds_ada_norm=10, cross_attention_dim=16)
    with pytest.raises(UnsupportedNetwork, match="text-conditional"):
        family_of(net)


def test_guided_denoiser_takes_condition_dicts():
    net = tiny_dit(learn_sigma=False)
    den = build_denoiser(net, {"_class_name": "DDIMScheduler"})
    g = guided_teacher(den, 3.0)
    assert isinstance(g, GuidedDenoiser) and int(g.null_condition["class_labels"]) == 10
    x, s, y = torch.randn(2, 4, 4, 4), torch.tensor([2.0, 5.0]), torch.tensor([4, 7])
    with torch.no_grad():
        c, u = den(x, s, class_labels=y), den(x, s, class_labels=torch.tensor([10, 10]))
        torch.testing.assert_close(g(x, s, class_labels=y), u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g(x, s, class_labels=4)[:1], g(x[:1], s[:1], class_labels=y[:1]))  # a scalar label
    with pytest.raises(ValueError, match="class_labels"):
        g(x, s, encoder_hidden_states=torch.zeros(2, 3, 8))


def test_learned_variance_unet_teacher_reads_the_mean_half():
    """An improved-DDPM U-Net (2C output: epsilon and the variance interpolation, Nichol & Dhariwal 2021) is read as
    its first C channels, as diffusers' pipelines do."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    den = build_denoiser(unet, {"_class_name": "DDPMScheduler", "variance_type": "learned_range"})
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        t = den.sigma_to_t(s)
        eps = unet(x / (1 + s[:, None, None, None] ** 2).sqrt(), t).sample[:, :1]
        torch.testing.assert_close(den(x, s), x - s[:, None, None, None] * eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_dit_teacher_ddim_equals_diffusers_dit_pipeline(guidance_scale):
    """The teacher's DDIM-k through cmdistill's adapter (and guided teacher) equals diffusers' DiTPipeline with a
    DDIMScheduler from the same initial latents and labels, decoded by the same VAE. DiTPipeline guides with the null
    class 1000, so the tiny DiT has diffusers' 1000 classes (+ the null row)."""
    dit, vae = tiny_dit(classes=1000, side=4), tiny_vae()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing")
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=sched)
    labels = [3, 999]
    ref = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=6, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    den = guided_teacher(build_denoiser(dit, dict(sched.config)), guidance_scale)
    with torch.no_grad():
        lat = sample_ode(den, z, teacher_sigmas(den, 6, spacing=None), "ddim", class_labels=torch.tensor(labels))
        ours = (decode_latents(vae, lat) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ref.shape == ours.shape == (2, 8, 8, 1)
    # float32 loops with differently ordered arithmetic on a random network's large latents, then a decoder: 1e-3 of
    # the [0, 1] range; another label moves the images by far more
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    other = pipe(class_labels=[4, 998], guidance_scale=guidance_scale, num_inference_steps=6, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.abs(other - ref).max() > 2e-2


def test_autoencoder_kl_latents_use_scaling_and_shift():
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.25)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = encode_latents(vae, x)
        torch.testing.assert_close(z, (vae.encode(x).latent_dist.mean - 0.25) * 0.7)
        torch.testing.assert_close(decode_latents(vae, z), vae.decode(z / 0.7 + 0.25).sample)


def test_latent_unet_teacher_ddim_equals_diffusers_ldm_pipeline(tmp_path):
    """An LDMPipeline-layout teacher (unet/ + vqvae/ + scheduler/) loaded by cmdistill: DDIM-k through the adapter,
    decoded by the VQModel's decoder, equals diffusers' LDMPipeline from the same initial latents."""
    from diffusers import LDMPipeline, VQModel

    from cmdistill.latents import load_teacher_vae
    from cmdistill.teachers import load_teacher
    from conftest import tiny_unet

    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=3, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3, sample_size=16,
                 scaling_factor=0.8).eval()
    unet = tiny_unet(sample_size=8, channels=3, seed=2).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing")
    LDMPipeline(vqvae=vq, unet=unet, scheduler=sched).save_pretrained(tmp_path / "ldm")
    pipe = LDMPipeline.from_pretrained(tmp_path / "ldm")
    ref = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
    den, vae = load_teacher(str(tmp_path / "ldm")), load_teacher_vae(str(tmp_path / "ldm"))
    assert type(vae).__name__ == "VQModel" and den.kind == "ddpm"
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lat = sample_ode(den, z, teacher_sigmas(den, 5, spacing=None), "ddim")
        ours = (decode_latents(vae, lat) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ref.shape == ours.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_a_dit_student_in_train_mode_sees_its_labels():
    """make_student prepares the copied network: diffusers' DiT would otherwise drop 10 % of the labels at random in
    train mode, training the student on unconditional inputs against conditional targets."""
    from cmdistill.core.consistency import make_student

    den = build_denoiser(tiny_dit(learn_sigma=False), {"_class_name": "DDIMScheduler"})
    student = make_student(den)
    assert student.training
    x, s, y = torch.randn(64, 4, 4, 4), torch.full((64,), 3.0), torch.arange(64) % 10
    torch.manual_seed(0)
    a = student(x, s, class_labels=y)
    torch.manual_seed(1)
    torch.testing.assert_close(student(x, s, class_labels=y), a)
