"""``cmdistill evaluate RUN_DIR``: the student at 1…4 steps against its teacher.

For k = 1…K: FID of the student (CM Algorithm 1) and of the teacher's DDIM-k, plus the teacher's 50-step FID;
for every sampler the paired distance (MSE, PSNR, LPIPS where its weights are available) to the teacher-50
samples drawn from the same initial noise; images per second; a side-by-side PNG (teacher-50 row, student rows);
``report.json`` and ``report.md`` in the run folder. ``--search-sigmas`` first picks the 2/3/4-step sigmas by
FID (CM's greedy one-at-a-time search over a candidate grid) and stores them in ``<run>/student``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.schedules import DEFAULT_TEACHER_SPACING, karras_grid
from ..core.tensors import image_shape
from ..images import make_grid
from .features import FIDMeter, find_digits_classifier, load_classifier, real_vs_real_fid
from .generate import initial_noise, load_student, run_batches, student_fn, teacher_fn

FLOOR_MAX_IMAGES = 20_000   # real-vs-real FID floor only for small data sets (digits: 1797)
REAL_MAX_IMAGES = 50_000    # FID reference statistics: the first 50k training images (CIFAR-10: all)


class EvalError(RuntimeError):
    """A run folder that cannot be evaluated."""


# --------------------------------------------------------------------------- metrics


def paired_distances(x: torch.Tensor, ref: torch.Tensor, lpips: nn.Module | None = None,
                     batch_size: int = 250) -> dict:
    """Per-pair distances between two sample sets in [-1, 1] made from the same noise: MSE and PSNR on [0, 1]
    pixels (PSNR = 10 log10(1 / MSE) of the whole set; ``None`` when identical), mean LPIPS when available."""
    mse = float(((x.float() - ref.float()) / 2).pow(2).mean())
    out = {"mse": mse, "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else None, "lpips": None}
    if lpips is not None:
        dev = next(lpips.parameters()).device if isinstance(lpips, nn.Module) else x.device
        with torch.no_grad():
            d = [lpips(x[i:i + batch_size].to(dev), ref[i:i + batch_size].to(dev)).cpu()
                 for i in range(0, len(x), batch_size)]
        out["lpips"] = float(torch.cat(d).mean())
    return out


def load_lpips(net: str = "vgg", device="cpu") -> tuple[nn.Module | None, str]:
    """LPIPS (CM's VGG variant) when torchvision's backbone weights are already cached; never downloads."""
    import torchvision.models as tvm

    weights = {"vgg": tvm.VGG16_Weights.IMAGENET1K_V1, "alex": tvm.AlexNet_Weights.IMAGENET1K_V1}[net]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        return None, f"unavailable: {net} backbone weights not in {cached.parent} (download them once)"
    from ..core.losses import LPIPSDistance

    try:
        return LPIPSDistance(net, resize=224).to(device), f"lpips-{net}"
    except Exception as e:
        return None, f"unavailable: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- multistep sigma search


def candidate_taus(sigma_min: float, sigma_max: float, n: int = 12) -> list[float]:
    """``n`` candidate intermediate noise levels: the interior of a Karras grid (rho = 7), descending."""
    return karras_grid(n + 2, sigma_min, sigma_max).tolist()[1:-1]


def search_multistep_sigmas(score: Callable[[list[float]], float], sigma_max: float, candidates: Sequence[float],
                            max_steps: int = 4, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Greedy search (CM, Sec. 6: the taus are "pinpointed one at a time" to minimise FID): start from
    ``[sigma_max]``; for k = 2…max_steps insert each unused candidate into the k-1 taus found so far (kept
    descending), keep the insertion with the lowest score. Returns ``{"sigmas": {k: [...]}, "fid": {k: best},
    "trace": [[sigmas, fid], ...]}``."""
    taus, result = [float(sigma_max)], {"sigmas": {}, "fid": {}, "trace": []}
    for k in range(2, max_steps + 1):
        trials = [sorted(taus + [float(c)], reverse=True) for c in candidates if float(c) not in taus and c < sigma_max]
        if not trials:
            break
        scores = []
        for t in trials:
            scores.append(score(t))
            result["trace"].append([t, scores[-1]])
            progress(f"  search {k}-step {['%.4g' % s for s in t]}: FID {scores[-1]:.3f}")
        best = int(np.nanargmin(scores))
        taus = trials[best]
        result["sigmas"][k], result["fid"][k] = taus, scores[best]
    return result


def store_multistep_sigmas(pipe, table: dict, student_dir: Path) -> None:
    """Write the new sigmas into ``student_dir/model_index.json`` (``save_pretrained`` into a temporary folder,
    then an atomic replace of the index: the loaded weights are never overwritten while mapped)."""
    pipe.set_multistep_sigmas(table)
    with tempfile.TemporaryDirectory(dir=student_dir.parent) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.replace(Path(tmp) / "model_index.json", student_dir / "model_index.json")


# --------------------------------------------------------------------------- pictures and tables


def side_by_side(rows: dict[str, torch.Tensor], path: Path, ncol: int = 8) -> None:
    """One row per sampler (same noise in each column), a label on the left."""
    from PIL import Image, ImageDraw

    up = max(1, 64 // next(iter(rows.values())).shape[-1])
    strips = [make_grid(x[:ncol], nrow=ncol, upscale=up) for x in rows.values()]
    label_w, h = 110, strips[0].shape[0]
    canvas = Image.new("RGB", (label_w + strips[0].shape[1], h * len(strips)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, strip) in enumerate(zip(rows, strips)):
        img = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).convert("RGB")
        canvas.paste(img, (label_w, r * h))
        draw.text((4, r * h + h // 2 - 6), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else ("∞" if isinstance(v, float) and math.isinf(v) else format(v, spec))


def report_table(report: dict) -> str:
    """Markdown table: one row per sampler."""
    lines = ["| sampler | NFE | FID | MSE vs ref | PSNR vs ref | LPIPS vs ref | img/s |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["samplers"].items():
        d = s["vs_teacher_ref"]
        lines.append(f"| {name} | {s['nfe']} | {_fmt(s['fid'])} | {_fmt(d['mse'], '.5f')} | "
                     f"{_fmt(d['psnr'] if d['psnr'] is not None else math.inf, '.2f')} | {_fmt(d['lpips'], '.4f')} | "
                     f"{_fmt(s['images_per_s'], '.1f')} |")
    return "\n".join(lines)


def _finite(obj):
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_report(report: dict, run_dir: Path) -> None:
    (run_dir / "report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    floor = report.get("fid_floor_real_vs_real")
    md = [f"# Evaluation of {run_dir.name}", "",
          f"Teacher `{report['teacher']}`; {report['num_samples']} samples per sampler (seed {report['seed']}); "
          f"FID with `{report['feature_net']}` features against {report['num_real']} real images"
          + (f"; real-vs-real floor {floor:.3f}." if floor is not None else "."),
          f"Paired distances (\"vs ref\") are to the `{report['reference']}` samples from the same initial noise "
          f"(LPIPS: {report['lpips']}).", "", report_table(report), "",
          "![teacher vs student, same noise](side_by_side.png)", ""]
    if report.get("sigma_search"):
        md += ["Multistep sigmas chosen by FID search: "
               + "; ".join(f"{k}: {[round(s, 4) for s in v]}" for k, v in report["sigma_search"]["sigmas"].items()),
               ""]
    (run_dir / "report.md").write_text("\n".join(md))


# --------------------------------------------------------------------------- the evaluation


@dataclass
class EvalRun:
    """What an evaluation needs from a run folder."""

    run_dir: Path
    recipe: Any
    pipe: Any            # ConsistencyPipeline
    teacher: nn.Module   # the teacher's EDM denoiser
    teacher_path: str
    shape: tuple         # (C, H, W)
    real: torch.Tensor   # real images in [-1, 1]
    device: torch.device


@dataclass
class Sampler:
    name: str
    kind: str            # student | teacher
    steps: int
    nfe: int
    fn: Callable         # (z, generator) -> x
    sigmas: list | None = None


def load_run(run_dir: Path, teacher_path: str | None, device) -> EvalRun:
    """Recipe, student pipeline, teacher and real images of a run (one-line errors for anything missing)."""
    from ..config import load_recipe
    from ..data import make_dataset
    from ..teachers import load_teacher

    if not (run_dir / "recipe.yaml").is_file():
        raise EvalError(f"{run_dir} is not a cmdistill run folder (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    teacher_path = teacher_path or recipe.teacher.path
    pipe = load_student(run_dir, device)  # the run's student/, or one line saying the run has none
    teacher = load_teacher(teacher_path, recipe.teacher.kind).to(device)
    shape = image_shape(pipe.unet)
    if shape != image_shape(teacher.net):
        raise EvalError(f"student images {shape} do not match the teacher's {image_shape(teacher.net)}")
    ds = make_dataset(recipe.data.name, recipe.data.root, recipe.data.resolution or shape[1], shape[0])
    real = torch.stack([ds[i][0] for i in range(min(len(ds), REAL_MAX_IMAGES))])
    return EvalRun(run_dir, recipe, pipe, teacher, str(teacher_path), shape, real, device)


def feature_facts(feature_net, run: EvalRun, seed: int, search: list) -> dict:
    """Name of the feature network, the digits classifier's test accuracy, the real-vs-real FID floor."""
    facts = {"feature_net": feature_net if isinstance(feature_net, str) else type(feature_net).__name__}
    if feature_net == "digits":
        folder = find_digits_classifier(search)
        facts["feature_net_test_accuracy"] = load_classifier(folder)[1].get("test_accuracy") if folder else None
    if len(run.real) <= FLOOR_MAX_IMAGES:
        facts["fid_floor_real_vs_real"] = real_vs_real_fid(feature_net, run.real, seed, run.device, search)
    else:
        facts["fid_floor_real_vs_real"] = None
    return facts


def sigma_search(run: EvalRun, fid: FIDMeter, max_steps: int, num: int, candidates: int, seed: int,
                 batch_size: int, echo) -> dict:
    """:func:`search_multistep_sigmas` with student FID as the score (its own noise, ``seed + 1000``), stored in
    ``<run>/student``; returns the report entry."""
    fn = run.pipe.consistency_function
    echo(f"searching 2…{max_steps}-step sigmas by FID on {num} samples")

    def score(sig):
        z, g = initial_noise(num, run.shape, seed + 1000)
        return fid(run_batches(student_fn(run.pipe, sig), z, g, batch_size, run.device, "search", False)[0])

    res = search_multistep_sigmas(score, fn.sigma_max, candidate_taus(fn.sigma_min, fn.sigma_max, candidates),
                                  max_steps, echo)
    store_multistep_sigmas(run.pipe, res["sigmas"], run.run_dir / "student")
    echo(f"stored in {run.run_dir / 'student' / 'model_index.json'}")
    return {"num_samples": num, "sigmas": {str(k): v for k, v in res["sigmas"].items()},
            "fid": {str(k): v for k, v in res["fid"].items()}, "trace": res["trace"]}


def make_samplers(run: EvalRun, max_steps: int, teacher_sampler: str, teacher_steps: int,
                  spacing: str) -> list[Sampler]:
    """The reference teacher sampler first, then the student and the teacher's DDIM at 1…max_steps."""
    from ..core.solvers import SOLVER_NFE

    nfe = teacher_steps * SOLVER_NFE[teacher_sampler] - (teacher_sampler == "heun")  # last Heun step: Euler
    out = [Sampler(f"teacher-{teacher_sampler}-{teacher_steps}", "teacher", teacher_steps, nfe,
                   teacher_fn(run.teacher, teacher_sampler, teacher_steps, spacing))]
    for k in range(1, max_steps + 1):
        sig = run.pipe.sigmas_for(k)
        out.append(Sampler(f"student-{k}", "student", k, k, student_fn(run.pipe, sig), sig))
    out += [Sampler(f"teacher-ddim-{k}", "teacher", k, k, teacher_fn(run.teacher, "ddim", k, spacing))
            for k in range(1, max_steps + 1) if f"teacher-ddim-{k}" != out[0].name]
    return out


def measure(samplers: list[Sampler], run: EvalRun, fid: FIDMeter, lpips, num: int, seed: int, batch_size: int,
            echo, progress: bool) -> tuple[dict, dict]:
    """Every sampler from the same initial noise (student multistep noise: one stream, ``seed + 1``): FID, paired
    distances to the first (reference) sampler, images per second. Returns ``(entries, images)``."""
    entries, images = {}, {}
    ref = samplers[0].name
    for s in samplers:
        z, _ = initial_noise(num, run.shape, seed)
        x, ips = run_batches(s.fn, z, torch.Generator().manual_seed(seed + 1), batch_size, run.device, s.name,
                             progress)
        images[s.name] = x
        entries[s.name] = {"kind": s.kind, "steps": s.steps, "nfe": s.nfe, "sigmas": s.sigmas, "fid": fid(x),
                           "images_per_s": ips, "vs_teacher_ref": paired_distances(x, images[ref], lpips)}
        echo(f"{s.name:>18}: FID {entries[s.name]['fid']:.3f}, {ips:.1f} img/s")
    return entries, images


def evaluate(run_dir: str | Path, num_samples: int | None = None, batch_size: int | None = None,
             max_steps: int = 4, teacher_steps: int = 50, teacher_sampler: str = "ddim",
             teacher_spacing: str = DEFAULT_TEACHER_SPACING, feature_net: str | nn.Module | None = None,
             teacher_path: str | None = None, search_sigmas: bool | None = None, search_num: int | None = None,
             search_candidates: int = 12, seed: int = 0, device=None, use_lpips: bool = True,
             echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Evaluate the run in ``run_dir`` (its ``recipe.yaml`` names the teacher, data and eval settings; arguments
    left ``None`` come from there). Writes ``report.json``, ``report.md`` and ``side_by_side.png``; returns the
    report. ``feature_net``: ``inception``, ``digits`` or an ``nn.Module`` (images in [0, 1] -> features)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # 1. the run, its eval settings, the FID reference statistics
    run = load_run(Path(run_dir), teacher_path, device)
    ec = run.recipe.eval
    num, batch_size = num_samples or ec.num_samples, batch_size or ec.batch_size
    feature_net = ec.feature_net if feature_net is None else feature_net
    search_sigmas = ec.search_sigmas if search_sigmas is None else search_sigmas
    search = [Path(run.teacher_path) / "classifier"]
    fid = FIDMeter(feature_net, device, batch_size, search).add_real(run.real)
    report: dict = {"run_dir": str(run.run_dir), "teacher": run.teacher_path, "device": str(device),
                    "num_samples": num, "num_real": len(run.real), "seed": seed, "teacher_spacing": teacher_spacing,
                    **feature_facts(feature_net, run, seed, search)}
    # 2. optional multistep-sigma search, stored in the student before it is measured
    if search_sigmas:
        report["sigma_search"] = sigma_search(run, fid, max_steps, search_num or min(num, 500), search_candidates,
                                              seed, batch_size, echo)
    # 3. every sampler from the same noise
    samplers = make_samplers(run, max_steps, teacher_sampler, teacher_steps, teacher_spacing)
    lpips, report["lpips"] = load_lpips(run.recipe.loss.lpips_net, device) if use_lpips else (None, "disabled")
    report["reference"] = samplers[0].name
    report["samplers"], images = measure(samplers, run, fid, lpips, num, seed, batch_size, echo, progress)
    # 4. pictures and report
    rows = [samplers[0].name] + [f"student-{k}" for k in (1, 2, 4) if k <= max_steps]
    side_by_side({n: images[n] for n in rows}, run.run_dir / "side_by_side.png")
    report["side_by_side"] = "side_by_side.png"
    write_report(report, run.run_dir)
    echo(report_table(report))
    echo(f"report written to {run.run_dir / 'report.json'} and {run.run_dir / 'report.md'}")
    return report


__all__ = ["evaluate", "EvalError", "paired_distances", "search_multistep_sigmas", "candidate_taus"]
