"""The GPU check of kernels/attention.py and of the model on it, in one command of at most 8 minutes
(`make gpu-check`):

  0. precompile: every binary the sections below launch, compiled in parallel processes (tools/compile_report.py)
     into Triton's cache, so the launches find them compiled; their registers, spills and shared memory;
  1. correctness at real shapes, every dtype, compiling the production tiles: the kernel vs model.attention_math
     in float64, by the rules of tests/test_kernels.py (fp32 "ieee" <= 1e-5 / 2e-5; fp32 "tf32" <= 5e-3 / 1e-2;
     fp16/bf16 <= 2x / 3x PyTorch's own error in that dtype), plus determinism and a fully padded row;
  2. a small sweep of tile sizes, warps and stages (bf16, encoder shape), printing the winners as the line to
     paste into pick_config; the benchmark below runs with them;
  3. a benchmark (triton.testing.do_bench: median, warm-up, L2 flushed; the goal shapes 3 times, median of
     medians) against SDPA on the gathered + concatenated prefix with a boolean mask, every backend forced and
     on auto (logging the backend auto chose), in a markdown table;
  4. memory: the extra peak memory of fwd+bwd at L and 2L (linear, no B·Lq·Lk buffer);
  5. the kernel's goals, PASS / MISS each (encoder fwd+bwd <= 0.45x the best SDPA backend and forward >= 300
     TFLOP/s; cross and decoder fwd+bwd <= 0.35x; a per-row prefix <= 3% / 5% dearer than a shared one);
  6. bench/gpu_strategies.py (bart-large, bf16 autocast, B = 8, source 512, target 128), run as it is, with
     --attn triton, then --attn sdpa if the budget allows: step time, TFLOP/s and peak memory per strategy;
  7. a bart-base base trained for the minutes left (train.py --mode=base --attn_impl=triton: denoising, then
     pairs) on the compact corpus of `--prepare`, printing its source_gain curve from the run's log.jsonl.
A section that fails prints its traceback and the script goes on. Every figure goes into ONE JSON file, whose path
is printed at the end: $OUT/gpu_check.json if $OUT is set, else bench_out/gpu_check.json. Protocol and anchors:
docs/attention-kernel.md (benchmark protocol).

    python -m tools.gpu_check --prepare      # here, where data/cache/corpus is: writes data/cache/gpu/ (~30 MiB)
    python -m tools.gpu_check                # the GPU run (carry data/cache/gpu for section 7)
    python -m tools.gpu_check --dry-run      # CPU: tiny shapes in the Triton interpreter, to exercise this file
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, for `model`, `kernels`, `data`
# --prepare writes it here; the GPU run reads it (section 7)
PREPARED = os.path.join(ROOT, "data", "cache", "gpu")

ARGS = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
)
ARGS.add_argument(
    "--dry-run", action="store_true", help="CPU interpreter, tiny shapes (checks this script only)"
)
ARGS.add_argument(
    "--no-sweep", action="store_true", help="skip the tile sweep (use pick_config's tiles)"
)
ARGS.add_argument(
    "--budget-s",
    type=float,
    default=450.0,
    help="the whole run's time budget: benchmark rows stop at "
    "half of it, section 6 keeps what section 7 needs, section 7 trains for what is left",
)
ARGS.add_argument(
    "--reps", type=int, default=3, help="do_bench repetitions for the goal shapes (median)"
)
ARGS.add_argument(
    "--prepare",
    action="store_true",
    help="write data/cache/gpu/ (tokenizer + slim corpus) and exit",
)
ARGS.add_argument(
    "--projects",
    default="",
    help="--prepare: comma-separated projects (default: every base project with a mined corpus)",
)
ARGS.add_argument(
    "--denoise-steps", type=int, default=400, help="section 7: train.py --denoise_steps"
)
ARGS.add_argument(
    "--eval-interval", type=int, default=200, help="section 7: train.py --eval_interval"
)
# section 0's worker process
ARGS.add_argument("--precompile", type=int, metavar="ARCH", help=argparse.SUPPRESS)
ARGS.add_argument("--jobs", type=int, default=os.cpu_count(), help=argparse.SUPPRESS)
ARGS.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
ARGS.add_argument("--json", help=argparse.SUPPRESS)
T0 = time.time()
FAILED = []  # names of sections that raised
FIGURES = {}  # every figure of the run, by section: written as one JSON file at the end

# what sections 1 and 2 run, at module level so that section 0 can compile it ahead
CORRECTNESS = {  # name: (B, H, Lq, Lk, D, P, per_row, causal, self_attn)
    "encoder": (2, 4, 1000, 1000, 64, 200, True, False, True),
    "decoder-causal": (3, 4, 130, 130, 64, 200, True, True, True),
    "cross": (3, 4, 127, 1000, 64, 200, False, False, False),
    "decode-step-lq1": (3, 4, 1, 300, 64, 17, True, True, False),
    "d16": (2, 2, 300, 300, 16, 33, False, True, True),
    "d32": (2, 2, 300, 300, 32, 33, True, False, True),
    "d128": (2, 2, 300, 300, 128, 33, True, True, True),
}
CORRECTNESS_DRY = {
    "encoder": (2, 2, 33, 33, 16, 7, True, False, True),
    "decoder": (2, 2, 17, 17, 32, 7, True, True, True),
}
F32, TF32, F16, BF16 = (
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
    (torch.float16, None),
    (torch.bfloat16, None),
)
# every dtype once at a real shape, bf16 (the production dtype) everywhere else; each line compiles
# 5 kernels
CORRECTNESS_DTYPES = {
    "encoder": [F32, TF32, F16, BF16],
    "decoder": [F32, TF32, F16, BF16],
    "cross": [F32, F16, BF16],
    "decoder-causal": [F32, BF16],
}
SWEEP = dict(  # (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, bf16, D = 64
    fwd=[
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 3),
        (64, 32, 4, 4),
        (128, 64, 8, 4),
        (64, 128, 4, 3),
    ],
    dkdv=[
        (32, 128, 4, 3),
        (64, 64, 4, 3),
        (32, 64, 4, 3),
        (64, 128, 8, 3),
        (32, 128, 8, 2),
        (16, 64, 4, 4),
    ],
    dq=[(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
)
SWEEP_DRY = dict(fwd=[(16, 16, 1, 1), (32, 16, 1, 1)], dkdv=[(16, 16, 1, 1)], dq=[(16, 32, 1, 1)])


def section(name):
    """Run a section; on an exception print it, remember it, and carry on."""

    def wrap(fn):
        def run(*a, **kw):
            print(f"\n## {name}  (t = {time.time() - T0:.0f} s)", flush=True)
            try:
                return fn(*a, **kw)
            except Exception:
                traceback.print_exc(file=sys.stdout)
                FAILED.append(name)

        return run

    return wrap


def useful_flops(len_q, len_k, Lq, Lk, P, H, D, causal):
    """Forward FLOPs on unmasked (useful) pairs: 2 matmuls (QKᵀ, PV) x 2 FLOPs per multiply-add x
    D, summed over the real query rows i < len_q(b) of each row b and head, each seeing n_vis(b,
    i) keys: n_vis = P + len_k(b), or with causal P + clamp(min(Lk - Lq + i + 1, len_k(b)), 0).
    fwd+bwd = 3.5x this (backward 2.5x: 5 matmuls; the FA2 / Triton-tutorial convention)."""
    total = 0
    for lq, lk in zip(len_q.tolist(), len_k.tolist()):
        i = torch.arange(lq)
        seen = torch.full_like(i, lk)
        if causal:
            seen = torch.clamp(torch.minimum(Lk - Lq + i + 1, seen), min=0)
        total += int((P + seen).sum())
    return 4 * D * H * total


def make_inputs(dev, dtype, B, H, Lq, Lk, D, P, per_row, causal, self_attn, seed=0):
    """bf16 etc. inputs N(0,1); ragged right padding len ~ U[L/2, L] (fixed seed); per_row: a
    bank of 8 prefixes and prefix_index = b % 8, else one shared (H, P, D) prefix. Self-attention
    pads the queries like the keys."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dev, dtype).requires_grad_()

    len_k = torch.randint(Lk // 2, Lk + 1, (B,), generator=g)
    len_q = len_k if self_attn else torch.full((B,), Lq)
    x = dict(
        q=rnd(B, H, Lq, D),
        k=rnd(B, H, Lk, D),
        v=rnd(B, H, Lk, D),
        causal=causal,
        key_padding_mask=(torch.arange(Lk)[None, :] < len_k[:, None]).to(dev),
    )
    if P:
        shape = (8, H, P, D) if per_row else (H, P, D)
        x.update(prefix_k=rnd(*shape), prefix_v=rnd(*shape))
        if per_row:
            x["prefix_index"] = (torch.arange(B) % 8).to(dev)
    flops = useful_flops(len_q, len_k, Lq, Lk, P, H, D, causal)
    return x, torch.randn(B, H, Lq, D, generator=g).to(dev, dtype), flops


def sdpa_baseline(**x):
    """What one does without the kernel, timed as a whole: gather each row's prefix, concatenate
    it with K/V, build a boolean mask (prefix columns always visible; lower-right causal for the
    decoder), call SDPA."""
    return F.scaled_dot_product_attention(*sdpa_inputs(**x))


def sdpa_inputs(
    q, k, v, key_padding_mask=None, causal=False, prefix_k=None, prefix_v=None, prefix_index=None
):
    """q, [prefix; k], [prefix; v] and the boolean mask. Non-causal masks stay (B, 1, 1, P + Lk):
    broadcast over the queries, which every masked backend accepts and which is cheaper than
    materialising (B, 1, Lq, P + Lk)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    vis = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        # (B, 1, Lq, Lk)
        vis = vis & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
    if prefix_k is not None:
        pk, pv = (
            (prefix_k[prefix_index], prefix_v[prefix_index])
            if prefix_index is not None
            else (prefix_k.expand(B, *prefix_k.shape), prefix_v.expand(B, *prefix_v.shape))
        )
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, P + Lk, D)
        ones = torch.ones(B, 1, vis.shape[2], pk.shape[2], dtype=torch.bool, device=q.device)
        vis = torch.cat([ones, vis], dim=-1)
    return q, k, v, vis


def run_grads(fn, x, do):
    tensors = {
        n: t.detach().clone().requires_grad_()
        if torch.is_tensor(t) and t.is_floating_point()
        else t
        for n, t in x.items()
    }
    out = fn(**tensors)
    leaves = [t for t in tensors.values() if torch.is_tensor(t) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, do.to(out.dtype))


def max_errs(a, b):
    return [
        (x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b)
    ]


def precompile_plan(C):
    """The (input kind, tiles) pairs sections 1-3, 6 and 7 launch, for tools/compile_report.py:
    the correctness shapes in their dtypes; bf16 with D = 64 in every variant (the benchmark, and
    bench/gpu_strategies.py and train.py under bf16 autocast: the prefix is cast to q's dtype);
    the sweep's tiles at the sweep's and the benchmark's inputs (bf16, D = 64, a padding mask,
    causal or not, no / shared prefix or a bank)."""
    plan = []
    for name, (_B, _H, _Lq, _Lk, D, P, per_row, causal, _self_attn) in CORRECTNESS.items():
        for dtype, prec in CORRECTNESS_DTYPES.get(name, [BF16]):
            # make_inputs always gives a mask
            prefix = "bank" if P and per_row else "shared" if P else "none"
            # 16-bit: "tf32", as attention()
            plan.append((((dtype, prec or "tf32"), D, causal, True, prefix), None))
    plan += [(kind, None) for kind in C.KINDS if kind[0][0] == torch.bfloat16 and kind[1] == 64]
    base = C.A.pick_config(64, torch.bfloat16)
    for phase, configs in SWEEP.items():
        plan += [
            (((torch.bfloat16, "tf32"), 64, causal, True, prefix), dict(base, **{phase: cfg}))
            for cfg in configs
            for causal in (False, True)
            for prefix in ("none", "bank")
        ]
    return plan


def precompile_worker(arch, jobs, limit, path):
    """--precompile ARCH (a process of its own, without TRITON_INTERPRET): compile
    precompile_plan's binaries on `jobs` processes. They land in Triton's cache, keyed as
    JITFunction.run keys them, so this run's launches load them instead of compiling one after
    another. limit: only the `limit` cheapest (the dry run's smoke test)."""
    from tools import compile_report as C

    bins = C.binaries((arch,), plan=precompile_plan(C))
    n_all = len(bins)
    if limit:
        bins = sorted(bins, key=C.cost)[:limit]
    t = time.time()
    C.compile_all(bins, jobs)
    print(
        f"{len(bins)} of {n_all} binaries compiled for sm_{arch} on {jobs} processes in {time.time() - t:.0f} s"
    )
    print(C.summary(bins))
    keep = (
        "kernel",
        "arch",
        "dtype",
        "precision",
        "D",
        "flags",
        "tiles",
        "regs",
        "spill_bytes",
        "smem",
        "seconds",
        "error",
    )
    with open(path, "w") as f:
        json.dump(
            dict(
                n_all=n_all,
                wall_s=time.time() - t,
                jobs=jobs,
                binaries=[{k: b.get(k) for k in keep} for b in bins],
            ),
            f,
        )


@section("0. precompile: what the sections below launch, compiled in parallel into Triton's cache")
def precompile(dry):
    major, minor = (9, 0) if dry else torch.cuda.get_device_capability()
    arch = 10 * major + minor
    path = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "precompile.json")
    jobs = 2 if dry else os.cpu_count()
    cmd = [
        sys.executable,
        "-m",
        "tools.gpu_check",
        f"--precompile={arch}",
        f"--jobs={jobs}",
        f"--json={path}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    r = subprocess.run(
        cmd + (["--limit=2"] if dry else []), cwd=ROOT, env=env, capture_output=True, text=True
    )
    print("  " + r.stdout.strip().replace("\n", "\n  "))
    if r.returncode:
        raise RuntimeError(f"the precompile process failed ({r.returncode}): {r.stderr[-3000:]}")
    with open(path) as f:
        FIGURES["precompile"] = json.load(f)
    bad = [b for b in FIGURES["precompile"]["binaries"] if b["error"] or b["spill_bytes"]]
    for b in bad:
        print(
            f"  {'FAILED' if b['error'] else 'SPILLS'} {b['kernel']} {b['dtype']} D={b['D']} {b['flags']} "
            f"{b['tiles']}: {b['error'] or b['spill_bytes']}"
        )
    if dry:
        print(
            "  (dry run: 2 binaries for sm_90, to exercise this path; the interpreter itself compiles nothing)"
        )


@section("1. correctness at real shapes (every dtype, production tiles)")
def check_correctness(A, dev, dry):
    from model import attention_math

    ok, lines = True, []
    for name, (B, H, Lq, Lk, D, P, per_row, causal, self_attn) in (
        CORRECTNESS_DRY if dry else CORRECTNESS
    ).items():
        for dtype, prec in CORRECTNESS_DTYPES.get(name, [BF16]):
            x, do, _ = make_inputs(
                dev, dtype, B, H, Lq, Lk, D, P, per_row, causal, self_attn, seed=1
            )

            def kern(**t):
                return A.attention(**t, fp32_precision=prec or "ieee")

            out, grads = run_grads(kern, x, do)
            x64 = {
                n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                for n, t in x.items()
            }
            ref = run_grads(attention_math, x64, do.double())
            e = max_errs([out, *grads], [ref[0], *ref[1]])
            et = None
            if dtype == torch.float32:
                tol_o, tol_g = (1e-5, 2e-5) if prec == "ieee" else (5e-3, 1e-2)
                good = e[0] <= tol_o and max(e[1:]) <= tol_g
                rule = f"<= {tol_o:g} / {tol_g:g}"
            else:
                torch_out, torch_grads = run_grads(attention_math, x, do)
                et = max_errs([torch_out, *torch_grads], [ref[0], *ref[1]])
                good = e[0] <= 2 * et[0] and all(a <= 3 * b for a, b in zip(e[1:], et[1:]))
                rule = f"torch {et[0]:.1e} / {max(et[1:]):.1e} (x2 / x3)"
            again = run_grads(kern, x, do)
            same = torch.equal(out, again[0]) and all(
                torch.equal(a, b) for a, b in zip(grads, again[1])
            )
            ok &= good and same and not out.isnan().any().item()
            lines.append(
                dict(
                    shape=name,
                    dtype=str(dtype)[6:],
                    precision=prec,
                    out_err=e[0],
                    grad_err=max(e[1:]),
                    torch_err=et,
                    ok=good,
                    deterministic=same,
                )
            )
            print(
                f"{'ok  ' if good and same else 'FAIL'} {name:16s} {str(dtype)[6:]:8s} {prec or '':4s} "
                f"out {e[0]:.1e} grads {max(e[1:]):.1e} [{rule}] deterministic={same}",
                flush=True,
            )
    # a fully padded row: 0 and no NaN with P = 0; the prefix only with P > 0
    x, do, _ = make_inputs(dev, torch.bfloat16, 2, 2, 64, 64, 64, 0, False, False, True)
    x["key_padding_mask"][1] = False
    out, grads = run_grads(A.attention, x, do)
    padded_ok = (out[1] == 0).all().item() and not any(
        g.isnan().any().item() for g in [out, *grads]
    )
    print(f"{'ok  ' if padded_ok else 'FAIL'} fully padded row (P = 0): output 0, no NaN")
    FIGURES["correctness"] = dict(lines=lines, padded_row_ok=padded_ok, ok=ok and padded_ok)
    return ok and padded_ok


def bench(fn, dry, reps=1):
    """Median of `reps` do_bench medians, in ms (CPU dry run: one timed call)."""
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return statistics.median(
        do_bench(fn, warmup=25, rep=60, return_mode="median") for _ in range(reps)
    )


def fwd_bwd(fn, x, do):
    leaves = [t for t in x.values() if torch.is_tensor(t) and t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        fn(**x).backward(do)

    return step


@section(
    "2. tile sweep (bf16, encoder L = 1024, P = 200, per-row prefix; decoder Lq = 128 for the forward)"
)
def sweep(A, dev, dry):
    shape = (2, 2, 33, 33, 16, 7) if dry else (8, 16, 1024, 1024, 64, 200)
    dec = (2, 2, 17, 17, 16, 7) if dry else (8, 16, 128, 128, 64, 200)
    B, H, Lq, Lk, D, P = shape
    x, do, _ = make_inputs(dev, torch.bfloat16, B, H, Lq, Lk, D, P, True, False, True)
    xd, dod, _ = make_inputs(dev, torch.bfloat16, *dec, True, True, True)
    base = A.pick_config(D, torch.bfloat16)
    space = SWEEP_DRY if dry else SWEEP
    ref_out, ref_grads = run_grads(A.attention, x, do)  # with pick_config's tiles
    winners, default, timings = dict(base), A.pick_config, {}
    try:
        for phase, configs in space.items():
            timings[phase] = _sweep_phase(
                A, phase, configs, base, winners, x, do, xd, ref_out, ref_grads, dry
            )
            base = dict(base, **{phase: winners[phase]})
    finally:  # the benchmark runs with the winners (16-bit, D = 64), pick_config's choice elsewhere
        A.pick_config = lambda D, dtype, *p: (
            winners if D == 64 and dtype != torch.float32 else default(D, dtype, *p)
        )
    print(
        f"winners (D = 64, 16-bit; paste into pick_config): dict(fwd={winners['fwd']}, "
        f"dkdv={winners['dkdv']}, dq={winners['dq']})"
    )
    FIGURES["sweep"] = dict(
        pick_config=default(D, torch.bfloat16),
        winners=winners,
        ms={
            phase: [dict(tiles=c, ms=t, spill_bytes=sp) for t, c, sp in r]
            for phase, r in timings.items()
        },
    )
    return winners


def _spills(phase, cfg):
    """Bytes this phase's kernel spills with these tiles (bf16, D = 64, any variant), as section
    0 compiled it."""
    name = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}[phase]

    def t(b):
        return (
            b["tiles"]["BLOCK_M"],
            b["tiles"]["BLOCK_N"],
            b["tiles"]["num_warps"],
            b["tiles"]["num_stages"],
        )

    return max(
        [
            b["spill_bytes"] or 0
            for b in FIGURES.get("precompile", {}).get("binaries", [])
            if b["kernel"] == name and b["dtype"] == "bf16" and b["D"] == 64 and t(b) == tuple(cfg)
        ],
        default=0,
    )


def _sweep_phase(A, phase, configs, base, winners, x, do, xd, ref_out, ref_grads, dry):
    """Time each tile config of one kernel (fwd, dkdv or dq) with the others fixed; record the
    fastest of those that do not spill. Returns [(ms, config, bytes spilled)] (for the fwd phase:
    encoder + decoder forward)."""
    results = []
    for cfg in configs:
        trial = dict(base, **{phase: cfg})
        A.pick_config = lambda *_, trial=trial: trial
        try:
            # compiles; must agree with the default tiles
            out, grads = run_grads(A.attention, x, do)
            err = max(max_errs([out, *grads], [ref_out, *ref_grads]))
            assert err <= 0.1, f"disagrees with pick_config's tiles by {err:.2e}"
            t = bench(
                (lambda: A.attention(**x)) if phase == "fwd" else fwd_bwd(A.attention, x, do), dry
            )
            t_dec = bench(lambda: A.attention(**xd), dry) if phase == "fwd" else 0.0
            # a spilling config would fail tests/test_kernels_compile.py in pick_config
            spill = _spills(phase, cfg)
            results.append((t + t_dec, cfg, spill))
            print(
                f"  {phase:4s} BLOCK_M={cfg[0]:3d} BLOCK_N={cfg[1]:3d} warps={cfg[2]} stages={cfg[3]}: "
                f"{t:.3f} ms"
                + (f" (+ decoder {t_dec:.3f} ms)" if phase == "fwd" else "")
                + (f"  [spills {spill} B: not a candidate]" if spill else ""),
                flush=True,
            )
        except Exception as exc:  # e.g. out of shared memory: skip the config
            print(f"  {phase:4s} {cfg}: failed ({type(exc).__name__}: {str(exc)[:120]})")
    fine = [r for r in results if not r[2]]
    if fine:
        winners[phase] = min(fine)[1]
    return results


def sdpa_choice(x):
    """The backend SDPA's default dispatch picks for these inputs (torch._fused_sdp_choice, a
    private API)."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(*sdpa_inputs(**x))).name
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


@section("3. benchmark vs SDPA (bf16, B = 8, H = 16, D = 64, ragged right padding)")
def benchmark(A, dev, dry, deadline_s, reps):
    from torch.nn.attention import SDPBackend

    B, H, D, big = (2, 2, 16, [32]) if dry else (8, 16, 64, [512, 1024, 2048])
    P_goal = 7 if dry else 200
    Lenc, Ldec = (32, 16) if dry else (1024, 128)
    # (shape, Lq, Lk, causal, self_attn, P, per_row, goal): the goal shapes first (the budget guard)
    rows = []
    for per_row in (False, True):
        rows += [
            ("encoder", Lenc, Lenc, False, True, P_goal, per_row, True),
            ("cross", Ldec, Lenc, False, False, P_goal, per_row, True),
            ("decoder", Ldec, Ldec, True, True, P_goal, per_row, True),
        ]
    rows += [
        ("encoder", L, L, False, True, P, False, False)
        for L in big
        for P in (0, P_goal)
        if (L, P) != (Lenc, P_goal)
    ]
    rows += [
        ("cross", Ldec, Lenc, False, False, 0, False, False),
        ("decoder", Ldec, Ldec, True, True, 0, False, False),
    ]
    backends = {
        "sdpa auto": None,
        "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa flash": SDPBackend.FLASH_ATTENTION,
        "sdpa math": SDPBackend.MATH,
    }
    table, results = [], {}
    for shape, Lq, Lk, causal, self_attn, P, per_row, goal in rows:
        if time.time() - T0 > deadline_s:
            print(f"  skipped {shape} L={Lk} P={P}: past the benchmark's {deadline_s:.0f} s")
            continue
        x, do, flops = make_inputs(
            dev, torch.bfloat16, B, H, Lq, Lk, D, P, per_row, causal, self_attn
        )
        n = reps if goal else 1
        impls = {"triton": A.attention}
        for name, backend in backends.items():
            if name == "sdpa math" and not (
                shape == "encoder" and Lk == Lenc and P == P_goal and not per_row
            ):
                continue  # the math backend is slow: time it once, at the encoder goal shape
            impls[name] = (lambda be: lambda **t: _forced(be, t))(backend)
        ref = None
        for name, fn in impls.items():
            try:
                out = fn(**x)
                if ref is None:
                    ref = out
                agree = (out.float() - ref.float()).abs().max().item()
                assert agree <= 3e-2, f"output differs from the kernel's by {agree:.2e}"
                t_f = bench(lambda: fn(**x), dry, n)
                t_fb = bench(fwd_bwd(fn, x, do), dry, n)
            except Exception as exc:
                table.append(
                    (
                        shape,
                        Lq,
                        Lk,
                        P,
                        per_row,
                        name,
                        None,
                        None,
                        f"n/a: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:70] if str(exc) else ''}",
                    )
                )
                continue
            note = sdpa_choice(x) if name == "sdpa auto" else ""
            results[(shape, Lk, P, per_row, name)] = (t_f, t_fb, flops)
            table.append(
                (
                    shape,
                    Lq,
                    Lk,
                    P,
                    per_row,
                    name,
                    (t_f, flops / t_f * 1e-9),
                    (t_fb, 3.5 * flops / t_fb * 1e-9),
                    note,
                )
            )
        print(
            f"  {shape} Lq={Lq} Lk={Lk} P={P} {'per-row' if per_row else 'shared'}: done",
            flush=True,
        )
    print(
        "\n| shape | Lq | Lk | P | prefix | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, Lq, Lk, P, per_row, name, f, fb, note in table:

        def cell(r):
            return f"{r[0]:.3f} | {r[1]:.0f}" if r else "- | -"

        print(
            f"| {shape} | {Lq} | {Lk} | {P} | {'per-row' if per_row else 'shared'} | {name} | {cell(f)} | "
            f"{cell(fb)} | {note} |"
        )
    print(
        "TFLOP/s count useful (unmasked) pairs only: forward 4·D·H·Σ n_vis, fwd+bwd 3.5x (useful_flops above)."
    )
    FIGURES["benchmark"] = [
        dict(
            shape=s,
            Lq=lq,
            Lk=lk,
            P=p,
            prefix="per-row" if r else "shared",
            impl=name,
            fwd_ms=f and f[0],
            fwd_tflops=f and f[1],
            fwd_bwd_ms=fb and fb[0],
            fwd_bwd_tflops=fb and fb[1],
            note=note,
        )
        for s, lq, lk, p, r, name, f, fb, note in table
    ]
    return results, (Lenc, Ldec, P_goal)


def _forced(backend, t):
    from torch.nn.attention import sdpa_kernel

    if backend is None:
        return sdpa_baseline(**t)
    with sdpa_kernel([backend]):
        return sdpa_baseline(**t)


@section("4. memory: no buffer of size B·Lq·Lk (extra peak memory of kernel fwd+bwd at L and 2L)")
def memory_scaling(A, dev, dry):
    if dry:
        print("  n/a on CPU")
        return None
    extra = {}
    for L in (1024, 2048):
        x, do, _ = make_inputs(dev, torch.bfloat16, 8, 16, L, L, 64, 200, True, False, True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd(A.attention, x, do)()
        torch.cuda.synchronize()
        extra[L] = torch.cuda.max_memory_allocated() - before
        print(
            f"  L = {L}: extra peak {extra[L] / 2**20:.1f} MiB (a B·Lq·Lk bool mask would be "
            f"{8 * L * (L + 200) / 2**20:.1f} MiB)"
        )
    FIGURES["memory"] = dict(extra_peak_bytes=extra)
    # ~2 if linear in L (q/k/v-sized gradients), ~4 with a B·Lq·Lk buffer
    return extra[2048] / extra[1024]


def goals(correct, results, sizes, mem_ratio, dry):
    print(f"\n## 5. the kernel's goals{' (dry run: CPU timings, not meaningful)' if dry else ''}")
    Lenc, Ldec, P = sizes

    def best(shape, Lk, per_row, i):
        return min(
            (
                v[i]
                for (s, l, p, r, name), v in results.items()
                if s == shape and l == Lk and p == P and r == per_row and name.startswith("sdpa")
            ),
            default=float("nan"),
        )

    def kern(shape, Lk, per_row, i):
        return results.get((shape, Lk, P, per_row, "triton"), (float("nan"),) * 3)[i]

    lines = [("correctness at real shapes (all dtypes)", bool(correct), "")]
    for shape, Lk, target in (
        ("encoder", Lenc, 0.45),
        ("cross", Lenc, 0.35),
        ("decoder", Ldec, 0.35),
    ):
        r = kern(shape, Lk, False, 1) / best(shape, Lk, False, 1)
        lines.append((f"{shape} fwd+bwd <= {target}x best SDPA", r <= target, f"{r:.2f}x"))
    ms, flops = kern("encoder", Lenc, False, 0), kern("encoder", Lenc, False, 2)
    lines.append(
        (
            "encoder forward >= 300 TFLOP/s useful",
            flops / ms * 1e-9 >= 300,
            f"{flops / ms * 1e-9:.0f}",
        )
    )
    for i, (what, limit) in enumerate((("forward", 1.03), ("fwd+bwd", 1.05))):
        r = kern("encoder", Lenc, True, i) / kern("encoder", Lenc, False, i)
        lines.append(
            (f"per-row prefix overhead {what} <= {limit - 1:.0%}", r <= limit, f"{r - 1:+.1%}")
        )
    lines.append(
        (
            "no memory of size B·Lq·Lk (extra peak 2L / L <= 2.5)",
            mem_ratio is not None and mem_ratio <= 2.5,
            "n/a" if mem_ratio is None else f"{mem_ratio:.2f}",
        )
    )
    for what, ok, value in lines:
        print(f"{'PASS' if ok else 'MISS'}  {what}  {value}")
    FIGURES["goals"] = [dict(goal=what, met=bool(ok), value=value) for what, ok, value in lines]


@section(
    "6. strategies at bart-large scale (bench/gpu_strategies.py: bf16, B = 8, source 512, target 128)"
)
def strategies_bench(dry, budget_s, keep_s=150, run_s=90):
    """bench/gpu_strategies.py as it is, in a process of its own: --attn triton, then --attn sdpa
    (the baseline) while `keep_s` seconds stay for section 7 after a run of about `run_s`."""
    if dry:
        print(
            "  skipped in the dry run: bench/gpu_strategies.py needs CUDA (its CPU twin: bench/bench_strategies.py)"
        )
        return
    FIGURES["strategies"] = {}
    for attn in ("triton", "sdpa"):
        left = budget_s - (time.time() - T0)
        if left < keep_s + run_s:
            print(f"  skipped --attn {attn}: {left:.0f} s left, section 7 keeps {keep_s} s")
            continue
        cmd = [
            sys.executable,
            "bench/gpu_strategies.py",
            "--model",
            "bart-large",
            "--attn",
            attn,
            "--batch",
            "8",
            "--src",
            "512",
            "--tgt",
            "128",
        ]
        print("  $ " + " ".join(cmd[1:]), flush=True)
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left - keep_s)
            out, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as exc:
            out, rc = (
                (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or "",
                "timeout",
            )
        print("  " + out.strip().replace("\n", "\n  "))
        if rc:
            print(
                f"  exit {rc}: "
                + (r.stderr[-2000:] if rc != "timeout" else f"killed after {left - keep_s:.0f} s")
            )
        names = ("custom", "leo", "lldb", "prefix", "lora")
        keys = (
            "trainable",
            "step_ms",
            "exact_tflop",
            "tflops",
            "peak_gib",
            "peak_vs_custom",
            "time_vs_custom",
            "flops_vs_custom",
        )
        rows = {
            l.split()[0]: dict(zip(keys, (float(v.replace(",", "")) for v in l.split()[1:])))
            for l in out.splitlines()
            if l.split() and l.split()[0] in names and len(l.split()) == 9
        }
        goals_ = [line for line in out.splitlines() if line.startswith("goal:")]
        FIGURES["strategies"][attn] = dict(exit=rc, rows=rows, goals=goals_)


@section(
    "7. a bart-base base (train.py --mode=base --attn_impl=triton, bf16 autocast): its source_gain curve"
)
def train_base(dry, args):
    """train.py as a process of its own on the compact corpus of --prepare, for the minutes the
    budget leaves (its start-up, evaluations and the final save fit in the last 60 s), then the
    curve from its log.jsonl. A run folder and the saved base go to a temporary folder (nothing
    to resume from, nothing left in runs/)."""
    corpus = sorted(glob.glob(os.path.join(PREPARED, "corpus", "*.jsonl")))
    tok = os.path.join(PREPARED, "tokenizer.json")
    if not corpus or not os.path.exists(tok):
        print(
            f"  skipped: no prepared corpus in {os.path.relpath(PREPARED, ROOT)}/ -- run `python -m "
            f"tools.gpu_check --prepare` where data/cache/corpus is, and carry data/cache/gpu"
        )
        return
    left = args.budget_s - (time.time() - T0)
    if not dry and left < 120:
        print(
            f"  skipped: {left:.0f} s left of the {args.budget_s:.0f} s budget (section 7 needs 2 minutes)"
        )
        return
    minutes = 0 if dry else round((left - 60) / 60, 2)  # the dry run stops after 4 steps
    # the tiny preset on the two smallest projects, sdpa on CPU (the interpreter would take minutes)
    if dry:
        corpus = sorted(corpus, key=os.path.getsize)[:2]
    tmp = tempfile.mkdtemp(prefix="gpu-base-")
    cmd = [
        sys.executable,
        "train.py",
        "--mode=base",
        f"--preset={'tiny' if dry else 'bart-base'}",
        f"--attn_impl={'sdpa' if dry else 'triton'}",
        "--name=gpu-base",
        f"--save_base={tmp}/base",
        f"--out_dir={tmp}/runs",
        f"--tokenizer={tok}",
        f"--denoise_steps={2 if dry else args.denoise_steps}",
        f"--max_minutes={minutes}",
        f"--eval_interval={2 if dry else args.eval_interval}",
        "--patience=1000",
        "--base_projects=" + ",".join(corpus),
    ] + (["--max_steps=4", "--batch_size=4"] if dry else [])
    print(
        "  $ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]),
        flush=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tail, t = [], time.time()
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        # train.py stops itself; this is for a hang
        watchdog = threading.Timer((minutes or 10) * 60 + 120, p.kill)
        watchdog.start()
        # evaluations and the end as they come; the per-step lines only in the tail
        for line in p.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            if any(
                w in line
                for w in ("val loss", "parameters:", "stopped at", "saved to", "Error", "error")
            ):
                print("  | " + line.rstrip(), flush=True)
        watchdog.cancel()
    log = os.path.join(tmp, "runs", "gpu-base", "log.jsonl")
    rows = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
    keys = ("step", "stage", "val_loss", "source_gain", "encoder_spread", "seconds")
    FIGURES["training"] = dict(
        cmd=cmd[1:],
        minutes=minutes,
        exit=p.returncode,
        wall_s=time.time() - t,
        curve=[{k: r.get(k) for k in keys} for r in rows],
        log=rows,
        tail=tail,
    )
    if p.returncode:
        print(
            "  train.py exited with "
            + str(p.returncode)
            + "; its last lines:\n  | "
            + "\n  | ".join(tail)
        )
    print(
        "\n| step | stage | val loss | source_gain | encoder spread | s |\n|---|---|---|---|---|---|"
    )
    for r in rows:

        def num(k, f):
            return format(r[k], f) if isinstance(r.get(k), (int, float)) else "-"

        print(
            f"| {r.get('step')} | {r.get('stage', '-')} | {num('val_loss', '.4f')} | {num('source_gain', '.3f')} | "
            f"{num('encoder_spread', '.3f')} | {num('seconds', '.0f')} |"
        )
    print(
        "source_gain: validation perplexity with another focal class's source over that with the pair's own; 1.0 = "
        "the model ignores its input (docs/source-gain.md)."
    )
    shutil.rmtree(tmp, ignore_errors=True)


def prepare(projects):
    """--prepare: data/cache/gpu/ for section 7 on a machine without the corpus (the device
    machine takes 64 MiB of carried files; the mined corpus is 1.6 GB): the tokenizer, and per
    project its records slimmed to the fields train.py --mode=base reads -- id, project,
    src_fm_fc (the base's focal context, train.py's BASE_DEFAULTS), tgt, and the file and
    identifier of test_class (the validation holdout groups by it) and focal_class (source_gain
    pairs each record with another focal class). `src` (fm_fc_ms_ff) is left out: the base does
    not read it, and it would bring the 33 base projects from 29 to ~76 MiB."""
    import data

    names = [p for p in projects.split(",") if p] or [
        r["name"] for r in data.read_projects() if r["role"] == "base"
    ]
    have = [n for n in names if (data.CACHE / "corpus" / f"{n}.jsonl").exists()]
    if not have or not (data.CACHE / "tokenizer.json").exists():
        sys.exit(
            f"nothing to prepare: no mined corpus for {names} or no {data.CACHE / 'tokenizer.json'} (make data)"
        )
    shutil.rmtree(PREPARED, ignore_errors=True)
    os.makedirs(os.path.join(PREPARED, "corpus"))
    shutil.copy(data.CACHE / "tokenizer.json", os.path.join(PREPARED, "tokenizer.json"))

    def ids(c):
        return {"file": c["file"], "identifier": c["identifier"]}

    n = 0
    for name in have:
        rows = [
            dict(
                id=r["id"],
                project=r["project"],
                src_fm_fc=r["src_fm_fc"],
                tgt=r["tgt"],
                test_class=ids(r["test_class"]),
                focal_class=ids(r["focal_class"]),
            )
            for r in data.load_project(name)
        ]
        data.atomic_write(
            os.path.join(PREPARED, "corpus", f"{name}.jsonl"),
            "".join(json.dumps(r) + "\n" for r in rows),
        )
        n += len(rows)
    size = sum(
        os.path.getsize(f)
        for f in glob.glob(os.path.join(PREPARED, "**", "*"), recursive=True)
        if os.path.isfile(f)
    )
    missing = sorted(set(names) - set(have))
    print(
        f"wrote {os.path.relpath(PREPARED, ROOT)}/: tokenizer + {n} records of {len(have)} projects, "
        f"{size / 2**20:.1f} MiB"
        + (f"; no mined corpus for {', '.join(missing)}" if missing else "")
        + '\ncarry it to the GPU machine (device run: carry=["data/cache/gpu"]); section 7 reads it'
    )


def main():
    args = ARGS.parse_args()
    if args.prepare:
        return prepare(args.projects)
    if args.precompile:
        return precompile_worker(args.precompile, args.jobs, args.limit, args.json)
    # forced SDPA backends warn why they cannot run
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            sys.exit(
                "no CUDA device: run with --dry-run to exercise this script in the CPU interpreter"
            )
        # before kernels.attention is imported (read at decoration time)
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    dev = "cpu" if args.dry_run else "cuda"
    print("# tools/gpu_check.py" + (" --dry-run (CPU interpreter)" if args.dry_run else ""))
    info = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        cudnn=torch.backends.cudnn.version(),
        cuda=torch.version.cuda,
        python=sys.version.split()[0],
        budget_s=args.budget_s,
    )
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            sms=p.multi_processor_count,
            capability=torch.cuda.get_device_capability(),
        )
        print(
            f"device: {p.name}, {p.multi_processor_count} SMs (H100 SXM 132, PCIe 114; dense bf16 peak ~989 / "
            f"~756 TFLOP/s)"
        )
    print(
        f"torch {torch.__version__}, triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}, "
        f"CUDA {torch.version.cuda}, python {sys.version.split()[0]}"
    )
    FIGURES["info"] = info
    precompile(args.dry_run)
    import kernels.attention as A

    correct = check_correctness(A, dev, args.dry_run)
    if not args.no_sweep:
        sweep(A, dev, args.dry_run)
    out = benchmark(
        A, dev, args.dry_run, float("inf") if args.dry_run else 0.5 * args.budget_s, args.reps
    )
    results, sizes = out if out else ({}, (1024, 128, 200))
    mem_ratio = memory_scaling(A, dev, args.dry_run)
    goals(correct, results, sizes, mem_ratio, args.dry_run)
    strategies_bench(args.dry_run, args.budget_s)
    train_base(args.dry_run, args)
    FIGURES.update(sections_failed=FAILED, total_s=time.time() - T0)
    folder = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "gpu_check-dry-run.json" if args.dry_run else "gpu_check.json")
    with open(path, "w") as f:
        json.dump(FIGURES, f, indent=1, default=str)
    print(
        f"\nsections that raised: {FAILED or 'none'}; total {time.time() - T0:.0f} s; every figure: {path}"
    )


if __name__ == "__main__":
    main()
