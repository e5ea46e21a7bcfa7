"""The teacher trajectory bank: the teacher's ODE solutions from noise, made once (with a progress bar), cached on disk
with a manifest and reused by later runs (issue 13).

Each entry holds the unit noise ``z``, the state ``x_start`` at the student's ``sigma_max`` and the endpoint ``x0``
(the teacher's ODE solved down to ``sigma_min``), plus the class label of a conditional teacher. Where the
trajectories begin (``bank.start``):

* ``student``: at the student's own 1-step start, ``x_start = mu + sigma_max z`` (CM Algorithm 1 with the run's
  prior mean), so ``f(x_start, sigma_max) ~ x0`` is exactly what 1-step sampling asks of the student;
* ``teacher``: at the top of the teacher's range (its unit-noise prior), passing ``sigma_max`` on the way: unbiased
  teacher samples, which is what data-free distillation (``data.name: teacher``) trains on.

Uses: an endpoint regression term beside the consistency loss (``loss.regression_weight``; knowledge distillation,
Luhman & Luhman 2021; SFD, Zhou et al. 2024, arXiv:2409.19681) and data-free distillation.

The manifest names what made the bank (teacher and a fingerprint of its weights, solver, grid, start, prior mean,
guidance, seed, count) and the checksum of the tensors; a bank whose manifest does not match the recipe is refused in
one line (:class:`BankMismatch`), never silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..core.sampling import integrate, start_sample
from ..core.schedules import karras_grid, scaled_to_run
from ..data import DataError
from ..files import sha256_file

BANK_FILE = "bank.safetensors"
MANIFEST = "manifest.json"
BANK_STARTS = ("student", "teacher")
TOP_STEPS = 12  # DDIM steps from the top of the teacher's range down to the student's sigma_max (start: teacher)


class BankMismatch(DataError):
    """A bank folder made for another teacher, grid, start or size than the recipe asks for."""


@dataclass(frozen=True)
class BankSpec:
    """Everything that determines a bank's contents: a bank is reused only when all of it matches."""

    teacher: str
    teacher_fingerprint: str
    start: str
    solver: str
    num_scales: int
    rho: float
    sigma_min: float
    sigma_max: float
    prior_mean_sha256: Optional[str]
    guidance_scale: Optional[float]
    classes: Optional[int]
    seed: int
    count: int


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a network's parameter and buffer tensors (names, shapes, dtypes and bytes); of a network carrying
    a LoRA student's adapters, over its base alone (what the teacher computes with, under the base's own names)."""
    h = hashlib.sha256()
    base = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}
    for name, t in sorted(base.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_fingerprint(teacher: torch.nn.Module, null_class: Optional[int] = None) -> str:
    """:func:`fingerprint` of the teacher's network, its adapter (scheduler: betas, prediction type, ...) and the
    null class its guidance uses: what turns noise into the teacher's ODE solutions besides the bank's own keys."""
    extra = json.dumps({"adapter": teacher.adapter_config(), "null_class": null_class}, sort_keys=True, default=str)
    return hashlib.sha256((fingerprint(teacher.net) + extra).encode()).hexdigest()


def tensor_sha256(t: Optional[torch.Tensor]) -> Optional[str]:
    return None if t is None else hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def make_trajectories(teacher, z: torch.Tensor, spec: BankSpec, prior_mean: Optional[torch.Tensor],
                      **cond) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_start, x0)`` for unit noise ``z``: the state at ``spec.sigma_max`` and the ODE solution at ``sigma_min``
    on the Karras grid of ``spec.num_scales`` points over the student's range (the grid the pairs come from)."""
    if spec.start == "student":
        x_start = start_sample(z, spec.sigma_max, prior_mean)
    else:
        top = karras_grid(TOP_STEPS + 1, spec.sigma_max, teacher.sigma_max)
        x_start = integrate(teacher, z * teacher.prior_std(float(top[0])), top, "ddim", **cond)
    grid = karras_grid(spec.num_scales, spec.sigma_min, spec.sigma_max, spec.rho)
    return x_start, integrate(teacher, x_start, grid, spec.solver, **cond)


def build_bank(teacher, spec: BankSpec, prior_mean: Optional[torch.Tensor], device, batch_size: int = 512,
               progress: bool = True) -> dict[str, torch.Tensor]:
    """``spec.count`` trajectories from noise seeded with ``spec.seed``; conditional teachers get the classes in
    turn (balanced)."""
    from ..core.networks import image_shape


    g = torch.Generator().manual_seed(spec.seed)
    z = torch.randn(spec.count, *image_shape(teacher.net), generator=g)
    labels = None if spec.classes is None else torch.arange(spec.count) % spec.classes
    starts, ends = [], []
    for i in tqdm(range(0, spec.count, batch_size), desc="trajectory bank", disable=not progress, leave=False):
        cond = {} if labels is None else {"class_labels": labels[i:i + batch_size].to(device)}
        xs, x0 = make_trajectories(teacher, z[i:i + batch_size].to(device), spec, prior_mean, **cond)
        starts.append(xs.float().cpu())
        ends.append(x0.float().cpu())
    bank = {"noise": z, "x_start": torch.cat(starts), "x0": torch.cat(ends)}
    if labels is not None:
        bank["labels"] = labels
    return bank


def save_bank(bank: dict[str, torch.Tensor], spec: BankSpec, folder: Path) -> None:
    """``bank.safetensors`` and ``manifest.json`` (the spec and the tensors' checksum), written atomically."""
    from safetensors.torch import save_file

    from ..files import atomic_path, write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / BANK_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in bank.items()}, str(tmp))
        checksum = sha256_file(tmp)
    manifest = {**asdict(spec), "checksum_sha256": checksum, "tensors": sorted(bank)}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_manifest(folder: Path, spec: BankSpec) -> None:
    """One-line :class:`BankMismatch` unless ``folder``'s manifest matches ``spec`` and its tensors its checksum."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BankMismatch(f"trajectory bank {folder} has no readable {MANIFEST} ({type(e).__name__}); remove the "
                           "folder or point bank.path elsewhere") from None
    for key, want in asdict(spec).items():
        have = manifest.get(key)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float))
                                 and abs(have - want) <= 1e-9 * max(1.0, abs(want))):
            show = (lambda v: f"{v[:12]}…" if isinstance(v, str) and len(v) > 16 else repr(v))
            raise BankMismatch(f"trajectory bank {folder} was made with {key} {show(have)}, the recipe asks for "
                               f"{show(want)}; set bank.path to another folder, or remove this one to remake it")
    if sha256_file(folder / BANK_FILE) != manifest.get("checksum_sha256"):
        raise BankMismatch(f"trajectory bank {folder / BANK_FILE} does not match its manifest's checksum (changed "
                           "or truncated); remove the folder to remake it")


def load_or_build_bank(folder: Path, teacher, spec: BankSpec, prior_mean: Optional[torch.Tensor], device,
                       echo=print, progress: bool = True) -> dict[str, torch.Tensor]:
    """The bank in ``folder`` when its manifest matches ``spec`` (refused in one line when it does not); else made
    now, saved and returned."""
    from safetensors.torch import load_file

    if (folder / MANIFEST).is_file() or (folder / BANK_FILE).is_file():
        check_manifest(folder, spec)
        echo(f"trajectory bank: reusing {folder} ({spec.count} trajectories)")
        return load_file(str(folder / BANK_FILE))
    echo(f"trajectory bank: making {spec.count} teacher trajectories ({spec.solver}, {spec.num_scales} points, "
         f"start {spec.start}) into {folder}")
    bank = build_bank(teacher, spec, prior_mean, device, progress=progress)
    save_bank(bank, spec, folder)
    return bank


def constant_weight(t: float) -> float:
    """The regression term at ``loss.regression_weight`` throughout."""
    return 1.0


@scaled_to_run
def linear_decay_weight(t: float) -> float:
    """The regression term decays linearly to 0 at ``train.max_steps`` (``t = step / max_steps``)."""
    return max(0.0, 1.0 - t)


# the regression term's weight over training, as a factor of loss.regression_weight
REGRESSION_SCHEDULES = {"constant": constant_weight, "linear_decay": linear_decay_weight}


def bank_folder(path: Optional[str], spec: BankSpec) -> Path:
    """``bank.path``, or ``runs/banks/<teacher folder name>-<12 hex digits of the spec's hash>``: a bank made for
    the same spec is found again by any run."""
    if path:
        return Path(os.path.expanduser(path))
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return Path("runs") / "banks" / f"{Path(spec.teacher.rstrip('/')).name or 'teacher'}-{digest}"


def bank_dataset(bank: dict[str, torch.Tensor]):
    """The bank's endpoints as a dataset of ``(x0, label)`` (``(x0,)`` for an unconditional teacher): data-free
    distillation's training data, the teacher's own samples."""
    from torch.utils.data import TensorDataset

    return TensorDataset(bank["x0"], bank["labels"]) if "labels" in bank else TensorDataset(bank["x0"])


def regression_batch(bank: dict[str, torch.Tensor], n: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` bank entries drawn uniformly with the global RNG: ``(x_start, x0, cond)``."""
    idx = torch.randint(len(bank["x0"]), (n,))
    cond = {"class_labels": bank["labels"][idx].to(device)} if "labels" in bank else {}
    return bank["x_start"][idx].to(device), bank["x0"][idx].to(device), cond
