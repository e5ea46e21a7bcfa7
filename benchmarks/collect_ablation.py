"""One JSON line per finished distillation run, for the one-step ablation of docs/benchmarks.md (issue 13).

    python benchmarks/collect_ablation.py RUN_DIR NAME SEED WALL_S "OVERRIDES" >> benchmarks/results/onestep_ablation.jsonl

Reads ``RUN_DIR/report.json`` (written by ``eval.at_end``): the student's FID and precision at 1, 2 and 4 steps, the
teacher's 50-step DDIM, and the best training-free sampler at 2 and 8 network evaluations (the issue's "half the best
training-free sampler at 2k evaluations" target for k = 1 and 4).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def best_free(samplers: dict, nfe: int) -> tuple[str | None, float | None]:
    """The lowest-FID training-free sampler using at most ``nfe`` evaluations."""
    cands = [(s["fid"], n) for n, s in samplers.items() if s["kind"] != "student" and s["nfe"] <= nfe]
    return (min(cands)[1], min(cands)[0]) if cands else (None, None)


def row(run_dir: Path, name: str, seed: int, wall_s: int, overrides: str) -> dict:
    samplers = json.loads((run_dir / "report.json").read_text())["samplers"]
    out = {"name": name, "seed": seed, "wall_s": wall_s, "overrides": overrides.strip()}
    for k in (1, 2, 4):
        s = samplers[f"student-{k}"]
        out[f"fid{k}"], out[f"prec{k}"] = round(s["fid"], 3), round(s["precision"], 3)
    t = next(s for n, s in samplers.items() if n.startswith("teacher-") and s["nfe"] >= 50)
    out["teacher50_fid"], out["teacher50_prec"] = round(t["fid"], 3), round(t["precision"], 3)
    for k in (1, 2, 4):
        bname, bfid = best_free(samplers, 2 * k)
        out[f"free{2 * k}"] = None if bfid is None else [bname, round(bfid, 3)]
    return out


if __name__ == "__main__":
    print(json.dumps(row(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
