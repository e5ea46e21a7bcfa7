"""Time one consistency-distillation training step and each of its parts in isolation.

The step is the training loop's own optimiser step (``cmdistill.training.loop.optimizer_step``) over the very task
``cmdistill distill`` builds (``cmdistill.training.distill.Distillation``: the same models, pair schedule over the
student's range, loss and speed options), fed random images, with a random-weight teacher of the chosen
architecture:

* ``tiny``: the tests' U-Net (1 x 8 x 8, recipes/digits.yaml: Heun, pseudo-Huber);
* ``cifar``: google/ddpm-cifar10-32's U-Net (35.7 M parameters, config in benchmarks/configs/, random weights;
  recipes/cifar.yaml: Heun, LPIPS-VGG at 224 px with a random backbone, which costs what the pretrained one does).

Parts, each timed alone on fixed inputs: the teacher solver pass (Heun: 2 teacher calls), the target pass, the
student forward + backward (backward from a fixed output gradient), the loss (distance forward + backward to the
student output), the optimiser (clip, non-finite guard, step, zero_grad, LR schedule) and the target + evaluation
EMA updates. All cases run round-robin (step, part 1, part 2, ...) so that load from other processes hits them
alike; the medians are reported (wall time, and this process's CPU time, which load from other processes inflates
less), and ``overhead = step / sum(parts)``: what the step spends outside the parts (pair and noise sampling, RNG
replay for the dropout mask, autocast and accumulate contexts, Python glue).

    python benchmarks/bench_step.py --model tiny --threads 1
    python benchmarks/bench_step.py --model cifar --threads 1                  # batch 4, 5 rounds: ~2.5 min on CPU
    python benchmarks/bench_step.py --model cifar --device cuda --batch 256 --reps 20 --check-syncs
    python benchmarks/bench_step.py --model cifar --device cuda --batch 256 --reps 20 --set train.compile=true

On CUDA the cifar recipe's own settings apply (bf16 autocast, teacher weights in bf16); on CPU the benchmark runs
fp32 unless ``--set train.mixed_precision=bf16``. Recipe keys go through ``--set`` as on the command line.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RECIPES = {"tiny": C.REPO / "recipes" / "digits.yaml", "cifar": C.REPO / "recipes" / "cifar.yaml"}
DEFAULTS = {"tiny": dict(batch=128, reps=30, warmup=5), "cifar": dict(batch=4, reps=5, warmup=2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "cifar"), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: tiny 128, cifar 4)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default: tiny 30, cifar 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: tiny 5, cifar 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", default=None, help="recipe YAML (default: digits.yaml for tiny, cifar.yaml for cifar)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set train.channels_last=true (repeatable)")
    p.add_argument("--loader-batches", type=int, default=20,
                   help="batches to draw through the real DataLoader (0: skip the data-loading check)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--check-syncs", action="store_true",
                   help="CUDA only: run one more step under torch.cuda.set_sync_debug_mode('error') and report "
                        "whether anything in it synchronised the host with the GPU")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def build(args, device, teacher_dir: Path):
    from cmdistill.commands import load_recipe

    over = [f"teacher.path={teacher_dir}", f"train.batch_size={args.batch}", "train.grad_accum=1"]
    if args.model == "cifar":
        over.append("loss.lpips_pretrained=false")  # offline; a random VGG costs the same as the pretrained one
    if device.type == "cpu":
        over.append("train.mixed_precision='no'")  # bf16 autocast on CPU is a separate experiment (--set)
        over.append("teacher.dtype=fp32")  # teacher.dtype now applies on any device; bf16 weights on CPU: --set
    path = args.recipe or RECIPES[args.model]
    args.loader_batch = load_recipe(path, list(args.overrides)).train.batch_size  # the recipe's own batch
    return load_recipe(path, over + list(args.overrides))


def main(argv=None):
    args = parse_args(argv)
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = C.load_avg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = C.save_random_teacher(args.model, Path(tmp) / "teacher")
        recipe = build(args, device, teacher_dir)
        res = run(args, recipe, device)
    res["wall_s"] = time.perf_counter() - t_start
    res["load_avg_before"], res["load_avg_after"] = load_before, C.load_avg()
    report(args, recipe, device, res)
    C.write_json(args.json, {"args": vars(args), "machine": C.machine(device), **res})
    return res


def run(args, recipe, device) -> dict:
    from accelerate import Accelerator
    from torch.utils.data import TensorDataset

    from cmdistill.core.consistency import update_target
    from cmdistill.core.solvers import solve
    from cmdistill.core.tensors import append_dims, skip_sync_checks
    from cmdistill.core.networks import image_shape

    from cmdistill.teachers import load_teacher
    from cmdistill.training.distill import Distillation
    from cmdistill.training.loop import NonFiniteGuard, optimizer_step, start_data
    from cmdistill.training.optim import grad_norm as clip_and_norm

    tc, lc = recipe.train, recipe.loss
    acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=device.type == "cpu")
    torch.manual_seed(tc.seed)
    B = tc.batch_size
    ch, res_, _ = image_shape(load_teacher(recipe.teacher.path).net)
    gen = torch.Generator().manual_seed(0)
    # random images stand in for the recipe's data: the task is otherwise built exactly as `cmdistill distill` does
    data = TensorDataset(torch.rand(4 * B, ch, res_, res_, generator=gen) * 2 - 1)
    task = Distillation(recipe, acc, dataset=data)
    start_data(task, recipe, acc, 0)
    teacher, student, target, ema = task.teacher, task.student, task.target, task.ema
    student_train, opt, lr_sched = task.model, task.optimizer, task.lr_scheduler
    distance, weighting, pairs = task.distance, task.weighting, task.pairs
    params = [p for p in student_train.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in teacher.net.parameters())
    clip, mu = recipe.optim.grad_clip, recipe.student.target_decay
    solver, substeps = recipe.solver.name, recipe.solver.substeps
    rss_models = C.rss_mib()
    guard = NonFiniteGuard(tc.on_nonfinite, acc)
    check_grads = tc.mixed_precision != "fp16"
    state = {"step": 0}
    loss_sum = torch.zeros((), device=device)

    # ---- the full step: exactly the training loop's optimiser step (cmdistill.training.loop.optimizer_step)
    def step():
        nonlocal loss_sum
        if state["step"] and state["step"] % (len(data) // B) == 0:
            start_data(task, recipe, acc, state["step"])  # the data stream is infinite; restart it cheaply on the stand-in data
        step_loss, _ = optimizer_step(acc, task, state["step"], 1, clip, guard, check_grads)
        loss_sum += step_loss
        state["step"] += 1

    # ---- fixed inputs for the parts
    x0 = data.tensors[0][:B].to(device)
    s_hi, s_lo = (t.to(device) for t in pairs.sample(B, 0))
    noise = torch.randn_like(x0)
    x_hi = x0 + append_dims(s_hi, x0.ndim) * noise
    with torch.no_grad(), acc.autocast(), skip_sync_checks():
        x_lo = solve(teacher, x_hi, s_hi, s_lo, solver=solver, substeps=substeps)
        tgt = target(x_lo, s_lo)
        pred0 = student_train(x_hi, s_hi).float()
    p_leaf = pred0.clone().requires_grad_(True)
    with acc.autocast():
        (weighting(s_hi, s_lo) * distance(p_leaf, tgt.float())).mean().backward()
    g_pred = p_leaf.grad.detach().clone()
    saved_grads = [torch.randn_like(p) * 1e-4 for p in params]

    def teacher_pass():
        with torch.no_grad(), acc.autocast(), skip_sync_checks():
            solve(teacher, x_hi, s_hi, s_lo, solver=solver, substeps=substeps)

    def target_pass():
        with torch.no_grad(), acc.autocast(), skip_sync_checks():
            target(x_lo, s_lo)

    def student_fwd_bwd():
        with acc.autocast(), skip_sync_checks():
            pred = student_train(x_hi, s_hi)
        pred.float().backward(g_pred)

    def loss_part():
        p = pred0.clone().requires_grad_(True)
        with acc.autocast():
            loss = (weighting(s_hi, s_lo) * distance(p.float(), tgt.float())).mean()
        loss.backward()

    def set_grads():
        for p, g in zip(params, saved_grads):
            p.grad = g

    def optimiser():
        gn = clip_and_norm(acc, params, clip, check_grads)
        guard.step_ok(loss_sum, gn if check_grads else None, 0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr_sched.step()

    def emas():
        update_target(target, student, mu)
        ema.update()

    def clear():
        opt.zero_grad(set_to_none=True)

    parts = {
        "teacher solver": (teacher_pass, None),
        "target pass": (target_pass, None),
        "student fwd+bwd": (student_fwd_bwd, clear),
        f"loss ({lc.distance})": (loss_part, None),
        "optimiser": (optimiser, set_grads),
        "target+EMA update": (emas, None),
    }
    cases = {"step": (step, clear), **parts}
    wall, cpu = C.interleaved(cases, device, args.reps, args.warmup)
    clear()
    loss_key = f"loss ({lc.distance})"
    out = {"model": args.model, "params_M": n_params / 1e6, "batch": B, "reps": args.reps, "warmup": args.warmup,
           "all_wall_s": wall, "all_cpu_s": cpu, "rss_after_build_MiB": rss_models,
           "peak_memory": C.peak_memory(device),
           "options": {k: getattr(tc, k, None) for k in ("mixed_precision", "channels_last", "compile",
                                                           "gradient_checkpointing")}}
    for kind, times in (("wall", wall), ("cpu", cpu)):
        med = {k: C.median(v) for k, v in times.items()}
        parts_sum = sum(med[k] for k in parts)
        out[kind] = {"median_s": med, "parts_sum_s": parts_sum, "overhead_ratio": med["step"] / parts_sum,
                     "images_per_s": B / med["step"], "loss_share": med[loss_key] / parts_sum}
    if args.check_syncs and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            out["host_syncs_in_step"] = "none"
        except RuntimeError as e:  # the first synchronising call raises, naming the operation
            out["host_syncs_in_step"] = f"found: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if args.loader_batches:
        out.update(loader_throughput(recipe, res_, ch, args.loader_batches,
                                     device, args.loader_batch))
    return out


def loader_throughput(recipe, resolution: int, channels: int, n_batches: int, device, batch: int) -> dict:
    """Images/s of the training DataLoader alone (same dataset class, sampler, workers and pinning as training) at
    the recipe's own global batch ``batch`` (not the benchmark's small one).

    ``cifar10`` cannot be downloaded offline: an in-memory uint8 stand-in of CIFAR-10's size goes through the same
    ``__getitem__`` as the real one."""
    from cmdistill.data import make_dataset, step_loader

    dc, tc = recipe.data, recipe.train
    if dc.name == "cifar10":
        from cmdistill import data as D

        ds = D._Cifar(torch.randint(0, 256, (50000, resolution, resolution, channels), dtype=torch.uint8).numpy())
    else:
        ds = make_dataset(dc.name, dc.root, dc.resolution or resolution, channels)
    it = step_loader(ds, batch, tc.seed, 0, num_workers=dc.num_workers, pin_memory=device.type == "cuda")
    next(it)  # start-up (worker processes) untimed
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return {"loader_images_per_s": n_batches * batch / dt, "loader_workers": dc.num_workers, "loader_batch": batch,
            "loader_dataset": dc.name if dc.name != "cifar10" else "cifar10-sized in-memory stand-in"}


def report(args, recipe, device, res) -> None:
    C.header(f"bench_step: one CD step, {args.model} U-Net ({res['params_M']:.2f} M params), "
             f"global batch {res['batch']}, {res['reps']} timed rounds after {res['warmup']} warm-up", device)
    print(f"# recipe: solver {recipe.solver.name} x{recipe.solver.substeps}, distance {recipe.loss.distance}, "
          f"optimiser {recipe.optim.name}, options {res['options']}")
    kinds = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    head = "".join(f"{k + ' ms':>12}{'share':>8}" for k in kinds)
    print(f"{'median of rounds':<24}{head}")
    for case in res["wall"]["median_s"]:
        row = ""
        for k in kinds:
            v, total = res[k]["median_s"][case], res[k]["parts_sum_s"]
            row += f"{v * 1e3:>12.2f}" + (f"{v / total:>8.1%}" if case != "step" else " " * 8)
        print(f"{case:<24}{row}")
    print(f"{'sum of parts':<24}" + "".join(f"{res[k]['parts_sum_s'] * 1e3:>12.2f}{'':>8}" for k in kinds))
    for k in kinds:
        r = res[k]
        print(f"{k:>4}: overhead ratio (step / sum of parts) {r['overhead_ratio']:.3f}; "
              f"images/s {r['images_per_s']:.1f}; loss share of the parts {r['loss_share']:.1%}")
    print(f"memory: {res['peak_memory']}; RSS after building the models {res['rss_after_build_MiB']:.0f} MiB")
    if "host_syncs_in_step" in res:
        print(f"host syncs inside one step (torch.cuda.set_sync_debug_mode): {res['host_syncs_in_step']}")
    if "loader_images_per_s" in res:
        print(f"data loader alone: {res['loader_images_per_s']:.0f} images/s ({res['loader_dataset']}, "
              f"batch {res['loader_batch']}, {res['loader_workers']} workers) = "
              f"{res['loader_images_per_s'] / res['wall']['images_per_s']:.0f}x the step's wall-clock images/s")
    print(f"load average before {res['load_avg_before']}, after {res['load_avg_after']}; "
          f"benchmark wall time {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
