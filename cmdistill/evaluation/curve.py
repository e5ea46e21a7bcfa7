"""Curves over a run: ``cmdistill evaluate RUN --checkpoints all|LIST`` scores the evaluation-EMA weights saved in
the run's checkpoints (read only: nothing in the run is written but ``curve.json`` and ``curve.png``).

For each checkpoint and each step count in 1, 2, 4: FID and precision (:mod:`.metrics`) against the training
images, sampled with the run's ``ConsistencyPipeline`` sampler (the stored multistep sigmas of ``<run>/student``
where it exists, else the defaults) from the same noise as ``cmdistill evaluate``. The teacher's 50-step sampler
and the best training-free baseline of ``report.json`` (when the run has one) are drawn as horizontal lines.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..core.consistency import make_student
from ..core.sampling import default_multistep_sigmas
from ..export.pipeline import ConsistencyPipeline
from .features import FIDMeter
from .generate import initial_noise, latent_decoder, run_batches, student_fn

EMA_PREFIX = "ema_model."  # keys of the evaluation EMA's network inside a checkpoint's ema.safetensors


def select_checkpoints(run_dir: Path, which: str) -> list[Path]:
    """``all`` or a comma-separated list of steps, among the run's complete checkpoints."""
    from .evaluate import EvalError

    ckpt_dir = run_dir / "checkpoints"
    found = {int(p.name.split("_")[1]): p for p in sorted(ckpt_dir.glob("step_*")) if (p / "ema.safetensors").is_file()}
    if not found:
        raise EvalError(f"{run_dir} has no checkpoint with an ema.safetensors in {ckpt_dir}")
    if which == "all":
        return [found[k] for k in sorted(found)]
    try:
        steps = [int(s) for s in which.replace(",", " ").split()]
    except ValueError:
        raise EvalError(f"--checkpoints takes 'all' or steps separated by commas, got {which!r}") from None
    missing = [s for s in steps if s not in found]
    if missing:
        raise EvalError(f"no checkpoint at step {missing[0]} in {ckpt_dir} (have {', '.join(map(str, sorted(found)))})")
    return [found[s] for s in steps]


def load_ema_student(run, ckpt: Path, template):
    """The checkpoint's evaluation-EMA consistency function: ``template`` (built from the run's teacher and
    recipe) with the EMA weights loaded from ``ckpt/ema.safetensors`` (safetensors, read only)."""
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "ema.safetensors"))
    if any(k.startswith("lora.") for k in state):
        from .evaluate import EvalError

        raise EvalError(f"{ckpt} holds a LoRA student's adapters: the checkpoint curve of LoRA runs is not built yet")
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    template.load_state_dict(ema, strict=True)
    return template


def student_template(run):
    """A consistency function of the run's architecture, boundary and guidance, with the run's 1-step prior mean."""
    from ..core.guidance import attach_guidance
    from ..data import make_dataset, prior_mean
    from ..latents import latent_dataset
    from ..teachers import teacher_autoencoder
    from .evaluate import EvalError

    r = run.recipe
    sc = r.student
    fn = make_student(run.teacher, sc.boundary, sc.sigma_data, sc.boundary_scale, sc.sigma_max,
                      sc.parametrization)
    attach_guidance(fn, r.guidance.scale, r.guidance.w_range)
    fn.eval()
    if run.pipe is not None:  # the exported student stores the mean the run trained with
        mean = run.pipe.consistency_function.prior_mean
    elif r.data.name == "teacher":  # data-free: the mean of the bank's samples, stored only in the student
        raise EvalError(f"{run.run_dir} is data-free and has no student/ to take its 1-step start from")
    elif run.vae is not None:  # a latent run starts from the mean of its cached latents, not of the images
        pixels = make_dataset(r.data.name, r.data.root, r.data.resolution or run.vae.config.sample_size,
                              run.vae.config.in_channels)
        ds, _ = latent_dataset(pixels, teacher_autoencoder(run.teacher_path), r.data.latent_cache, run.device,
                               vae=run.vae)
        mean = prior_mean(sc.prior, ds, False)
    else:
        ds = make_dataset(r.data.name, r.data.root, r.data.resolution or run.shape[1], run.shape[0])
        mean = prior_mean(sc.prior, ds, r.data.hflip)
    fn.prior_mean = None if mean is None else mean.to(run.device)
    return fn.to(run.device)


def reference_lines(run_dir: Path) -> dict:
    """The teacher-50 and best baseline FID and precision from the run's report.json, if it has one."""
    path = run_dir / "report.json"
    if not path.is_file():
        return {}
    rep = json.loads(path.read_text())
    s = rep.get("samplers", {})
    out = {}
    if rep.get("reference") in s:
        out[rep["reference"]] = {k: s[rep["reference"]].get(k) for k in ("fid", "precision")}
    base = [n for n, e in s.items() if e.get("kind") == "baseline"]
    if base:
        best = min(base, key=lambda n: s[n]["fid"])
        out[f"best baseline ({best})"] = {k: s[best].get(k) for k in ("fid", "precision")}
    return out


def evaluate_checkpoints(run_dir: str | Path, which: str = "all", num_samples: int | None = None,
                         batch_size: int | None = None, feature_net=None, seed: int = 0, device=None,
                         steps=(1, 2, 4), echo: Callable[[str], None] = print,
                         guidance_scale: float | None = None) -> dict:
    """Score the chosen checkpoints of ``run_dir``; write ``curve.json`` and ``curve.png``; return the curve. A
    class-conditional run is scored over its classes in turn at ``guidance_scale`` (default: its own; an explicit
    one writes ``curve-wW.json``/``.png``)."""
    from .evaluate import load_run_without_student

    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpts = select_checkpoints(run_dir, which)
    run = load_run_without_student(run_dir, device, guidance_scale)
    ec = run.recipe.eval
    num, batch_size = num_samples or ec.num_samples, batch_size or ec.batch_size
    feature_net = ec.feature_net if feature_net is None else feature_net
    meter = FIDMeter(feature_net, device, batch_size, [Path(run.teacher_path) / "classifier"]).add_real(run.real)
    fn = student_template(run)
    stored = run.pipe.multistep_sigmas if run.pipe is not None else {}
    curve = {"run_dir": str(run_dir), "num_samples": num, "seed": seed, "feature_net": str(feature_net),
             "steps": list(steps), "checkpoints": [], "reference": reference_lines(run_dir)}
    for ckpt in ckpts:
        load_ema_student(run, ckpt, fn)
        sig = {k: stored.get(str(k)) or default_multistep_sigmas(fn.sigma_min, fn.sigma_max, k) for k in steps}
        pipe = ConsistencyPipeline.from_student(fn, {k: v for k, v in sig.items() if k > 1})
        pipe.set_progress_bar_config(disable=True)
        row = {"step": int(ckpt.name.split("_")[1])}
        for k in steps:
            z, _ = initial_noise(num, run.shape, seed)
            x, _ = run_batches(student_fn(pipe, sig[k], guidance_scale=run.guidance_scale), z,
                               torch.Generator().manual_seed(seed + 1), batch_size, device, f"{ckpt.name} {k}-step",
                               False, run.conditions(num), latent_decoder(run.vae))
            row[str(k)] = meter.score(x)
        curve["checkpoints"].append(row)
        echo(f"{ckpt.name}: " + "; ".join(f"{k}-step FID {row[str(k)]['fid']:.3f} precision "
                                         f"{row[str(k)]['precision']:.3f}" for k in steps))
    suffix = f"-w{run.guidance_scale:g}" if guidance_scale is not None else ""  # an explicit w keeps the run's own
    (run_dir / f"curve{suffix}.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot_curve(curve, run_dir / f"curve{suffix}.png")
    echo(f"curve written to {run_dir / f'curve{suffix}.json'} and {run_dir / f'curve{suffix}.png'}")
    return curve


LINE_STYLES = ("-", "--", ":", "-.")  # one per run when several curves share a plot


def plot_curve(curve: dict, path: Path) -> None:
    """FID (left) and precision (right) of one run against the training step (``curve.png``)."""
    title = f"{Path(curve['run_dir']).name}: evaluation-EMA checkpoints, {curve['num_samples']} samples"
    plot_curves([("student", curve)], path, title)


def plot_curves(curves: list[tuple[str, dict]], path: Path, title: str | None = None) -> None:
    """FID (left, log axis) and precision (right) against the training step for one or more ``(label, curve)``
    runs: one colour per step count, one line style per run, the first run's references as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10 if len(curves) == 1 else 11, 4.2))
    first = curves[0][1]
    for ax, key in zip(axes, ("fid", "precision")):
        for style, (label, curve) in zip(LINE_STYLES, curves):
            xs = [c["step"] for c in curve["checkpoints"]]
            for i, k in enumerate(curve["steps"]):
                ax.plot(xs, [c[str(k)][key] for c in curve["checkpoints"]], linestyle=style, marker="o",
                        markersize=4, color=f"C{i}", label=f"{label} {k}-step")
        for j, (name, ref) in enumerate(first.get("reference", {}).items()):
            if ref.get(key) is not None:
                ax.axhline(ref[key], color=f"C{len(first['steps']) + j}", linestyle="--", label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{key.upper() if key == 'fid' else key} ({first['feature_net']} features)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8 if len(curves) == 1 else 7, ncol=1 if len(curves) == 1 else 2)
    fig.suptitle(title or f"evaluation-EMA checkpoints, {first['num_samples']} samples, evaluation seed "
                          f"{first['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
