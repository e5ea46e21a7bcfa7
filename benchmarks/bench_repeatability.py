"""Is a distillation run bitwise repeatable, and what breaks it? (issue 24, item 5)

Runs ``cmdistill distill recipes/digits.yaml`` for ``--steps`` steps (no evaluation) in fresh processes under
several settings and compares the exported students' weights with the first run's:

* ``default`` twice: the same machine, threads and kernels (expected: bitwise equal);
* ``threads1``: one torch thread instead of the machine's default (``train.cpu_threads=1``);
* ``avx2``: torch's, oneDNN's and MKL's kernels capped at AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``), standing in for an older processor.

    python benchmarks/bench_repeatability.py --steps 200 --out benchmarks/results/repeatability_digits.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SETTINGS = {"default": ({}, []), "default-again": ({}, []), "threads1": ({}, ["train.cpu_threads=1"]),
            "avx2": (AVX2, [])}


def run(name: str, steps: int, root: Path) -> dict:
    env_extra, sets = SETTINGS[name]
    out = root / name
    cmd = [sys.executable, "-m", "cmdistill", "distill", str(REPO / "recipes" / "digits.yaml"), "-o", str(out),
           "--set", f"train.max_steps={steps}", "--set", "eval.at_end=false", "--set", "eval.curve=false",
           "--set", f"train.checkpoint_every={steps}", "--set", f"train.sample_every={steps}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env_extra})
    if res.returncode:
        raise SystemExit(f"{name} failed: {res.stderr[-2000:]}")
    machine = next((ln for ln in res.stdout.splitlines() if "machine:" in ln), "")
    return {"folder": out, "wall_s": time.perf_counter() - t0, "machine": machine.split("machine: ", 1)[-1]}


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    f = "student/unet/diffusion_pytorch_model.safetensors"
    x, y = load_file(str(a / f)), load_file(str(b / f))
    diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
    rel = max(float((x[k].double() - y[k].double()).norm() / x[k].double().norm().clamp_min(1e-30)) for k in x)
    return {"bitwise_equal": all(x[k].equal(y[k]) for k in x), "max_abs_diff": diff, "max_rel_l2_diff": rel}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(name, args.steps, Path(tmp)) for name in SETTINGS}
        ref = runs["default"]["folder"]
        result = {"steps": args.steps, "recipe": "recipes/digits.yaml", "machine": runs["default"]["machine"],
                  "runs": {n: {"wall_s": round(r["wall_s"], 1), "machine": r["machine"],
                               **compare(ref, r["folder"])} for n, r in runs.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
