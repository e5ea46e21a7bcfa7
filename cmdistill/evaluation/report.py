"""The evaluation report: the per-sampler table, the headline rows (student against the best training-free sampler
at equal and at twice the network evaluations, and the wall-clock speed-up at equal quality), ``report.json``,
``report.md`` and the labelled ``side_by_side.png``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..images import make_grid


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else ("∞" if isinstance(v, float) and math.isinf(v) else format(v, spec))


def _pm(s: dict, key: str, spec: str) -> str:
    """``value`` or ``mean ± std`` over noise seeds."""
    std = s.get(f"{key}_std")
    return _fmt(s[key], spec) + (f" ± {_fmt(std, spec)}" if std is not None else "")


def report_table(report: dict) -> str:
    """Markdown table: one row per sampler, then the floors: a latent teacher's VAE reconstructions of real images
    (every sample passes that decoder) and real vs real; a class-accuracy column for a conditional run."""
    acc = any("class_accuracy" in s for s in report["samplers"].values())
    lines = ["| sampler | NFE | FID | precision | recall |" + (" class accuracy |" if acc else "")
             + " MSE vs ref | PSNR vs ref | LPIPS vs ref | img/s |",
             "|---|---|---|---|---|" + ("---|" if acc else "") + "---|---|---|---|"]
    for name, s in report["samplers"].items():
        d = s["vs_teacher_ref"]
        lines.append(f"| {name} | {s['nfe']} | {_pm(s, 'fid', '.3f')} | {_pm(s, 'precision', '.3f')} | "
                     f"{_pm(s, 'recall', '.3f')} | " + (f"{_pm(s, 'class_accuracy', '.3f')} | " if acc else "")
                     + f"{_fmt(d['mse'], '.5f')} | "
                     f"{_fmt(d['psnr'] if d['psnr'] is not None else math.inf, '.2f')} | {_fmt(d['lpips'], '.4f')} | "
                     f"{_fmt(s['images_per_s'], '.1f')} |")
    rr, vr = report.get("real_vs_real"), report.get("vae_reconstruction")
    if vr:
        lines.append(f"| VAE reconstructions vs real ({floor_label(vr)}) | – | {_fmt(vr['fid'])} | "
                     f"{_fmt(vr['precision'])} | {_fmt(vr['recall'])} | " + ("– | " if acc else "") + "– | – | – | – |")
    if rr:
        lines.append(f"| real vs real ({floor_label(rr)}) | – | {_fmt(rr['fid'])} | {_fmt(rr['precision'])} | "
                     f"{_fmt(rr['recall'])} | " + ("– | " if acc else "") + "– | – | – | – |")
    if rr and "num_a" in rr:
        lines.append(f"\nThe floor scores {rr['num_a']} real images against {rr['num_b']} others (disjoint); the "
                     f"samplers are scored {report['num_samples']} generated against {report['num_real']} real. "
                     + ("Its scored set is theirs, its reference the rest of the real images. "
                        if rr["num_a"] == report["num_samples"] else
                        "Fewer real images than twice the samples: two halves, the closest disjoint sets get. ")
                     + "FID falls as sets grow and the k-NN radii of precision and recall shrink with them, so the "
                     "floor is a reference at its own sizes, not a bound at the samplers'.")
    return "\n".join(lines)


def floor_label(rr: dict) -> str:
    """``two halves, 898 vs 898`` or ``16 vs 1781`` (an old report without sizes: ``two halves``)."""
    if "num_a" not in rr:
        return "two halves"
    sizes = f"{rr['num_a']} vs {rr['num_b']}"
    return f"two halves, {sizes}" if rr["num_a"] == rr["num_b"] else sizes


def headline(samplers: dict, ks=(1, 2, 4)) -> list[dict]:
    """For each student step count k: the best (lowest-FID) training-free sampler using at most k and at most 2k
    network evaluations from either start (the teacher's, or the student's own: labels ending in ``@student``; the
    row records which), and the speed-up at equal quality: the student's images/s over those of the fastest
    training-free sampler whose FID is at most the student's (``None`` when none of them reaches it)."""
    free = {n: s for n, s in samplers.items() if s["kind"] != "student"}
    rows = []
    for k in ks:
        st = samplers.get(f"student-{k}")
        if st is None:
            continue

        def best(limit):
            cands = [(s["fid"], n) for n, s in free.items() if s["nfe"] <= limit]
            return min(cands)[1] if cands else None

        match = [n for n, s in free.items() if s["fid"] <= st["fid"]]
        fastest = max(match, key=lambda n: free[n]["images_per_s"]) if match else None
        at_k, at_2k = best(k), best(2 * k)
        rows.append({"student": f"student-{k}", "fid": st["fid"], "precision": st["precision"],
                     "best_at_k": at_k, "best_at_2k": at_2k, "equal_quality": fastest,
                     "best_at_k_start": free[at_k].get("start", "teacher") if at_k else None,
                     "best_at_2k_start": free[at_2k].get("start", "teacher") if at_2k else None,
                     "speedup": st["images_per_s"] / free[fastest]["images_per_s"] if fastest else None})
    return rows


def headline_table(report: dict) -> str:
    s = report["samplers"]

    def cell(name):
        return "–" if name is None else f"{name} ({_fmt(s[name]['fid'])})"

    lines = ["| student | FID | precision | best training-free at ≤ k NFE (FID) | at ≤ 2k NFE (FID) | "
             "fastest training-free sampler as good | wall-clock speed-up |", "|---|---|---|---|---|---|---|"]
    for r in report["headline"]:
        speed = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "no training-free sampler measured is as good"
        lines.append(f"| {r['student']} | {_fmt(r['fid'])} | {_fmt(r['precision'])} | {cell(r['best_at_k'])} | "
                     f"{cell(r['best_at_2k'])} | {cell(r['equal_quality'])} | {speed} |")
    return "\n".join(lines)


def side_by_side(rows: dict[str, torch.Tensor], path: Path, ncol: int = 8,
                 column_label: str = "noise {i}") -> None:
    """One row per sampler (the same noise in each column), its label (sampler, NFE, FID) on the left and the
    column labels (which starting noise) on top."""
    from PIL import Image, ImageDraw

    from ..images import GAP, PAGE, upscale_for

    x0 = next(iter(rows.values()))
    up = upscale_for(x0.shape[-1])
    strips = [make_grid(x[:ncol], nrow=ncol, upscale=up) for x in rows.values()]
    label_w, head, h = 8 + 6 * max(len(n) for n in rows), 16, strips[0].shape[0]
    cell = (strips[0].shape[1] - GAP) // ncol
    canvas = Image.new("RGB", (label_w + strips[0].shape[1], head + h * len(strips)), (PAGE,) * 3)
    draw = ImageDraw.Draw(canvas)
    for i in range(min(ncol, len(x0))):
        draw.text((label_w + GAP + i * cell + 2, 3), column_label.format(i=i), fill=(90, 90, 90))
    for r, (name, strip) in enumerate(zip(rows, strips)):
        img = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).convert("RGB")
        canvas.paste(img, (label_w, head + r * h))
        draw.text((4, head + r * h + h // 2 - 6), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def finite(obj):
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_report(report: dict, run_dir: Path, suffix: str = "") -> None:
    """``report<suffix>.json`` and ``report<suffix>.md`` in ``run_dir``."""
    (run_dir / f"report{suffix}.json").write_text(json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    seeds = report.get("seeds", 1)
    md = [f"# Evaluation of {run_dir.name}", "",
          f"Teacher `{report['teacher']}`; {report['num_samples']} samples per sampler and noise seed "
          f"({seeds} seed{'s' if seeds > 1 else ''} from {report['seed']}"
          + ("; mean ± standard deviation over seeds" if seeds > 1 else "") + "). "
          f"FID, precision and recall (k-NN manifolds, k = 3) in `{report['feature_net']}` features against "
          f"{report['num_real']} real images; the last row is the floor, real images scored against other real images "
          "(its sizes in its name).",
          *start_note(report),
          f"Paired distances (\"vs ref\") are to the samples of the reference sampler of the same start, from the same "
          f"initial noise: `{report['reference']}`" + "".join(f" or `{r}`" for r in _other_refs(report))
          + f" (LPIPS: {report['lpips']}); a sampler is never paired with one that started elsewhere. Training-free "
          "baselines: teacher DDIM, " + ", ".join(report.get("baselines", []))
          + f" (timestep spacing `{report['teacher_spacing']}` from the teacher's start).", "",
          *conditional_note(report),
          "## Headline", "", headline_table(report), "", "## All samplers", "", report_table(report), "",
          f"![samplers, same noise in each column]({report.get('side_by_side', 'side_by_side.png')})", ""]
    if report.get("sigma_search"):
        ss = report["sigma_search"]
        where = "stored in the student" if ss.get("stored") else "this report only, not stored"
        md += [f"Multistep sigmas chosen by FID search ({where}): "
               + "; ".join(f"{k}: {[round(s, 4) for s in v]}" for k, v in ss["sigmas"].items()), ""]
    (run_dir / f"report{suffix}.md").write_text("\n".join(md))


def _other_refs(report: dict) -> list[str]:
    return sorted({s["ref"] for s in report["samplers"].values() if s.get("ref") not in (None, report["reference"])})


def start_note(report: dict) -> list[str]:
    """Where the samplers start, as a sentence (nothing when every sampler starts at the teacher's own start)."""
    st = report.get("starts", {})
    if "student" not in st:
        return []
    t, s = st["teacher"], st["student"]
    prior = "the data mean plus noise" if s["prior"] == "data_mean" else "noise alone"
    return [f"Two starts. Names ending in `@student` start where the student does: sigma {s['sigma_max']:.4g} from "
            f"{prior} (`mu + {s['sigma_max']:.4g} z`), the teacher solving its ODE from there (DDIM, DPM-Solver++ and "
            "UniPC on the trailing timestep spacing of the range left, Heun on a Karras grid); the "
            f"others start at the teacher's sigma_max ({t['sigma_max']:.4g}) from noise alone. The headline names the "
            "best training-free sampler from either start.", ""]


def conditional_note(report: dict) -> list[str]:
    """What a class-conditional report measures, as a paragraph (nothing for an unconditional run)."""
    by = report.get("class_accuracy_by")
    if report.get("prompts") is not None:
        pr = report["prompts"]
        return [f"Text-conditional: {pr['count']} prompts ({pr['source']}; e.g. \"{pr['examples'][0]}\"); every "
                f"teacher sampler uses classifier-free guidance at w = {report['guidance_scale']:g} against the empty "
                "prompt (one NFE is one guided network call on a doubled batch), the student samples at the same w. "
                + (f"Prompt agreement (the class accuracy column): the share of samples the {by} assigns to their "
                   "prompt's class." if by else "No prompt agreement: the prompts have no classes of the data, or "
                   "there is no classifier for it."), ""]
    if report.get("classes") is None:
        return []
    return [f"Class-conditional: the samples go through the {report['classes']} classes in turn; every teacher "
            f"sampler uses classifier-free guidance at w = {report['guidance_scale']:g} (one NFE is one guided "
            "network call on a doubled batch), the student samples at the same w. "
            + (f"Class accuracy: the share of samples the {by} assigns to the class asked for." if by else
               "No classifier for this data: no class accuracy."), ""]
