"""This machine's matmul peak in fp32 and bf16, and what a base training step reaches against it
(MFU), per preset and dtype: the figures behind train.py's MFU column and the choice of --dtype
(paper §3.4 counts compute in PF-s; this says how fast this CPU turns it out).

python bench/bench_peak.py [--steps 8] [--presets tiny small]          (part of make bench)

Peak: the best of several timings of a 2048^3 matmul (train.measure_peak, what train.py divides
by), and, to show how shape-dependent it is, the best over a few of the model's own GEMM shapes.
A step: forward, backward, gradient clipping and AdamW on a batch of 16 pairs of 128-token
sources and targets (the base's lengths), the model in train mode; FLOPs: flops.step_flops's
exact count (matmuls only; flops.py states the convention). bf16 is autocast with fp32 master
weights, as train.py runs it. Run it alone: another process on the cores lowers every number."""

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flops  # noqa: E402
import strategies  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from data.batch import collate  # noqa: E402
from model import BART, config_from_preset  # noqa: E402


def gemm_peak(dtype, shapes, reps=5):
    """The best FLOP/s over `shapes` (M, K, N), each the best of `reps` timings."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for M, K, N in shapes:
        a = torch.randn(M, K, dtype=torch_dtype)
        b = torch.randn(K, N, dtype=torch_dtype)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * M * K * N / (time.perf_counter() - t))
    return best


def step_rate(preset, dtype, steps, batch=16, length=128):
    """Mean FLOP/s of `steps` training steps (after two warm-up steps) of `preset` in `dtype`."""
    torch.manual_seed(0)
    config = config_from_preset(preset, attn_impl="math" if dtype == "bf16" else "sdpa")
    model = BART(config).train()
    strategies.apply(model, "custom")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    V = config.vocab_size
    src = [[0] + torch.randint(4, V, (length - 2,)).tolist() + [2] for _ in range(batch)]
    tgt = [[0] + torch.randint(4, V, (length - 2,)).tolist() + [2] for _ in range(batch)]
    step_flops = flops.step_flops(
        config, "custom", [len(s) for s in src], [len(t) - 1 for t in tgt]
    )
    batch_tensors = collate(src, tgt, "cpu")
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = losses.loss_fn(model, batch_tensors, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return step_flops["exact"]["total"] / (sum(times) / len(times)), model.num_parameters()


def main():
    ap = argparse.ArgumentParser(description="Matmul peak and training-step MFU on this machine.")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    a = ap.parse_args()
    dtypes = ["fp32", "bf16"] if train.native_bf16(False) else ["fp32"]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; native bf16: "
        f"{train.native_bf16(False)}"
    )
    shapes = [(2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384), (2048, 256, 1024)]
    peaks = {}
    print(
        "\n| dtype | peak: 2048^3 matmul (train.py's) | best over the model's GEMM shapes |\n|---|---|---|"
    )
    for dtype in dtypes:
        peaks[dtype] = train.measure_peak("cpu", dtype)
        print(
            f"| {dtype} | {peaks[dtype] / 1e9:.0f} GFLOP/s | {gemm_peak(dtype, shapes) / 1e9:.0f} GFLOP/s |"
        )
    print(
        "\n| preset | parameters | dtype | step GFLOP/s | MFU (vs the 2048^3 peak of its dtype) | vs fp32 step |"
        "\n|---|---|---|---|---|---|"
    )
    for preset in a.presets:
        base_rate = None
        for dtype in dtypes:
            rate, n = step_rate(preset, dtype, a.steps)
            base_rate = base_rate or rate
            print(
                f"| {preset} | {n / 1e6:.1f}M | {dtype} | {rate / 1e9:.0f} | {rate / peaks[dtype]:.1%} | "
                f"{rate / base_rate:.2f}x |"
            )


if __name__ == "__main__":
    main()
