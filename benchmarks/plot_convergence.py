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

from cmdistill.evaluation.curve import plot_curves


def load_curves(specs: list[str]) -> list[tuple[str, dict]]:
    """``label=path`` pairs -> (label, curve.json contents)."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            sys.exit(f"expected LABEL=PATH, got {spec!r}")
        out.append((label, json.loads(Path(path).read_text())))
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    plot_curves(load_curves(sys.argv[2:]), Path(sys.argv[1]))
