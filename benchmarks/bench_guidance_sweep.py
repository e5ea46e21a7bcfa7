"""The guidance sweep of docs/guidance.md: a class-conditional run evaluated at several classifier-free guidance
scales w: FID, precision, recall and class accuracy of the teacher's CFG DDIM-50 and of the student at 1, 2 and 4
steps at the same w (one student with a w embedding covers every w of its range). Each w is one
``cmdistill evaluate RUN --guidance-scale W`` (report-wW.json in the run folder), without the training-free
baselines; the table goes to ``--json``.

    python benchmarks/bench_guidance_sweep.py runs/digits-cond --scales 1,2,3,5 \
        --json benchmarks/results/guidance_sweep_digits.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS = ("teacher-ddim-50", "student-1", "student-2", "student-4")
KEYS = ("fid", "precision", "recall", "class_accuracy")


def sweep(run_dir: Path, scales: list[float], num: int, seeds: int) -> dict:
    from cmdistill.evaluation.evaluate import evaluate

    out = {"run_dir": str(run_dir), "num_samples": num, "seeds": seeds, "scales": {}}
    for w in scales:
        t0 = time.perf_counter()
        rep = evaluate(run_dir, num_samples=num, guidance_scale=w, baseline_nfe=[], use_lpips=False, seeds=seeds,
                       progress=False, echo=lambda s: None)
        out["scales"][f"{w:g}"] = {n: {k: rep["samplers"][n].get(k) for k in KEYS} for n in ROWS}
        print(f"w = {w:g} ({time.perf_counter() - t0:.0f} s): " + "; ".join(
            f"{n} FID {rep['samplers'][n]['fid']:.2f} acc {rep['samplers'][n]['class_accuracy']:.3f}" for n in ROWS),
            flush=True)
    return out


def table(res: dict) -> str:
    lines = ["| w | " + " | ".join(f"{n} FID / class acc." for n in ROWS) + " |", "|---|" + "---|" * len(ROWS)]
    for w, rows in res["scales"].items():
        lines.append(f"| {w} | " + " | ".join(f"{rows[n]['fid']:.2f} / {rows[n]['class_accuracy']:.3f}"
                                              for n in ROWS) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--scales", default="1,2,3,5")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    res = sweep(a.run_dir, [float(w) for w in a.scales.split(",")], a.num, a.seeds)
    print(table(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
