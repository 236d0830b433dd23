"""CPU benchmark of the customization strategies (paper §2.2-2.6, and §3.4 / Figure 4 for the
compute they cost): per strategy one training step (forward + backward + AdamW step) on the `tiny`
preset in fp32: step time, the autograd-exact FLOPs of flops.step_flops, achieved FLOP/s and peak
memory; then whether the ratios of step times follow the ratios of exact FLOPs, and where and why
they do not.

PYTHONPATH=. .venv/bin/python bench/bench_strategies.py [--preset tiny] [--batch 8] [--src 256]
[--tgt 128]

Peak memory: each strategy runs in its own subprocess (a fresh allocator, no caches from the
others). After the model, optimizer and batch exist, the child resets the kernel's peak-RSS mark
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and reads VmHWM after the steps: "peak step MiB"
= VmHWM - RSS before the first step, i.e. what training adds on top of the weights (activations,
gradients, Adam moments, allocator slack). Where the reset is not available it falls back to
ru_maxrss - RSS before, which can only over-report. Timing: --reps steps after a warm-up, all
strategies interleaved round by round in one process (a busy neighbour on a shared CPU then slows
every strategy alike); the best step of each is used for the ratios, the median is shown beside
it."""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import flops  # noqa: E402
import strategies  # noqa: E402
from model import BART, config_from_preset  # noqa: E402

CASES = {"custom": {}, "leo": {}, "lldb": {}, "prefix": dict(prefix_len=200), "lora": dict(r=8)}


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def setup(preset, name, batch, src, tgt):
    """A customized model, its optimizer and one training step on a fixed random batch."""
    torch.manual_seed(0)
    cfg = config_from_preset(preset)
    model = BART(cfg).train()
    strategies.apply(model, name, **CASES[name])
    opt = torch.optim.AdamW(strategies.trainable_parameters(model), lr=1e-4)
    ids, dec = (
        torch.randint(4, cfg.vocab_size, (batch, src)),
        torch.randint(4, cfg.vocab_size, (batch, tgt)),
    )

    def step():
        loss = F.cross_entropy(
            model(ids, torch.ones_like(ids), dec).flatten(0, 1), dec.roll(-1, 1).flatten()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return cfg, model, step


def child(a):
    """Peak memory of one strategy's training step, alone in this process; JSON on stdout."""
    _, _, step = setup(a.preset, a.one, a.batch, a.src, a.tgt)
    before = rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS

        def peak():
            return rss_kib("VmHWM")
    except OSError:

        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # the first allocates the gradients and Adam moments, the second is a steady-state step
    step(), step()
    print(json.dumps(dict(peak_mib=(peak() - before) / 1024, before_mib=before / 1024)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=256)
    ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=4)
    # internal: measure one strategy's memory
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return child(a)
    print(
        f"# {a.preset}, fp32, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), batch {a.batch},"
        f" source {a.src}, target {a.tgt}, prefix P = 200, AdamW; torch {torch.__version__}"
    )
    rows = {}
    for name in CASES:  # memory: one subprocess per strategy
        cmd = [sys.executable, __file__, "--one", name] + [
            f"--{k}={getattr(a, k)}" for k in ("preset", "batch", "src", "tgt")
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": "."}
        )
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    # time: all strategies in this process, interleaved round by round, so a busy neighbour on a
    # shared CPU slows every strategy alike; the best round of each is reported (the least
    # disturbed)
    runs = {name: setup(a.preset, name, a.batch, a.src, a.tgt) for name in CASES}
    for name, (cfg, model, step) in runs.items():
        step()  # warm-up
        opts = {k: v for k, v in CASES[name].items() if k != "r"}
        fl = flops.step_flops(cfg, name, [a.src] * a.batch, [a.tgt] * a.batch, **opts)
        rows[name].update(
            trainable=sum(p.numel() for p in strategies.trainable_parameters(model)),
            times=[],
            exact=fl["exact"],
            paper=fl["paper"],
        )
    for _ in range(a.reps):
        for name, (_, _, step) in runs.items():
            t0 = time.perf_counter()
            step()
            rows[name]["times"].append(time.perf_counter() - t0)
    c = rows["custom"]

    def best(r):
        return min(r["times"])

    print(
        f"{'strategy':<9}{'trainable':>11}{'best ms':>9}{'median ms':>10}{'exact GFLOP':>13}{'GFLOP/s':>9}"
        f"{'peak step MiB':>15}{'time/custom':>13}{'FLOPs/custom':>14}{'ratio':>7}{'paper FLOPs/custom':>20}"
    )
    for name, r in rows.items():
        rt, rf = best(r) / best(c), r["exact"]["total"] / c["exact"]["total"]
        print(
            f"{name:<9}{r['trainable']:>11,}{1e3 * best(r):>9.0f}{1e3 * statistics.median(r['times']):>10.0f}"
            f"{r['exact']['total'] / 1e9:>13.1f}{r['exact']['total'] / best(r) / 1e9:>9.1f}{r['peak_mib']:>15.0f}"
            f"{rt:>13.2f}{rf:>14.2f}{rt / rf:>7.2f}{r['paper']['total'] / c['paper']['total']:>20.2f}"
        )
        r["ratio"] = rt / rf
    print(
        f"(peak step MiB: VmHWM - RSS before the steps; that RSS (weights, batch, libraries) was {c['before_mib']:.0f}"
        f" MiB for custom. ratio = time ratio / exact FLOP ratio: 1.00 when step time follows the exact FLOPs. "
        f"The paper's convention, last column, skips the backward of frozen layers that autograd must still run)"
    )
    off = [n for n, r in rows.items() if abs(r["ratio"] - 1) > 0.1]
    print(f"\nstep time does not follow exact FLOPs (> 10% off) for: {', '.join(off) or 'none'}")
    for n in off:
        sign = 1 if rows[n]["ratio"] > 1 else -1
        print(
            f"  {n} ({'slower' if sign > 0 else 'faster'} than its FLOPs predict): {WHY.get((n, sign), '')}"
        )


# Why the ratios can disagree: the exact count holds matmuls only (flops.py's convention), and a
# matmul's FLOP/s depends on its shape. Slower than its FLOPs predict (ratio > 1) / faster (ratio <
# 1), by strategy:
WHY = {
    (
        "leo",
        1,
    ): "the embedding backward (an index-add into the V x d table, encoder and decoder) and AdamW over the "
    "2.4M embedding entries are real time but no matmul FLOPs",
    (
        "leo",
        -1,
    ): "below the embeddings nothing trains, so the LayerNorm/GELU/softmax backward still runs but no "
    "weight-gradient matmul, and AdamW touches 2.4M instead of 7.9M parameters",
    (
        "lldb",
        1,
    ): "the forward (almost all of lldb's FLOPs) also pays every uncounted op (softmax, GELU, LayerNorm, "
    "dropout, masks) and the V-wide loss, which custom's big backward matmuls dilute",
    (
        "lldb",
        -1,
    ): "custom also spends uncounted time lldb skips: the trunk's LayerNorm/GELU/softmax/dropout backward "
    "and AdamW over 7.9M parameters",
    (
        "prefix",
        1,
    ): "200 extra keys make attention (bmm's with head_dim 64, softmax and masks over P + L keys) a larger "
    "share of the step, and those run far below the big linears' FLOP/s",
    (
        "prefix",
        -1,
    ): "its extra FLOPs are attention bmm's over 200 more keys, while custom also pays uncounted AdamW "
    "over 7.9M parameters and the weight-gradient bookkeeping prefix skips",
    (
        "lora",
        1,
    ): "18 adapters, each 2 forward and 3 backward rank-8 matmuls, run at a small fraction of the big "
    "linears' FLOP/s, plus an elementwise scale and add per adapter that the count leaves out",
    (
        "lora",
        -1,
    ): "custom pays AdamW over 7.9M parameters that LoRA (74K) does not; no matmul FLOPs either way",
}

if __name__ == "__main__":
    main()
