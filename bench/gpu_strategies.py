"""GPU benchmark of the customization strategies at the paper's scale (§2.2-2.6; compute as in §3.4
/ Figure 4): bart-large (406M), bf16 autocast, batch 8, source 512, target 128, AdamW. Per strategy:
step time (forward + backward + optimizer step), the autograd-exact FLOPs of flops.step_flops,
achieved TFLOP/s and peak training memory (torch.cuda.max_memory_allocated: weights + gradients +
Adam moments + activations + workspace). Goals: peak memory of lldb <= 0.3x and of prefix <= 0.6x
that of custom. Runs in about a minute; budget < 4 minutes.

PYTHONPATH=. python bench/gpu_strategies.py [--attn sdpa|triton|math] [--batch 8] [--src 512] [--tgt
128]

Random weights (no checkpoint download; speed and memory do not depend on the values), built
directly on the GPU. Master weights stay fp32 (the trainer's setup); autocast runs the matmuls in
bf16. The FLOP/s column divides the dense count (causal and padded halves included, as the math
path computes them) by the step time; a kernel that skips masked tiles does less work than that.
The CPU twin is bench/bench_strategies.py."""

import argparse
import gc
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import flops  # noqa: E402
import strategies  # noqa: E402
from model import BART, config_from_preset  # noqa: E402
from data.tokenizer import SPECIAL_IDS  # noqa: E402

CASES = {"custom": {}, "leo": {}, "lldb": {}, "prefix": dict(prefix_len=200), "lora": dict(r=8)}
GOALS = {"lldb": 0.3, "prefix": 0.6}  # peak memory as a fraction of custom's


def run(name, a, cfg, ids, dec):
    torch.manual_seed(0)
    # initialise on the GPU: seconds instead of a minute of CPU init + copy
    with torch.device("cuda"):
        model = BART(cfg).train()
    opts = dict(CASES[name])
    # the paper's init: the batch's most frequent tokens through the frozen model
    if name == "prefix":
        opts["init_ids"] = strategies.most_frequent_ids(
            ids.tolist(), opts["prefix_len"], exclude=SPECIAL_IDS
        )
    strategies.apply(model, name, **opts)
    opt = torch.optim.AdamW(strategies.trainable_parameters(model), lr=1e-5, fused=True)
    mask, labels = torch.ones_like(ids), dec.roll(-1, 1)
    weights = torch.cuda.memory_allocated()
    # the peak from here on still counts the weights already allocated
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids, mask, dec)  # (B, T, V) in bf16
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the first step allocates gradients and Adam moments, and tunes kernels
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / a.steps
    fl = flops.step_flops(
        cfg,
        name,
        [a.src] * a.batch,
        [a.tgt] * a.batch,
        **{k: v for k, v in CASES[name].items() if k != "r"},
    )
    row = dict(
        trainable=sum(p.numel() for p in strategies.trainable_parameters(model)),
        seconds=seconds,
        exact=fl["exact"]["total"],
        paper=fl["paper"]["total"],
        peak=torch.cuda.max_memory_allocated(),
        weights=weights,
    )
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bart-large")
    ap.add_argument("--attn", default="sdpa", choices=["math", "sdpa", "triton"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=512)
    ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_strategies.py needs a CUDA GPU; on CPU run bench/bench_strategies.py")
    start = time.time()
    cfg = config_from_preset(a.model, attn_impl=a.attn)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (a.batch, a.src), device="cuda", generator=g)
    dec = torch.randint(4, cfg.vocab_size, (a.batch, a.tgt), device="cuda", generator=g)
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {a.model}, bf16 autocast (fp32 master "
        f"weights), attn {a.attn}, batch {a.batch}, source {a.src}, target {a.tgt}, prefix P = 200, AdamW (fused)"
    )
    rows = {name: run(name, a, cfg, ids, dec) for name in CASES}
    c = rows["custom"]
    print(
        f"{'strategy':<9}{'trainable':>13}{'step ms':>9}{'exact TFLOP':>13}{'TFLOP/s':>9}{'peak GiB':>10}"
        f"{'peak/custom':>13}{'time/custom':>13}{'FLOPs/custom':>14}"
    )
    for name, r in rows.items():
        print(
            f"{name:<9}{r['trainable']:>13,}{1e3 * r['seconds']:>9.1f}{r['exact'] / 1e12:>13.2f}"
            f"{r['exact'] / r['seconds'] / 1e12:>9.1f}{r['peak'] / 2**30:>10.2f}{r['peak'] / c['peak']:>13.2f}"
            f"{r['seconds'] / c['seconds']:>13.2f}{r['exact'] / c['exact']:>14.2f}"
        )
    print(
        f"(weights alone: {c['weights'] / 2**30:.2f} GiB fp32; PF-s per step, exact: "
        + ", ".join(f"{n} {r['exact'] / 1e15:.4f}" for n, r in rows.items())
        + ")"
    )
    for name, goal in GOALS.items():
        ratio = rows[name]["peak"] / c["peak"]
        print(
            f"goal: peak memory of {name} <= {goal}x custom: {ratio:.2f}x -> {'MET' if ratio <= goal else 'NOT MET'}"
        )
    print(f"total time {time.time() - start:.0f} s (budget 240 s)")


if __name__ == "__main__":
    main()
