"""Worker for tests/test_multiprocess.py: run it under a multi-process launcher, e.g.

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \
        tests/multiprocess_check.py OUT.json [-- distill RECIPE --set ...]

Consistency-distillation steps (Heun teacher step, l2 distance, RAdam, gradient clipping, target update) on one
fixed global batch, split across the processes and trained through DDP exactly as ``cmdistill.train`` does
(``accelerator.prepare`` on the student only, ``accelerator.backward``, ``accelerator.clip_grad_norm_``), and the
same steps in one process on the whole batch. The global batch (data, pairs and noise) comes from one generator
seeded alike on every rank, so the only difference between the two is the batch split: DDP's averaged gradient
of the per-rank means must equal the gradient of the global mean, and the weights must stay identical across
ranks. Writes the comparison as JSON (main process).

Arguments after ``--`` are then handed to the ``cmdistill`` command line in the same processes (what
``accelerate launch -m cmdistill ...`` runs), so one launch serves both checks of the test: starting processes
that import torch, diffusers and accelerate is most of the cost on a small CPU machine.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(out: str, steps: int = 3, batch: int = 16) -> None:
    from accelerate import Accelerator
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from cmdistill.core.consistency import make_student, make_target
    from cmdistill.core.denoisers import build_denoiser
    from cmdistill.core.cd_step import cd_loss
    from cmdistill.core.consistency import update_target
    from cmdistill.core.losses import get_weighting, make_distance
    from cmdistill.core.schedules import karras_grid
    from cmdistill.training.loop import cpu_processes

    acc = Accelerator(cpu=cpu_processes())  # as cmdistill.train does: CPU (gloo) processes without a GPU
    rank, world = acc.process_index, acc.num_processes
    net = tiny_unet(seed=0).eval().requires_grad_(False)
    teacher = build_denoiser(net, dict(DDPMScheduler(num_train_timesteps=1000).config))
    distance, weighting = make_distance("l2"), get_weighting("uniform")

    def fresh():
        student = make_student(teacher)
        return student, make_target(student), torch.optim.RAdam(student.parameters(), lr=1e-3)

    ref, ref_target, ref_opt = fresh()           # one process, whole batch
    student, target, opt = fresh()               # this rank's DDP replica
    ddp, opt = acc.prepare(student, opt)
    assert not isinstance(teacher, torch.nn.parallel.DistributedDataParallel)
    assert not isinstance(target, torch.nn.parallel.DistributedDataParallel)

    gen = torch.Generator().manual_seed(1234)    # identical on every rank: one global batch per step
    grid = karras_grid(18, teacher.sigma_min, teacher.sigma_max)
    per = batch // world
    mine = slice(rank * per, (rank + 1) * per)
    losses, ref_losses = [], []
    for _ in range(steps):
        x0 = torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1
        n = torch.randint(0, len(grid) - 1, (batch,), generator=gen)
        s_hi, s_lo = grid[n], grid[n + 1]
        noise = torch.randn(batch, 1, 8, 8, generator=gen)

        res = cd_loss(ddp, target, teacher, x0[mine], s_hi[mine], s_lo[mine], distance, weighting, "heun",
                      noise=noise[mine])
        acc.backward(res.loss)
        acc.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_target(target, student, 0.0)
        losses.append(acc.reduce(res.loss.detach(), "mean").item())

        r = cd_loss(ref, ref_target, teacher, x0, s_hi, s_lo, distance, weighting, "heun", noise=noise)
        r.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        update_target(ref_target, ref, 0.0)
        ref_losses.append(r.loss.item())

    weights = torch.cat([p.detach().flatten() for p in student.parameters()])
    ref_weights = torch.cat([p.detach().flatten() for p in ref.parameters()])
    init = torch.cat([p.detach().flatten() for p in teacher.parameters()])
    every_rank = acc.gather(weights[None])
    result = {
        "world": world,
        "distributed_type": str(acc.distributed_type),
        "losses": losses,
        "ref_losses": ref_losses,
        "max_weight_diff_vs_one_process": (weights - ref_weights).abs().max().item(),
        "max_weight_change": (ref_weights - init).abs().max().item(),
        "max_weight_diff_across_ranks": (every_rank - every_rank[0]).abs().max().item(),
    }
    if acc.is_main_process:
        Path(out).write_text(json.dumps(result, indent=2))
    acc.wait_for_everyone()


if __name__ == "__main__":
    args = sys.argv[1:]
    cli_args = args[args.index("--") + 1:] if "--" in args else []
    main(args[0])
    if cli_args:
        from cmdistill.cli import main as cli

        cli.main(args=cli_args, prog_name="cmdistill", standalone_mode=False)
