"""Memory of full and LoRA distillation on the same model (issue 26, item 4).

Two parts:

1. ``--account``: the training state of each form, its parameter counts taken from the networks cmdistill builds and
   the bytes per parameter from how it stores them (fp32 master weights, gradients, two AdamW moments and EMA of what
   trains; the teacher's weights in its dtype; a LoRA's three fp32 adapters), for Stable Diffusion 1.5's U-Net
   (its public config, built on the meta device: no weights, no download) and the shipped fashion-text teacher.
   Activations are not counted: they depend on the batch, resolution and device.
2. ``--measure RECIPE``: peak resident memory (RSS) of ``cmdistill distill RECIPE`` for a few steps, full and LoRA
   (``--set student.lora.rank=R``, fixed w), each in its own process, one after the other.

    python benchmarks/bench_lora_memory.py --account
    python benchmarks/bench_lora_memory.py --measure recipes/fashion-text.yaml --steps 100
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
GB = 1e9


def account(net, rank: int, teacher_bytes: int = 2, target: bool = False) -> dict:
    """Bytes of the training state of a full and a LoRA student of ``net`` (AdamW-style optimizer: two fp32
    moments per trainable parameter; fp32 master weights and gradients; teacher weights at ``teacher_bytes`` per
    parameter; a target copy when ``target``)."""
    from cmdistill.core.lora import LoraSpec, add_adapters, adapter_tensors

    base = sum(p.numel() for p in net.parameters())
    add_adapters(net, LoraSpec(rank, float(rank)))
    adapter = sum(p.numel() for p in adapter_tensors(net, "student"))
    full = base * (4 + 4 + 8 + 4 + (4 if target else 0)) + base * teacher_bytes  # weights, grad, moments, EMA
    lora = base * teacher_bytes + adapter * (4 * 3 + 4 + 8)  # one base; 3 adapters; grad and moments of one
    return {"base_parameters": base, "adapter_parameters": adapter, "rank": rank,
            "full_state_gb": full / GB, "lora_state_gb": lora / GB}


def run_account() -> dict:
    from diffusers import UNet2DConditionModel

    out = {}
    with torch.device("meta"):
        out["sd15_unet"] = account(UNet2DConditionModel(**SD15_UNET), 64, teacher_bytes=2)
    teacher = REPO / "recipes" / "teachers" / "fashion-text" / "unet"
    if teacher.is_dir():
        out["fashion_text_unet"] = account(UNet2DConditionModel.from_pretrained(teacher), 32, teacher_bytes=4)
    return out


INNER = """import resource, runpy, sys
sys.argv = ['cmdistill'] + sys.argv[1:]
code = 0
try:
    runpy.run_module('cmdistill', run_name='__main__')
except SystemExit as e:
    code = e.code or 0
print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def peak_rss(args: list[str]) -> tuple[float, float]:
    """Peak RSS (GB, of the process itself) and wall time (s) of one ``cmdistill`` command."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", INNER, *args], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    kb = int(proc.stdout.strip().splitlines()[-1].split()[-1])
    return kb * 1024 / GB, wall


def run_measure(recipe: str, steps: int, rank: int) -> dict:
    """The recipe for ``steps`` steps without evaluation, full and with a rank-``rank`` LoRA (fixed w)."""
    common = ["--set", f"train.max_steps={steps}", "--set", "eval.at_end=false", "--set", "train.sample_every=100000",
              "--set", f"train.checkpoint_every={steps}", "--overwrite"]
    with tempfile.TemporaryDirectory() as tmp:
        full, wall_f = peak_rss(["distill", recipe, "-o", f"{tmp}/full", *common])
        lora, wall_l = peak_rss(["distill", recipe, "-o", f"{tmp}/lora", *common, "--set",
                                 f"student.lora.rank={rank}", "--set", "guidance.w_min=null", "--set",
                                 "guidance.w_max=null"])
    return {"steps": steps, "full": {"peak_rss_gb": full, "wall_s": wall_f},
            "lora": {"rank": rank, "peak_rss_gb": lora, "wall_s": wall_l}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--account", action="store_true")
    ap.add_argument("--measure", metavar="RECIPE")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=32)
    a = ap.parse_args()
    res = {}
    if a.account:
        res["account"] = run_account()
    if a.measure:
        res["measure"] = run_measure(a.measure, a.steps, a.rank)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
