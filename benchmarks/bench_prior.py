"""What a capped student range costs before any training: the shipped digits teacher's own ODE sampler started at
``sigma_max`` from each candidate start distribution, and with each training grid (N, solver, sub-steps).

A consistency student trained on a grid converges at best to the teacher's sampler on that grid from its start
distribution, so these FIDs are the ceilings of the students in docs/benchmarks.md ("Digits tuning").
Starts: ``zero`` = ``sigma_max z`` (CM), ``data_mean`` = ``mu + sigma_max z`` (``student.prior: data_mean``),
``full_cov`` = ``N(mu, Sigma + sigma_max^2 I)`` (not offered: a full covariance does not scale to CIFAR).
Digits FID, 1000 samples from seed 0 against the 1797 real digits (what ``cmdistill evaluate`` uses).

    python benchmarks/bench_prior.py --json benchmarks/results/prior_digits.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEACHER = C.REPO / "recipes" / "teachers" / "digits"
# (sigma_max, start, N, solver, substeps)
CASES = [(157.4, "zero", 18, "heun", 1)] + [(s, start, 18, "heun", 1) for s in (5.0, 10.0, 20.0)
                                            for start in ("zero", "data_mean", "full_cov")] + [
    (5.0, "data_mean", 8, "heun", 1), (5.0, "data_mean", 5, "heun", 1), (5.0, "data_mean", 5, "heun", 2),
    (5.0, "data_mean", 4, "heun", 2), (5.0, "data_mean", 8, "ddim", 1), (5.0, "data_mean", 12, "ddim", 1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from cmdistill.data import make_dataset
    from cmdistill.teachers import load_teacher
    from cmdistill.evaluation.features import FIDMeter
    from cmdistill.core.sampling import start_sample
    from cmdistill.data import data_mean
    from cmdistill.core.schedules import karras_grid
    from cmdistill.core.solvers import solve

    teacher = load_teacher(str(TEACHER)).eval()
    ds = make_dataset("digits", "", 8, 1)
    real = torch.stack([item[0] for item in ds])  # digits yield (image, label)
    fid = FIDMeter("digits", "cpu", 500, [TEACHER / "classifier"]).add_real(real)
    z = torch.randn(a.num, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = real.flatten(1).double()
    mu, cov = flat.mean(0), torch.cov(flat.T)
    rows, t0 = [], time.perf_counter()
    for s, start, n, solver, sub in CASES:
        s = min(s, teacher.sigma_max)
        if start in ("zero", "data_mean"):  # the package's own start (student.prior)
            x = start_sample(z, s, data_mean(ds) if start == "data_mean" else None)
        else:
            chol = torch.linalg.cholesky(cov + s * s * torch.eye(64, dtype=torch.float64)).float()
            x = (z.flatten(1) @ chol.T + mu.float()).view_as(z)
        grid = karras_grid(n, teacher.sigma_min, s).tolist()
        with torch.no_grad():
            for hi, lo in zip(grid[:-1], grid[1:]):
                x = solve(teacher, x, hi, lo, solver=solver, substeps=sub)
        row = {"sigma_max": s, "start": start, "N": n, "solver": solver, "substeps": sub,
               "teacher_nfe": (n - 1) * sub * (2 if solver == "heun" else 1), "fid": fid(x.clamp(-1, 1))}
        rows.append(row)
        print(f"sigma_max {s:7.2f}  start {start:9s}  N {n:2d}  {solver} x{sub}  NFE {row['teacher_nfe']:3d}  "
              f"FID {row['fid']:.3f}", flush=True)
    return C.write_rows(a.json, rows, a.num, t0)


if __name__ == "__main__":
    main()
