"""Sampling speed: ``ConsistencyPipeline`` 1-step against a bare forward of the same U-Net on the same batch, and the
student's 1-step sample against the teacher's 50-step DDIM sample (both from the same random-weight U-Net, so the
comparison is pure wall time: quality is not measured here).

* bare forward: ``unet(x, t).sample`` under ``torch.no_grad`` on a fixed ``[B, C, H, W]`` input;
* pipeline 1-step: ``pipe(batch_size=B, num_inference_steps=1, generator=g, output_type=...)``: draws the noise,
  applies the adapter's preconditioning and the boundary condition (fp32), runs the U-Net once, maps to [0, 1];
* teacher 50-step DDIM: ``cmdistill.core.sampling.sample_ode`` over diffusers' DDIM timesteps (what ``cmdistill sample
  --teacher`` runs), 50 U-Net calls.

Cases run round-robin, each 1-step case right after one untimed call of itself: first rounds of (bare, pipeline),
then rounds of (pipeline, teacher); medians over the rounds are reported, as wall time and as this process's CPU
time (which load from other processes inflates less).

    python benchmarks/bench_sample.py --model tiny --threads 1
    python benchmarks/bench_sample.py --model cifar --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULTS = {"tiny": dict(batch=64, reps=50, warmup=3, teacher_reps=10),
            "cifar": dict(batch=4, reps=10, warmup=1, teacher_reps=3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "cifar"), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="images per call (default: tiny 64, cifar 4)")
    p.add_argument("--reps", type=int, default=None, help="timed (bare, pipeline) rounds (default: tiny 50, cifar 10)")
    p.add_argument("--teacher-reps", type=int, default=None,
                   help="timed (pipeline, 50-step teacher) rounds (default: tiny 10, cifar 3)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--output-type", default="pt", choices=("pt", "latent", "np", "pil"),
                   help="pipeline output (pt: NCHW tensor in [0, 1])")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before, t_start = C.load_avg(), time.perf_counter()
    res = run(args, device)
    res.update(wall_s=time.perf_counter() - t_start, load_avg_before=load_before, load_avg_after=C.load_avg())
    report(args, device, res)
    C.write_json(args.json, {"args": vars(args), "machine": C.machine(device), **res})
    return res


def run(args, device) -> dict:
    from diffusers import DDPMScheduler

    from cmdistill.core.consistency import make_student
    from cmdistill.core.denoisers import build_denoiser
    from cmdistill.export.pipeline import ConsistencyPipeline
    from cmdistill.core.sampling import sample_ode, teacher_sigmas

    unet = C.make_unet(args.model).eval().requires_grad_(False)
    teacher = build_denoiser(unet, dict(DDPMScheduler(num_train_timesteps=1000).config)).to(device)
    student = make_student(teacher).eval().requires_grad_(False)
    pipe = ConsistencyPipeline.from_student(student).to(device)
    pipe.set_progress_bar_config(disable=True)
    net = pipe.unet
    cfg = net.config
    B, shape = args.batch, (args.batch, int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
    x = torch.randn(shape, device=device)
    t = torch.full((B,), 999.0, device=device)
    gen = torch.Generator(device).manual_seed(0)
    sigmas = teacher_sigmas(teacher, args.teacher_steps)

    def bare():
        with torch.no_grad():
            net(x, t).sample

    def pipeline():
        pipe(batch_size=B, num_inference_steps=1, generator=gen, output_type=args.output_type)

    def teacher_ddim():
        sample_ode(teacher, torch.randn(shape, generator=gen, device=device), sigmas, "ddim")

    # every 1-step case is timed right after one untimed call of itself (steady state, as in a serving loop;
    # after a 50-call teacher run the first small call is measurably slower on CPU); the teacher's 50 calls warm
    # themselves up. Two sets of rounds: (bare, pipeline) many times, then (pipeline, teacher) fewer times.
    tkey = f"teacher {args.teacher_steps}-step DDIM"
    one = {"bare U-Net forward": (bare, bare), "pipeline 1-step": (pipeline, pipeline)}
    wall, cpu = C.interleaved(one, device, args.reps, args.warmup)
    wall_t, cpu_t = C.interleaved({"pipeline 1-step": (pipeline, pipeline), tkey: (teacher_ddim, None)}, device,
                                  args.teacher_reps, 1)
    med = {k: C.median(v) for k, v in wall.items()}
    med_cpu = {k: C.median(v) for k, v in cpu.items()}
    med_t = {k: C.median(v) for k, v in wall_t.items()}
    med_t_cpu = {k: C.median(v) for k, v in cpu_t.items()}
    return {"model": args.model, "params_M": sum(p.numel() for p in net.parameters()) / 1e6, "batch": B,
            "median_wall_s": med, "median_cpu_s": med_cpu, "all_wall_s": wall, "all_cpu_s": cpu,
            "teacher_rounds_median_wall_s": med_t, "teacher_rounds_median_cpu_s": med_t_cpu,
            "teacher_rounds_all_wall_s": wall_t,
            "pipeline_over_bare_wall": med["pipeline 1-step"] / med["bare U-Net forward"],
            "pipeline_over_bare_cpu": med_cpu["pipeline 1-step"] / med_cpu["bare U-Net forward"],
            "teacher_over_student_wall": med_t[tkey] / med_t["pipeline 1-step"],
            "teacher_over_student_cpu": med_t_cpu[tkey] / med_t_cpu["pipeline 1-step"],
            "peak_memory": C.peak_memory(device)}


def report(args, device, r) -> None:
    C.header(f"bench_sample: {args.model} U-Net ({r['params_M']:.2f} M params), batch {r['batch']}; "
             f"{args.reps} rounds (bare, pipeline) after {args.warmup} warm-up, then {args.teacher_reps} rounds "
             f"(pipeline, teacher)", device)
    for k, v in r["median_wall_s"].items():
        print(f"{k:<28}{v * 1e3:>11.2f} ms wall {r['median_cpu_s'][k] * 1e3:>11.2f} ms cpu")
    print(f"pipeline 1-step / bare forward: {r['pipeline_over_bare_wall']:.3f} (wall), "
          f"{r['pipeline_over_bare_cpu']:.3f} (cpu)   [output_type={args.output_type}]")
    for k, v in r["teacher_rounds_median_wall_s"].items():
        print(f"{k:<28}{v * 1e3:>11.2f} ms wall {r['teacher_rounds_median_cpu_s'][k] * 1e3:>11.2f} ms cpu")
    print(f"student 1-step is {r['teacher_over_student_wall']:.1f}x faster than the teacher's "
          f"{args.teacher_steps}-step DDIM (wall), {r['teacher_over_student_cpu']:.1f}x (cpu)")
    print(f"memory: {r['peak_memory']}; load average before {r['load_avg_before']}, after {r['load_avg_after']}; "
          f"benchmark wall time {r['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
