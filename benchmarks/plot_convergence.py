"""Overlay the convergence curves of several runs (docs/benchmarks.md, "Convergence"): FID and precision of each
run's evaluation-EMA checkpoints against the training step, one colour per step count, one line style per run, the
first run's references (teacher-50, best training-free sampler) as horizontal lines.

    python benchmarks/plot_convergence.py docs/images/convergence_digits.png \
        shipped=benchmarks/results/convergence_digits.json \
        regression=benchmarks/results/convergence_digits_regression.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STYLES = ("-", "--", ":", "-.")


def load_curves(specs: list[str]) -> list[tuple[str, dict]]:
    """``label=path`` pairs -> (label, curve.json contents)."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            sys.exit(f"expected LABEL=PATH, got {spec!r}")
        out.append((label, json.loads(Path(path).read_text())))
    return out


def plot_curves(curves: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    first = curves[0][1]
    for ax, key in zip(axes, ("fid", "precision")):
        for style, (label, curve) in zip(STYLES, curves):
            xs = [c["step"] for c in curve["checkpoints"]]
            for i, k in enumerate(curve["steps"]):
                ax.plot(xs, [c[str(k)][key] for c in curve["checkpoints"]], linestyle=style, marker="o",
                        markersize=3, color=f"C{i}", label=f"{label}, {k}-step")
        for j, (name, ref) in enumerate(first.get("reference", {}).items()):
            if ref.get(key) is not None:
                ax.axhline(ref[key], color=f"C{len(first['steps']) + j}", linestyle=(0, (1, 3)), label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{key.upper() if key == 'fid' else key} ({first['feature_net']} features)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"evaluation-EMA checkpoints, {first['num_samples']} samples, evaluation seed {first['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    plot_curves(load_curves(sys.argv[2:]), Path(sys.argv[1]))
