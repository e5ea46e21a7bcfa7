"""Train a small ``AutoencoderKL`` (Kingma & Welling 2014; Rombach et al. 2022, Sec. 3) as a task of the one training
loop (:mod:`.loop`): the autoencoder of a package-made latent teacher (``train-teacher`` with ``model: autoencoder``).

Loss: reconstruction MSE + ``autoencoder.kl_weight`` x the KL of ``q(z|x)`` to ``N(0, I)``, both per element. The
export sets ``scaling_factor`` to ``1 / std`` of the posterior means of the training images, so the latents a teacher
sees have unit variance (Stable Diffusion's 0.18215, measured on this data), and reports the reconstruction PSNR.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..config import AutoencoderConfig, ConfigError, TeacherRecipe
from ..core.autoencoders import reconstruct
from ..data import check_fits, make_dataset, random_hflip
from ..images import save_grid
from .ema import make_eval_ema
from .optim import make_lr_schedule, make_optimizer


def make_autoencoder(cfg: AutoencoderConfig):
    """A fresh ``AutoencoderKL`` from the recipe (``len(block_out_channels) - 1`` halvings of the side)."""
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    try:
        return AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                             latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                             sample_size=cfg.sample_size, scaling_factor=1.0)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"bad 'autoencoder' section: {e}") from None


def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """``E||decode(z) - x||^2 + kl_weight KL(q(z|x) || N(0, I))`` per element, ``z`` a reparameterised sample (the
    global RNG, which the loop checkpoints)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar)
    return torch.nn.functional.mse_loss(rec.float(), x.float()) + kl_weight * kl.float().mean()


@torch.no_grad()
def latent_scale(vae, ds: Dataset, n: int = 4096, batch_size: int = 512) -> float:
    """``1 / std`` of the posterior means of the first ``n`` images (the unit-variance ``scaling_factor``)."""
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    p = next(vae.parameters())
    z = torch.cat([vae.encode(b.to(p.device)).latent_dist.mean.float().cpu() for b in x.split(batch_size)])
    return float(1.0 / z.std())


@torch.no_grad()
def reconstruction_psnr(vae, ds: Dataset, n: int = 2048, batch_size: int = 512) -> float:
    """Mean PSNR (dB, images in [-1, 1] so peak-to-peak 2) of the posterior-mean reconstructions of ``n`` images."""
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    p = next(vae.parameters())
    psnr = []
    for b in x.split(batch_size):
        rec = reconstruct(vae, b.to(p.device)).clamp(-1, 1).cpu()
        mse = (rec - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr.append(10 * torch.log10(4.0 / mse))
    return float(torch.cat(psnr).mean())


class AutoencoderTraining:
    """The autoencoder trained on the recipe's data, its EMA reconstructions sampled and exported."""

    name = "autoencoder"
    CHECKPOINT_MODULES = ("ema",)
    OUTPUTS = ("pipeline",)

    def __init__(self, recipe: TeacherRecipe, accelerator, dataset: Dataset | None = None):
        self.recipe, self.acc = recipe, accelerator
        dc, ac, tc = recipe.data, recipe.autoencoder, recipe.train
        if dataset is None:
            dataset = make_dataset(dc.name, dc.root, ac.sample_size, ac.in_channels)
            check_fits(dataset, ac.sample_size, ac.in_channels, dc.name)
        self.dataset = dataset
        vae = make_autoencoder(ac).to(accelerator.device)
        self.ema = make_eval_ema(vae, tc.ema_decay, 0, tc.ema_power).to(accelerator.device)
        opt = make_optimizer(vae.parameters(), recipe.optim)
        self.lr_scheduler = make_lr_schedule(opt, recipe.optim, tc.max_steps)
        self.model, self.optimizer = accelerator.prepare(vae, opt)
        self.flip_gen = torch.Generator().manual_seed(tc.seed + 1 + accelerator.process_index)
        self.modules = {"ema": self.ema}
        self.generators = {"flip": self.flip_gen}
        self.batches = None
        self.preview = torch.stack([dataset[i][0] for i in range(min(tc.num_sample_images // 2, len(dataset)))])

    def describe(self) -> list[str]:
        r, ac = self.recipe, self.recipe.autoencoder
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        side = ac.sample_size // 2 ** (len(ac.block_out_channels) - 1)
        return [f"AutoencoderKL: {n_params:.2f} M parameters, {ac.in_channels}x{ac.sample_size}x{ac.sample_size} -> "
                f"{ac.latent_channels}x{side}x{side} latents, KL weight {ac.kl_weight:g}",
                f"data: {r.data.name}, {len(self.dataset)} images" + (", hflip" if r.data.hflip else ""),
                f"export: {r.train.export_dir or Path(r.train.output_dir) / 'pipeline'}"]

    def loss(self, step: int) -> torch.Tensor:
        x = next(self.batches)[0].to(self.acc.device)
        x = random_hflip(x, self.flip_gen) if self.recipe.data.hflip else x
        return vae_loss(self.model, x, self.recipe.autoencoder.kl_weight)

    def after_update(self) -> None:
        self.ema.update()

    def finite_modules(self):
        return self.model, self.ema

    def save_samples(self, path: Path) -> None:
        """Originals (top half) above their EMA reconstructions (bottom half)."""
        x = self.preview.to(self.acc.device)
        save_grid(torch.cat([x, reconstruct(self.ema.ema_model, x).clamp(-1, 1)]), path)


def export_autoencoder(task: AutoencoderTraining, out: Path) -> Path:
    """The EMA autoencoder, its ``scaling_factor`` set to unit latent variance, as a diffusers model folder in
    ``train.export_dir`` (default ``<output_dir>/pipeline``); prints the reconstruction PSNR."""
    tc = task.recipe.train
    folder = Path(tc.export_dir) if tc.export_dir else out / "pipeline"
    vae = copy.deepcopy(task.ema.ema_model).eval()
    vae.register_to_config(scaling_factor=latent_scale(vae, task.dataset))
    psnr = reconstruction_psnr(vae, task.dataset)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(folder), safe_serialization=True)
    task.acc.print(f"autoencoder: scaling_factor {vae.config.scaling_factor:.4f}, reconstruction PSNR {psnr:.2f} dB "
                   f"({min(2048, len(task.dataset))} training images)")
    return folder
