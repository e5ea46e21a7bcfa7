"""Where guidance acts: the shipped class-conditional digits teacher's guided ODE sampler started from the student's
start (``mu + 5 z``, Heun on the 8-point training grid: the best a digits-cond student can learn) against the same
teacher guided over its whole range (DDIM-50 from sigma 157, the evaluation's reference), at w = 1, 2, 3, 5.
Digits FID (1000 samples from seed 0, classes in turn, against the 1797 real digits) and class accuracy.

    python benchmarks/bench_guided_ceiling.py --json benchmarks/results/guided_ceiling_digits.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEACHER = C.REPO / "recipes" / "teachers" / "digits-cond"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--scales", default="1,2,3,5")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from cmdistill.core.guidance import guided_teacher
    from cmdistill.core.sampling import integrate, sample_ode, start_sample, teacher_sigmas
    from cmdistill.core.schedules import karras_grid
    from cmdistill.data import data_mean, make_dataset
    from cmdistill.evaluation.features import FIDMeter, accuracy, find_digits_classifier, load_classifier
    from cmdistill.teachers import load_teacher

    teacher = load_teacher(str(TEACHER)).eval()
    ds = make_dataset("digits", "", 8, 1)
    real = torch.stack([item[0] for item in ds])
    fid = FIDMeter("digits", "cpu", 500, []).add_real(real)
    clf = load_classifier(find_digits_classifier())[0]
    z = torch.randn(a.num, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(a.num) % 10
    mu = data_mean(ds)
    rows, t0 = [], time.perf_counter()
    for w in [float(s) for s in a.scales.split(",")]:
        g = guided_teacher(teacher, w)
        with torch.no_grad():
            capped = integrate(g, start_sample(z, 5.0, mu), karras_grid(8, teacher.sigma_min, 5.0), "heun",
                               class_labels=labels)
            full = sample_ode(g, z, teacher_sigmas(teacher, 50), "ddim",
                              class_labels=labels)
        for name, x in (("heun-8 from mu + 5z", capped), ("ddim-50 from sigma 157", full)):
            x = x.clamp(-1, 1)
            rows.append({"w": w, "sampler": name, "fid": fid(x), "class_accuracy": accuracy(clf, x, labels)})
            print(f"w {w:g}  {name:24s} FID {rows[-1]['fid']:.3f}  acc {rows[-1]['class_accuracy']:.3f}", flush=True)
    return C.write_rows(a.json, rows, a.num, t0)


if __name__ == "__main__":
    main()
