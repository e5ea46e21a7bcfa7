"""The verified latent cache of latent teachers: a dataset encoded once by the teacher's autoencoder
(:mod:`cmdistill.core.autoencoders`), stored on disk and reused by every process and every later run whose autoencoder
weights, data and transform are the same (the trajectory bank's rule: a manifest of fingerprints, checked on load).

A cache is a folder ``<cache_dir>/<key>/`` with ``latents.safetensors`` (``latents`` [N, c, h, w] fp32, ``labels``
[N]; for captioned data ``prompt_ids`` [N] and ``prompt_embeds`` [P, L, D], each distinct caption's text-encoder states)
and ``manifest.json``: the key's inputs (SHA-256 of the autoencoder's config and weight files, of the images and
labels as the data layer gives them, the encoding: posterior, scaling and shift factors; of the captions and of the
tokenizer and text-encoder files) and the SHA-256 of the latents file. A folder whose manifest or file does not match is refused in one line, never silently re-used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from .core.autoencoders import autoencoder_family, encode_latents, latent_affine
from .data import DataError
from .files import atomic_path, make_readable, sha256_file, write_atomic

VAE_SUBFOLDERS = ("vae", "vqvae")  # where diffusers pipelines keep their autoencoder (LDMPipeline: vqvae)


class LatentCacheError(DataError):
    """A latent cache that does not match what it claims to hold."""


def find_vae_folder(path: str | Path) -> Path:
    """The autoencoder folder of ``path``: itself when it holds the model's ``config.json``, else its ``vae/`` or
    ``vqvae/`` subfolder (a pipeline folder)."""
    p = Path(path).expanduser()
    for folder in (p, *(p / s for s in VAE_SUBFOLDERS)):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    raise DataError(f"no autoencoder (config.json + safetensors) in {str(path)!r} or its "
                            f"{'/, '.join(VAE_SUBFOLDERS)}/ subfolder")


def load_vae(path: str | Path, device="cpu"):
    """A diffusers autoencoder (the class its ``config.json`` names) from a folder or a pipeline folder, frozen."""
    import diffusers

    folder = find_vae_folder(path)
    name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise DataError(f"autoencoder class {name!r} in {folder} is not a diffusers model")
    vae = cls.from_pretrained(folder).to(device).eval().requires_grad_(False)
    try:
        autoencoder_family(vae)  # an unknown class is refused here, before any data is read
    except ValueError as e:
        raise DataError(str(e)) from None
    return vae


def load_teacher_vae(teacher_path: str, device="cpu"):
    """The autoencoder of a latent teacher (its ``vae/`` or ``vqvae/``), ``None`` for a pixel teacher."""
    from .teachers import teacher_autoencoder

    folder = teacher_autoencoder(teacher_path)
    return None if folder is None else load_vae(folder, device)


def vae_fingerprint(folder: Path) -> dict:
    """SHA-256 of the autoencoder's config and of each weight file."""
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
    return {f.name: sha256_file(f) for f in files}


def data_fingerprint(ds: Dataset, batch_size: int = 4096) -> dict:
    """SHA-256 of the images (fp32 bytes, as the data layer gives them) and of the labels, with their count; for a
    captioned dataset also of its captions and of which image has which."""
    h_x, h_y = hashlib.sha256(), hashlib.sha256()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    n = 0
    for x, y, *_ in loader:
        h_x.update(x.float().contiguous().numpy().tobytes())
        h_y.update(torch.as_tensor(y).long().numpy().tobytes())
        n += len(x)
    out = {"count": n, "images_sha256": h_x.hexdigest(), "labels_sha256": h_y.hexdigest()}
    if getattr(ds, "prompts", None) is not None:
        out["prompts_sha256"] = hashlib.sha256(json.dumps(ds.prompts).encode()).hexdigest()
        out["prompt_ids_sha256"] = hashlib.sha256(ds.prompt_ids.long().numpy().tobytes()).hexdigest()
    return out


def text_fingerprint(teacher_folder: Path) -> dict:
    """SHA-256 of a text teacher's tokenizer and text-encoder files."""
    from .prompts import TEXT_ENCODER, TOKENIZER

    files = sorted(f for d in (TOKENIZER, TEXT_ENCODER) for f in (teacher_folder / d).iterdir() if f.is_file())
    return {f"{f.parent.name}/{f.name}": sha256_file(f) for f in files}


def cache_manifest(vae, vae_folder: Path, ds: Dataset, text_folder: Path | None = None) -> dict:
    scale, shift = latent_affine(vae)
    out = {"autoencoder": type(vae).__name__, "vae_files": vae_fingerprint(vae_folder), "data": data_fingerprint(ds),
           "posterior": autoencoder_family(vae).posterior, "scaling_factor": scale, "shift_factor": shift}
    if text_folder is not None:
        out["text_files"] = text_fingerprint(Path(text_folder))
    return out


def cache_key(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def encode_dataset(vae, ds: Dataset, batch_size: int = 256, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    zs, ys = [], []
    for x, y, *_ in tqdm(loader, desc="encoding latents", disable=not progress, leave=False):
        zs.append(encode_latents(vae, x).cpu())
        ys.append(torch.as_tensor(y).long())
    return torch.cat(zs), torch.cat(ys)


@torch.no_grad()
def encode_prompts(encoder, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """``[P, L, D]`` text-encoder states of each distinct caption (:class:`~cmdistill.prompts.PromptEncoder`)."""
    return torch.cat([encoder(prompts[i:i + batch_size]).cpu() for i in range(0, len(prompts), batch_size)])


def as_dataset(t: dict) -> TensorDataset:
    """The cache's tensors as a dataset of ``(latent, label)``, or ``(latent, label, prompt_id)`` with the table
    ``prompt_embeds`` [P, L, D] (row ``prompt_id`` is that image's caption's states) as an attribute."""
    if "prompt_ids" not in t:
        return TensorDataset(t["latents"], t["labels"])
    ds = TensorDataset(t["latents"], t["labels"], t["prompt_ids"])
    ds.prompt_embeds = t["prompt_embeds"]
    return ds


def read_cache(folder: Path, manifest: dict) -> TensorDataset | None:
    """The cached latents when ``folder`` holds them for ``manifest``; ``None`` when it holds nothing; a
    :class:`LatentCacheError` when it holds something else or a damaged file."""
    from safetensors.torch import load_file

    mf, data = folder / "manifest.json", folder / "latents.safetensors"
    if not mf.exists():
        return None
    stored = json.loads(mf.read_text())
    if stored.get("inputs") != manifest:
        raise LatentCacheError(f"latent cache {folder} was made from other inputs; delete it to re-encode")
    if not data.exists() or sha256_file(data) != stored.get("latents_sha256"):
        raise LatentCacheError(f"latent cache {folder}: latents.safetensors is missing or damaged (SHA-256); delete "
                               "the folder to re-encode")
    return as_dataset(load_file(str(data)))


def write_cache(folder: Path, manifest: dict, tensors: dict) -> None:
    """The latents file (``latents``, ``labels``, and for captioned data ``prompt_ids``, ``prompt_embeds``), then the
    manifest that vouches for it (both atomic: an interrupted write leaves no manifest, so the next run encodes
    again)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "latents.safetensors"
    with atomic_path(data) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_atomic(folder / "manifest.json", json.dumps({"inputs": manifest, "latents_sha256": sha256_file(data),
                                                       "shape": list(tensors["latents"].shape)}, indent=1))
    make_readable(folder)


def latent_dataset(ds: Dataset, vae_path: str | Path, cache_dir: str | Path, device="cpu", is_main: bool = True,
                   wait=lambda: None, echo=print, vae=None, text_encoder=None,
                   text_folder: Path | None = None) -> tuple[TensorDataset, Path]:
    """``ds`` encoded by the autoencoder at ``vae_path``, through the cache in ``cache_dir``: read when present and
    verified, else encoded by the main process (``is_main``) while the others ``wait`` then read it. Returns the
    latents with their labels and the cache folder. ``vae``: that autoencoder already loaded (else it is loaded).
    A captioned ``ds`` (with ``prompts``) also needs the teacher's ``text_encoder`` (a
    :class:`~cmdistill.prompts.PromptEncoder`) and its pipeline folder ``text_folder``: each distinct caption is
    embedded once into the same cache (:func:`as_dataset`)."""
    vae = load_vae(vae_path, device) if vae is None else vae
    captioned = getattr(ds, "prompts", None) is not None
    if captioned and (text_encoder is None or text_folder is None):
        raise DataError("captioned data need a text-conditional teacher (its tokenizer and text encoder)")
    manifest = cache_manifest(vae, find_vae_folder(vae_path), ds, text_folder if captioned else None)
    folder = Path(cache_dir).expanduser() / cache_key(manifest)
    found = read_cache(folder, manifest) if is_main else None
    if is_main and found is None:
        echo(f"latents: encoding {len(ds)} images with {type(vae).__name__} into {folder}"
             + (f", and their {len(ds.prompts)} distinct captions" if captioned else ""))
        latents, labels = encode_dataset(vae, ds)
        tensors = {"latents": latents, "labels": labels}
        if captioned:
            tensors.update(prompt_ids=ds.prompt_ids.long(), prompt_embeds=encode_prompts(text_encoder, ds.prompts))
        write_cache(folder, manifest, tensors)
    wait()
    found = found if found is not None else read_cache(folder, manifest)
    if found is None:
        raise LatentCacheError(f"latent cache {folder} was not written")
    return found, folder
