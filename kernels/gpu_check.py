"""
The GPU check of kernels/attention.py, in one command (`make gpu-check`, under 4 minutes on an H100):

  1. correctness at real shapes, every dtype, compiling the production tiles: the kernel vs model.attention_math
     in float64, by the rules of tests/test_kernels.py (fp32 "ieee" <= 1e-5 / 2e-5; fp32 "tf32" <= 5e-3 / 1e-2;
     fp16/bf16 <= 2x / 3x PyTorch's own error in that dtype), plus determinism and a fully padded row;
  2. a small sweep of tile sizes, warps and stages (bf16, encoder shape), printing the winners as the line to
     paste into pick_config; the benchmark below runs with them;
  3. a benchmark (triton.testing.do_bench: median, warm-up, L2 flushed; the goal shapes 3 times, median of
     medians) against SDPA on the gathered + concatenated prefix with a boolean mask, every backend forced and
     on auto (logging the backend auto chose), in a markdown table;
  4. the goals of issue 5, PASS / MISS each.
A section that fails prints its traceback and the script goes on. Spec: ../shared/specs/attention-kernel.md §9.

    python -m kernels.gpu_check                # the GPU run
    python -m kernels.gpu_check --dry-run      # CPU: tiny shapes in the Triton interpreter, to exercise this file
"""
import argparse
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `model`, `kernels`

ARGS = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
ARGS.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes (checks this script only)")
ARGS.add_argument("--no-sweep", action="store_true", help="skip the tile sweep (use pick_config's tiles)")
ARGS.add_argument("--budget-s", type=float, default=225.0, help="skip remaining benchmark rows after this")
ARGS.add_argument("--reps", type=int, default=3, help="do_bench repetitions for the goal shapes (median)")
T0 = time.time()
FAILED = []  # names of sections that raised


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
    """Forward FLOPs on unmasked (useful) pairs: 2 matmuls (QKᵀ, PV) x 2 FLOPs per multiply-add x D, summed
    over the real query rows i < len_q(b) of each row b and head, each seeing n_vis(b, i) keys:
    n_vis = P + len_k(b), or with causal P + clamp(min(Lk - Lq + i + 1, len_k(b)), 0).  fwd+bwd = 3.5x this
    (backward 2.5x: 5 matmuls; the FA2 / Triton-tutorial convention)."""
    total = 0
    for lq, lk in zip(len_q.tolist(), len_k.tolist()):
        i = torch.arange(lq)
        seen = torch.full_like(i, lk)
        if causal:
            seen = torch.clamp(torch.minimum(Lk - Lq + i + 1, seen), min=0)
        total += int((P + seen).sum())
    return 4 * D * H * total


def make_inputs(dev, dtype, B, H, Lq, Lk, D, P, per_row, causal, self_attn, seed=0):
    """bf16 etc. inputs N(0,1); ragged right padding len ~ U[L/2, L] (fixed seed); per_row: a bank of 8 prefixes
    and prefix_index = b % 8, else one shared (H, P, D) prefix. Self-attention pads the queries like the keys."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev, dtype).requires_grad_()
    len_k = torch.randint(Lk // 2, Lk + 1, (B,), generator=g)
    len_q = len_k if self_attn else torch.full((B,), Lq)
    x = dict(q=rnd(B, H, Lq, D), k=rnd(B, H, Lk, D), v=rnd(B, H, Lk, D), causal=causal,
             key_padding_mask=(torch.arange(Lk)[None, :] < len_k[:, None]).to(dev))
    if P:
        shape = (8, H, P, D) if per_row else (H, P, D)
        x.update(prefix_k=rnd(*shape), prefix_v=rnd(*shape))
        if per_row:
            x["prefix_index"] = (torch.arange(B) % 8).to(dev)
    flops = useful_flops(len_q, len_k, Lq, Lk, P, H, D, causal)
    return x, torch.randn(B, H, Lq, D, generator=g).to(dev, dtype), flops


def sdpa_baseline(**x):
    """What one does without the kernel, timed as a whole: gather each row's prefix, concatenate it with K/V,
    build a boolean mask (prefix columns always visible; lower-right causal for the decoder), call SDPA."""
    return F.scaled_dot_product_attention(*sdpa_inputs(**x))


def sdpa_inputs(q, k, v, key_padding_mask=None, causal=False, prefix_k=None, prefix_v=None, prefix_index=None):
    """q, [prefix; k], [prefix; v] and the boolean mask. Non-causal masks stay (B, 1, 1, P + Lk): broadcast over
    the queries, which every masked backend accepts and which is cheaper than materialising (B, 1, Lq, P + Lk)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    vis = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        vis = vis & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)  # (B, 1, Lq, Lk)
    if prefix_k is not None:
        pk, pv = (prefix_k[prefix_index], prefix_v[prefix_index]) if prefix_index is not None else \
            (prefix_k.expand(B, *prefix_k.shape), prefix_v.expand(B, *prefix_v.shape))
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, P + Lk, D)
        ones = torch.ones(B, 1, vis.shape[2], pk.shape[2], dtype=torch.bool, device=q.device)
        vis = torch.cat([ones, vis], dim=-1)
    return q, k, v, vis


def run_grads(fn, x, do):
    tensors = {n: t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
               for n, t in x.items()}
    out = fn(**tensors)
    leaves = [t for t in tensors.values() if torch.is_tensor(t) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, do.to(out.dtype))


def max_errs(a, b):
    return [(x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b)]


@section("1. correctness at real shapes (every dtype, production tiles)")
def check_correctness(A, dev, dry):
    from model import attention_math
    shapes = {  # name: (B, H, Lq, Lk, D, P, per_row, causal, self_attn)
        "encoder": (2, 4, 1000, 1000, 64, 200, True, False, True),
        "decoder-causal": (3, 4, 130, 130, 64, 200, True, True, True),
        "cross": (3, 4, 127, 1000, 64, 200, False, False, False),
        "decode-step-lq1": (3, 4, 1, 300, 64, 17, True, True, False),
        "d16": (2, 2, 300, 300, 16, 33, False, True, True),
        "d32": (2, 2, 300, 300, 32, 33, True, False, True),
        "d128": (2, 2, 300, 300, 128, 33, True, True, True),
    }
    if dry:
        shapes = {"encoder": (2, 2, 33, 33, 16, 7, True, False, True),
                  "decoder": (2, 2, 17, 17, 32, 7, True, True, True)}
    f32, tf32 = (torch.float32, "ieee"), (torch.float32, "tf32")
    f16, bf16 = (torch.float16, None), (torch.bfloat16, None)
    # every dtype once at a real shape, bf16 (the production dtype) everywhere; each line compiles 5 kernels
    dtypes = dict(encoder=[f32, tf32, f16, bf16], decoder=[f32, tf32, f16, bf16], cross=[f32, f16, bf16])
    dtypes["decoder-causal"] = [f32, bf16]
    ok = True
    for name, (B, H, Lq, Lk, D, P, per_row, causal, self_attn) in shapes.items():
        for dtype, prec in dtypes.get(name, [bf16]):
            x, do, _ = make_inputs(dev, dtype, B, H, Lq, Lk, D, P, per_row, causal, self_attn, seed=1)
            kern = lambda **t: A.attention(**t, fp32_precision=prec or "ieee")
            out, grads = run_grads(kern, x, do)
            x64 = {n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in x.items()}
            ref = run_grads(attention_math, x64, do.double())
            e = max_errs([out, *grads], [ref[0], *ref[1]])
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
            same = torch.equal(out, again[0]) and all(torch.equal(a, b) for a, b in zip(grads, again[1]))
            ok &= good and same and not out.isnan().any().item()
            print(f"{'ok  ' if good and same else 'FAIL'} {name:16s} {str(dtype)[6:]:8s} {prec or '':4s} "
                  f"out {e[0]:.1e} grads {max(e[1:]):.1e} [{rule}] deterministic={same}", flush=True)
    # a fully padded row: 0 and no NaN with P = 0; the prefix only with P > 0
    x, do, _ = make_inputs(dev, torch.bfloat16, 2, 2, 64, 64, 64, 0, False, False, True)
    x["key_padding_mask"][1] = False
    out, grads = run_grads(A.attention, x, do)
    padded_ok = (out[1] == 0).all().item() and not any(g.isnan().any().item() for g in [out, *grads])
    print(f"{'ok  ' if padded_ok else 'FAIL'} fully padded row (P = 0): output 0, no NaN")
    return ok and padded_ok


def bench(fn, dry, reps=1):
    """Median of `reps` do_bench medians, in ms (CPU dry run: one timed call)."""
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    return statistics.median(do_bench(fn, warmup=25, rep=60, return_mode="median") for _ in range(reps))


def fwd_bwd(fn, x, do):
    leaves = [t for t in x.values() if torch.is_tensor(t) and t.requires_grad]
    def step():
        for t in leaves:
            t.grad = None
        fn(**x).backward(do)
    return step


@section("2. tile sweep (bf16, encoder L = 1024, P = 200, per-row prefix; decoder Lq = 128 for the forward)")
def sweep(A, dev, dry):
    shape = (2, 2, 33, 33, 16, 7) if dry else (8, 16, 1024, 1024, 64, 200)
    dec = (2, 2, 17, 17, 16, 7) if dry else (8, 16, 128, 128, 64, 200)
    B, H, Lq, Lk, D, P = shape
    x, do, _ = make_inputs(dev, torch.bfloat16, B, H, Lq, Lk, D, P, True, False, True)
    xd, dod, _ = make_inputs(dev, torch.bfloat16, *dec, True, True, True)
    base = A.pick_config(D, torch.bfloat16)
    if dry:
        space = dict(fwd=[(16, 16, 1, 1), (32, 16, 1, 1)], dkdv=[(16, 16, 1, 1)], dq=[(16, 32, 1, 1)])
    else:
        space = dict(fwd=[(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3),
                          (64, 32, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3)],
                     dkdv=[(32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 2),
                           (16, 64, 4, 4)],
                     dq=[(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)])
    ref_out, ref_grads = run_grads(A.attention, x, do)  # with pick_config's tiles
    winners, default = dict(base), A.pick_config
    try:
        for phase, configs in space.items():
            _sweep_phase(A, phase, configs, base, winners, x, do, xd, ref_out, ref_grads, dry)
            base = dict(base, **{phase: winners[phase]})
    finally:  # the benchmark runs with the winners (16-bit, D = 64), pick_config's choice elsewhere
        A.pick_config = lambda D, dtype: winners if D == 64 and dtype != torch.float32 else default(D, dtype)
    print(f"winners (D = 64, 16-bit; paste into pick_config): dict(fwd={winners['fwd']}, "
          f"dkdv={winners['dkdv']}, dq={winners['dq']})")
    return winners


def _sweep_phase(A, phase, configs, base, winners, x, do, xd, ref_out, ref_grads, dry):
    """Time each tile config of one kernel (fwd, dkdv or dq) with the others fixed; record the fastest."""
    results = []
    for cfg in configs:
        trial = dict(base, **{phase: cfg})
        A.pick_config = lambda D, dtype, trial=trial: trial
        try:
            out, grads = run_grads(A.attention, x, do)  # compiles; must agree with the default tiles
            err = max(max_errs([out, *grads], [ref_out, *ref_grads]))
            assert err <= 0.1, f"disagrees with pick_config's tiles by {err:.2e}"
            t = bench((lambda: A.attention(**x)) if phase == "fwd" else fwd_bwd(A.attention, x, do), dry)
            t_dec = bench(lambda: A.attention(**xd), dry) if phase == "fwd" else 0.0
            results.append((t + t_dec, cfg))
            print(f"  {phase:4s} BLOCK_M={cfg[0]:3d} BLOCK_N={cfg[1]:3d} warps={cfg[2]} stages={cfg[3]}: "
                  f"{t:.3f} ms" + (f" (+ decoder {t_dec:.3f} ms)" if phase == "fwd" else ""), flush=True)
        except Exception as exc:  # e.g. out of shared memory: skip the config
            print(f"  {phase:4s} {cfg}: failed ({type(exc).__name__}: {str(exc)[:120]})")
    if results:
        winners[phase] = min(results)[1]


def sdpa_choice(x):
    """The backend SDPA's default dispatch picks for these inputs (torch._fused_sdp_choice, a private API)."""
    from torch.nn.attention import SDPBackend
    try:
        return SDPBackend(torch._fused_sdp_choice(*sdpa_inputs(**x))).name
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


@section("3. benchmark vs SDPA (bf16, B = 8, H = 16, D = 64, ragged right padding)")
def benchmark(A, dev, dry, budget_s, reps):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, D, big = (2, 2, 16, [32]) if dry else (8, 16, 64, [512, 1024, 2048])
    P_goal = 7 if dry else 200
    Lenc, Ldec = (32, 16) if dry else (1024, 128)
    rows = []  # (shape, Lq, Lk, causal, self_attn, P, per_row, goal): the goal shapes first (the budget guard)
    for per_row in (False, True):
        rows += [("encoder", Lenc, Lenc, False, True, P_goal, per_row, True),
                 ("cross", Ldec, Lenc, False, False, P_goal, per_row, True),
                 ("decoder", Ldec, Ldec, True, True, P_goal, per_row, True)]
    rows += [("encoder", L, L, False, True, P, False, False) for L in big for P in (0, P_goal)
             if (L, P) != (Lenc, P_goal)]
    rows += [("cross", Ldec, Lenc, False, False, 0, False, False), ("decoder", Ldec, Ldec, True, True, 0, False, False)]
    backends = {"sdpa auto": None, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa flash": SDPBackend.FLASH_ATTENTION,
                "sdpa math": SDPBackend.MATH}
    table, results = [], {}
    for shape, Lq, Lk, causal, self_attn, P, per_row, goal in rows:
        if time.time() - T0 > budget_s:
            print(f"  skipped {shape} L={Lk} P={P}: over the {budget_s:.0f} s budget")
            continue
        x, do, flops = make_inputs(dev, torch.bfloat16, B, H, Lq, Lk, D, P, per_row, causal, self_attn)
        n = reps if goal else 1
        impls = {"triton": A.attention}
        for name, backend in backends.items():
            if name == "sdpa math" and not (shape == "encoder" and Lk == Lenc and P == P_goal and not per_row):
                continue  # the math backend is slow: time it once, at the encoder goal shape
            impls[name] = (lambda be: (lambda **t: _forced(be, t)))(backend)
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
                table.append((shape, Lq, Lk, P, per_row, name, None, None, f"n/a: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:70] if str(exc) else ''}"))
                continue
            note = sdpa_choice(x) if name == "sdpa auto" else ""
            results[(shape, Lk, P, per_row, name)] = (t_f, t_fb, flops)
            table.append((shape, Lq, Lk, P, per_row, name, (t_f, flops / t_f * 1e-9), (t_fb, 3.5 * flops / t_fb * 1e-9),
                          note))
        print(f"  {shape} Lq={Lq} Lk={Lk} P={P} {'per-row' if per_row else 'shared'}: done", flush=True)
    print("\n| shape | Lq | Lk | P | prefix | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, Lq, Lk, P, per_row, name, f, fb, note in table:
        cell = lambda r: f"{r[0]:.3f} | {r[1]:.0f}" if r else "- | -"
        print(f"| {shape} | {Lq} | {Lk} | {P} | {'per-row' if per_row else 'shared'} | {name} | {cell(f)} | "
              f"{cell(fb)} | {note} |")
    print("TFLOP/s count useful (unmasked) pairs only: forward 4·D·H·Σ n_vis, fwd+bwd 3.5x (useful_flops above).")
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
        print(f"  L = {L}: extra peak {extra[L] / 2**20:.1f} MiB (a B·Lq·Lk bool mask would be "
              f"{8 * L * (L + 200) / 2**20:.1f} MiB)")
    return extra[2048] / extra[1024]  # ~2 if linear in L (q/k/v-sized gradients), ~4 with a B·Lq·Lk buffer


def goals(correct, results, sizes, mem_ratio, dry):
    print(f"\n## 5. goals of issue 5{' (dry run: CPU timings, not meaningful)' if dry else ''}")
    Lenc, Ldec, P = sizes
    best = lambda shape, Lk, per_row, i: min((v[i] for (s, l, p, r, name), v in results.items()
                                              if s == shape and l == Lk and p == P and r == per_row
                                              and name.startswith("sdpa")), default=float("nan"))
    kern = lambda shape, Lk, per_row, i: results.get((shape, Lk, P, per_row, "triton"), (float("nan"),) * 3)[i]
    lines = [("correctness at real shapes (all dtypes)", bool(correct), "")]
    for shape, Lk, target in (("encoder", Lenc, 0.45), ("cross", Lenc, 0.35), ("decoder", Ldec, 0.35)):
        r = kern(shape, Lk, False, 1) / best(shape, Lk, False, 1)
        lines.append((f"{shape} fwd+bwd <= {target}x best SDPA", r <= target, f"{r:.2f}x"))
    ms, flops = kern("encoder", Lenc, False, 0), kern("encoder", Lenc, False, 2)
    lines.append(("encoder forward >= 300 TFLOP/s useful", flops / ms * 1e-9 >= 300, f"{flops / ms * 1e-9:.0f}"))
    for i, (what, limit) in enumerate((("forward", 1.03), ("fwd+bwd", 1.05))):
        r = kern("encoder", Lenc, True, i) / kern("encoder", Lenc, False, i)
        lines.append((f"per-row prefix overhead {what} <= {limit - 1:.0%}", r <= limit, f"{r - 1:+.1%}"))
    lines.append(("no memory of size B·Lq·Lk (extra peak 2L / L <= 2.5)", mem_ratio is not None and mem_ratio <= 2.5,
                  "n/a" if mem_ratio is None else f"{mem_ratio:.2f}"))
    for what, ok, value in lines:
        print(f"{'PASS' if ok else 'MISS'}  {what}  {value}")


def main():
    args = ARGS.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # forced SDPA backends warn why they cannot run
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            sys.exit("no CUDA device: run with --dry-run to exercise this script in the CPU interpreter")
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.attention is imported (read at decoration time)
    import triton
    import kernels.attention as A
    dev = "cpu" if args.dry_run else "cuda"
    print("# kernels/gpu_check.py" + (" --dry-run (CPU interpreter)" if args.dry_run else ""))
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.multi_processor_count} SMs (H100 SXM 132, PCIe 114; dense bf16 peak ~989 / "
              f"~756 TFLOP/s)")
    print(f"torch {torch.__version__}, triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    correct = check_correctness(A, dev, args.dry_run)
    if not args.no_sweep:
        sweep(A, dev, args.dry_run)
    out = benchmark(A, dev, args.dry_run, args.budget_s, args.reps)
    results, sizes = out if out else ({}, (1024, 128, 200))
    mem_ratio = memory_scaling(A, dev, args.dry_run)
    goals(correct, results, sizes, mem_ratio, args.dry_run)
    print(f"\nsections that raised: {FAILED or 'none'}; total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
