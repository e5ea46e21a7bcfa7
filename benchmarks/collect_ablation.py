"""One JSON line per finished distillation run, for the one-step ablation of docs/benchmarks.md (issue 13).

    python benchmarks/collect_ablation.py RUN_DIR NAME SEED WALL_S "OVERRIDES" >> benchmarks/results/onestep_ablation.jsonl
    python benchmarks/collect_ablation.py --table benchmarks/results/onestep_ablation.jsonl   # the markdown table

Reads ``RUN_DIR/report.json`` (written by ``eval.at_end``): the student's FID and precision at 1, 2 and 4 steps, the
teacher's 50-step DDIM, and the best training-free sampler at 2 and 8 network evaluations (the issue's "half the best
training-free sampler at 2k evaluations" target for k = 1 and 4).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run_dir: Path, name: str, seed: int, wall_s: int, overrides: str) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    samplers = report["samplers"]
    out = {"name": name, "seed": seed, "wall_s": wall_s, "overrides": overrides.strip()}
    for k in (1, 2, 4):
        s = samplers[f"student-{k}"]
        out[f"fid{k}"], out[f"prec{k}"] = round(s["fid"], 3), round(s["precision"], 3)
    t = next(s for n, s in samplers.items() if n.startswith("teacher-") and s["nfe"] >= 50)
    out["teacher50_fid"], out["teacher50_prec"] = round(t["fid"], 3), round(t["precision"], 3)
    for h in report["headline"]:  # the report's own best training-free sampler at <= 2k evaluations
        k, best = int(h["student"].split("-")[1]), h["best_at_2k"]
        out[f"free{2 * k}"] = None if best is None else [best, round(samplers[best]["fid"], 3)]
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one line per run, FID (precision) at 1 / 2 / 4 steps, the teacher's DDIM-50 and the ratios."""
    lines = ["| run | seed | 1 step | 2 steps | 4 steps | teacher DDIM-50 | 1-step / teacher | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'fid{k}']:.2f} ({r[f'prec{k}']:.3f})" for k in (1, 2, 4)]
        lines.append(f"| {r['name']} | {r['seed']} | " + " | ".join(cells) + f" | {r['teacher50_fid']:.2f} "
                     f"({r['teacher50_prec']:.3f}) | {r['fid1'] / r['teacher50_fid']:.2f}x | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        print(table([json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line.strip()]))
    else:
        print(json.dumps(row(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
