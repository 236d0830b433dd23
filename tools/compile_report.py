"""The sm_90 (H100, H200) and sm_80 (A100) binaries of kernels/attention.py, compiled ahead of time
without a GPU, and what each one uses: registers, spills, shared memory. tools/compile_report.json
holds the figures of every binary, tests/test_kernels_compile.py checks them, and kernels/README.md
("Compiled binaries") shows them as tables.

What is compiled is recorded, not listed by hand, so the list cannot drift from what the model launches: every
@triton.jit function of kernels/attention.py is swapped for a recorder, and the autograd.Function (_FusedAttention)
runs its forward and backward on small CPU tensors for every kind of input attention() accepts -- dtype (fp32 with
"ieee" and with "tf32" dots, fp16, bf16) x head dim (16, 32, 64, 128) x causal or not x key padding mask or not x
prefix (none, shared, a bank with per-row ids) -- with pick_config's GPU tiles. Each recorded launch is turned into
the signature, constexprs, attributes and options that Triton's own launcher derives from it (the binder and
_pack_args of JITFunction.run), and compiled with
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=...).
Launches that give the same binary are compiled once: no prefix and a shared prefix differ only in runtime values,
the delta kernel has no prefix or mask, and _reduce_prefix_grad has no head dim. Integer arguments specialise on
divisibility by 16 (and == 1); lengths, H and batch sizes are do_not_specialize'd and every stride is a multiple of
the head dim (>= 16) or 0, and every pointer is 16-byte aligned, so one shape per kind of input gives every binary.

Resources are read from the cubin by the cuobjdump that ships in the Triton wheel
(--dump-resource-usage), which needs no driver (CompiledKernel.n_regs / n_spills are filled by
cuModuleLoad, i.e. on a GPU): REG; spills = STACK + LOCAL bytes per thread (local memory: the
driver's CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, of which Triton's n_spills is a quarter); shared memory
= metadata.shared (the dynamic amount Triton requests at launch) + SHARED (static). Limits per
block, opt-in maximum (CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability"): sm_90 227 KiB = 232448 bytes, sm_80 163 KiB = 166912 bytes.

Each record carries a key of everything its binary depends on: the source of every @triton.jit
function in kernels/attention.py, signature, constexprs, specialisation attributes, options,
Triton's version and the ptxas of the arch. A changed kernel, tile, launch or Triton makes records
stale; the test then names this command.

    python -m tools.compile_report --write              # compile what has no current record, rewrite the file
    python -m tools.compile_report --tables             # kernels/README.md's tables, from that file
    python -m tools.compile_report --core --jobs 2      # compile only the variant with the most flags per group
"""

import argparse
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

# compile, not interpret: @triton.jit reads it when kernels.attention loads
os.environ.pop("TRITON_INTERPRET", None)
# the repo root, for `kernels`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import kernels.attention as A  # noqa: E402

REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_report.json")
# bytes of shared memory per block (opt-in), by compute capability
SMEM_LIMIT = {90: 232448, 80: 166912}
PRECISIONS = [
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
    (torch.float16, "tf32"),
    (torch.bfloat16, "tf32"),
]
PREFIXES = ("none", "shared", "bank")
# every kind of input attention() takes: ((dtype, precision), head dim, causal, key padding mask,
# prefix)
KINDS = list(itertools.product(PRECISIONS, A.HEAD_DIMS, (False, True), (False, True), PREFIXES))
# constexprs that add code paths; --core keeps the variant with most set
FLAGS = ("CAUSAL", "HAS_MASK", "PER_ROW")
JITTED = {n: f for n, f in vars(A).items() if isinstance(f, JITFunction)}
SOURCE = hashlib.sha256(
    "".join(inspect.getsource(f.fn) for _, f in sorted(JITTED.items())).encode()
).hexdigest()


def record_launches(plan=None):
    """Run _FusedAttention forward + backward for each (input kind, tiles) of `plan` (default:
    every kind with pick_config's tiles; other tiles stand in for pick_config's) with each
    @triton.jit function of kernels/attention.py replaced by a recorder, so nothing runs; returns
    [(kernel name, args, kwargs, kind)]."""
    assert isinstance(A._attn_fwd, JITFunction), (
        "kernels.attention was imported under TRITON_INTERPRET=1"
    )
    launches, kind, pick_config = [], {}, A.pick_config

    class Recorder:  # stands in for kernel[grid](*args, **kwargs)
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, args, kw, dict(kind)))

    try:
        for n in JITTED:
            setattr(A, n, Recorder(n))
        for ((dtype, precision), D, causal, mask, prefix), tiles in plan or [
            (k, None) for k in KINDS
        ]:
            assert dtype in A.DTYPES
            kind.update(
                dtype=str(dtype)[6:],
                precision=precision,
                D=D,
                causal=causal,
                mask=mask,
                prefix=prefix,
            )
            A.pick_config = (lambda *_, tiles=tiles: tiles) if tiles else pick_config
            B, H, L, P = 2, 2, 17, 7

            def rnd(*s):
                return torch.randn(*s, dtype=dtype, requires_grad=True)

            # the model's (B, T, H, D) layout
            q, k, v = (rnd(B, L, H, D).transpose(1, 2) for _ in range(3))
            # what attention() hands the Function: a shared prefix as a bank of one, int64 ids, the
            # bool mask
            pk, pv = {
                "none": (None, None),
                "shared": (rnd(1, H, P, D), rnd(1, H, P, D)),
                "bank": (rnd(3, H, P, D), rnd(3, H, P, D)),
            }[prefix]
            ids = torch.tensor([2, 0]) if prefix == "bank" else None
            m = torch.tensor([[True] * L, [True] * 5 + [False] * (L - 5)]) if mask else None
            o = A._FusedAttention.apply(q, k, v, pk, pv, ids, m, causal, D**-0.5, precision)
            o.backward(torch.ones_like(o))
    finally:
        A.pick_config = pick_config
        for n, f in JITTED.items():
            setattr(A, n, f)
    return launches


def binaries(archs=(90, 80), plan=None):
    """The distinct binaries of the recorded launches, per arch: dicts with the kernel name, the
    compile arguments (signature, constexprs, attrs, options, as JITFunction.run derives them), a
    readable description and the key; "core" marks, per kernel x arch x dtype x precision x head
    dim x tiles, the variants with the most FLAGS set."""
    out, seen = [], set()
    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    for name, args, kw, kind in record_launches(plan):
        fn = JITTED[name]
        for arch, backend in backends.items():
            bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(
                *args, **kw
            )
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            # no local paths
            portable = sorted((k, v) for k, v in options.__dict__.items() if k != "extern_libs")
            key = hashlib.sha256(
                repr(
                    (
                        name,
                        arch,
                        signature,
                        constexprs,
                        attrs,
                        portable,
                        SOURCE,
                        triton.__version__,
                        backend.hash(),
                    )
                ).encode()
            ).hexdigest()[:20]
            if key in seen:
                continue
            seen.add(key)
            const = {fn.arg_names[i[0]]: v for i, v in constexprs.items()}
            # q's (or the prefix's) dtype
            first = next(t for n, t in signature.items() if n in ("Q", "O", "OUT"))
            out.append(
                dict(
                    key=key,
                    kernel=name,
                    arch=arch,
                    dtype=first[1:],
                    precision=const.get("PRECISION", "-"),
                    D=const.get("HEAD_DIM", "-"),
                    flags={f: const[f] for f in FLAGS if f in const},
                    tiles=dict(
                        BLOCK_M=const.get("BLOCK_M"),
                        BLOCK_N=const.get("BLOCK_N"),
                        BLOCK=const.get("BLOCK"),
                        num_warps=options.num_warps,
                        num_stages=options.num_stages,
                    ),
                    kind=kind,
                    job=(name, arch, signature, constexprs, attrs, options.__dict__),
                )
            )
    groups = {}
    for b in out:
        groups.setdefault(group(b), []).append(b)
    for g in groups.values():
        most = max(sum(b["flags"].values()) for b in g)
        for b in g:
            b["core"] = sum(b["flags"].values()) == most
    return out


def group(b):
    """kernel x arch x dtype x precision x head dim x tiles: what the flag variants share."""
    return f"{b['kernel']} sm_{b['arch']} {b['dtype']} {b['precision']} D={b['D']} {tiles_str(b['tiles'])}"


def tiles_str(t):
    size = f"{t['BLOCK_M']}×{t['BLOCK_N']}" if t["BLOCK_N"] else f"{t['BLOCK_M'] or t['BLOCK']}"
    return f"{size}, {t['num_warps']}, {t['num_stages']}"


def cost(b):
    """A rough order of compile time: the three attention kernels, larger head dims, fp32
    (unrolled FMA dots)."""
    attention = b["kernel"] in ("_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd")
    return attention, b["D"] != "-" and b["D"], b["dtype"] == "fp32"


def compile_one(job):
    """Compile one binary (in a worker process) and read its resources from the cubin."""
    # Triton 3.9's notice about the fp-fusion default
    warnings.filterwarnings("ignore", category=UserWarning)
    name, arch, signature, constexprs, attrs, options = job

    def cpu():
        return sum(os.times()[:4])  # this process and its children (ptxas): CPU seconds

    t = cpu()
    try:
        k = triton.compile(
            ASTSource(JITTED[name], signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=options,
        )
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {str(exc)[-2000:]}", seconds=round(cpu() - t, 1))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    r = {m[0]: int(m[1]) for m in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return dict(
        regs=r["REG"],
        spill_bytes=r["STACK"] + r["LOCAL"],
        smem=k.metadata.shared + r["SHARED"],
        seconds=round(cpu() - t, 1),
        error=None,
    )


def compile_all(bins, jobs):
    """Compile every binary, the slowest kinds first, on `jobs` processes; adds the results to
    each dict."""
    order = sorted(range(len(bins)), key=lambda i: cost(bins[i]), reverse=True)
    work = [bins[i]["job"] for i in order]
    if jobs <= 1:
        results = map(compile_one, work)
    # spawn: fresh interpreters (this module pops TRITON_INTERPRET before kernels.attention loads)
    else:
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(compile_one, work)
    for i, res in zip(order, results):
        bins[i].update(res, smem_limit=SMEM_LIMIT[bins[i]["arch"]])
    if jobs > 1:
        pool.shutdown()
    return bins


def record(b):
    """What tools/compile_report.json keeps of a compiled binary."""
    return {
        k: b.get(k)
        for k in (
            "key",
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
            "smem_limit",
            "seconds",
            "error",
        )
    }


def tables(records):
    """Markdown, one table per arch: rows kernel x dtype (x precision), columns head dims; a cell
    gives the registers (the range over the flag variants) and the most shared memory, in KiB."""
    lines = []
    order = [
        "_attn_fwd",
        "_attn_bwd_delta",
        "_attn_bwd_dkdv",
        "_attn_bwd_dq",
        "_reduce_prefix_grad",
    ]
    for arch in sorted({b["arch"] for b in records}, reverse=True):
        mine = [b for b in records if b["arch"] == arch and not b.get("error")]
        dims = sorted({b["D"] for b in mine if b["D"] != "-"})
        lines += [
            f"\n**sm_{arch}** (limit {SMEM_LIMIT[arch] // 1024} KiB of shared memory per block): registers per "
            "thread / shared memory per block in KiB; tiles BLOCK_M×BLOCK_N, warps, stages\n",
            "| kernel | dtype | " + " | ".join(f"D = {d}" for d in dims) + " | spills |",
            "|---|---|" + "---|" * len(dims) + "---|",
        ]
        rows = {}
        for b in mine:
            dt = b["dtype"] + (
                f" {b['precision']}" if b["dtype"] == "fp32" and b["precision"] != "-" else ""
            )
            rows.setdefault((b["kernel"], dt), []).append(b)
        # (kernel, dtypes, cells): a dtype whose row equals the previous one joins it (fp16 = bf16)
        done = []
        for (kernel, dt), g in sorted(rows.items(), key=lambda r: (order.index(r[0][0]), r[0][1])):
            cells = []
            for d in dims if g[0]["D"] != "-" else ["-"]:
                c = [b for b in g if b["D"] == d]
                regs, tiles = (
                    sorted({b["regs"] for b in c}),
                    "; ".join(sorted({tiles_str(b["tiles"]) for b in c})),
                )
                cells.append(
                    f"{regs[0]}"
                    + (f"–{regs[-1]}" if len(regs) > 1 else "")
                    + f" / {max(b['smem'] for b in c) / 1024:.0f} ({tiles})"
                    if c
                    else ""
                )
            if g[0]["D"] == "-":  # no head dim: one binary serves them all
                cells = [cells[0] + ", any D"] + [""] * (len(dims) - 1)
            spills = max(b["spill_bytes"] for b in g)
            cells.append(f"{spills} B" if spills else "none")
            if done and done[-1][0] == kernel and done[-1][2] == cells:
                done[-1][1].append(dt)
            else:
                done.append((kernel, [dt], cells))
        lines += [
            f"| `{kernel}` | {', '.join(dts)} | " + " | ".join(cells) + " |"
            for kernel, dts, cells in done
        ]
    return "\n".join(lines)


def summary(records):
    """One line per arch: binaries, max registers, spills, max shared memory, errors; and the
    compile time."""
    out = []
    for arch in sorted({b["arch"] for b in records}, reverse=True):
        mine = [b for b in records if b["arch"] == arch]
        ok = [b for b in mine if not b.get("error")]
        top = max(ok, key=lambda b: b["smem"], default=None)
        out.append(
            f"sm_{arch}: {len(mine)} binaries, {len(mine) - len(ok)} failed to compile; max registers "
            f"{max((b['regs'] for b in ok), default=0)}; {sum(b['spill_bytes'] > 0 for b in ok)} spilling; "
            f"max shared memory {top['smem'] if top else 0} bytes of {SMEM_LIMIT[arch]}"
            + (f" ({top['kernel']} {top['dtype']} D={top['D']})" if top else "")
        )
    out.append(f"compile CPU time {sum(b['seconds'] for b in records):.0f} s in all")
    return "\n".join(out)


def sample(bins, records):
    """The binaries the CPU test compiles to check the records: per kernel x arch, the one with
    the most registers and the one with the most shared memory among the records (the figures
    closest to a limit)."""
    by_key, picked = {r["key"]: r for r in records}, {}
    for b in bins:
        r = by_key.get(b["key"])
        if r and not r["error"]:
            for what in ("regs", "smem"):
                k = (b["kernel"], b["arch"], what)
                if (
                    k not in picked
                    or (r[what], r["smem" if what == "regs" else "regs"]) > picked[k][0]
                ):
                    picked[k] = ((r[what], r["smem" if what == "regs" else "regs"]), b)
    return list({id(b): b for _, b in picked.values()}.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--write",
        action="store_true",
        help=f"compile the binaries without a current record in "
        f"{os.path.basename(REPORT)} and rewrite it",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="--write: compile every binary, recorded or not"
    )
    ap.add_argument(
        "--tables",
        action="store_true",
        help=f"print the markdown tables of {os.path.basename(REPORT)}",
    )
    ap.add_argument(
        "--core",
        action="store_true",
        help="per kernel x arch x dtype x head dim x tiles, only the "
        "variant with the most of CAUSAL, HAS_MASK, PER_ROW set",
    )
    ap.add_argument(
        "--check",
        help="write to this JSON every binary's key and description, and compile the sample "
        f"of {os.path.basename(REPORT)} (tests/test_kernels_compile.py)",
    )
    ap.add_argument(
        "--all", action="store_true", help="--check: compile every binary, not the sample"
    )
    ap.add_argument(
        "--json", help="also write the records to this file (e.g. another Triton's, for comparison)"
    )
    ap.add_argument("--archs", default="90,80", help="compute capabilities, comma-separated")
    ap.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes"
    )
    a = ap.parse_args()
    if a.tables:
        with open(REPORT) as f:
            rep = json.load(f)
        print(
            f"Triton {rep['triton']}, {rep['ptxas']}; {len(rep['records'])} binaries\n"
            + tables(rep["records"])
        )
        return print("\n" + summary(rep["records"]))
    t0 = time.time()
    bins = binaries(tuple(int(x) for x in a.archs.split(",")))
    if a.check:
        records = json.load(open(REPORT))["records"] if os.path.exists(REPORT) else []
        todo = bins if a.all else sample(bins, records)
        compile_all(todo, a.jobs)
        with open(a.check, "w") as f:
            json.dump(
                dict(
                    triton=triton.__version__,
                    wall_s=time.time() - t0,
                    jobs=a.jobs,
                    derived=[
                        {
                            k: b[k]
                            for k in (
                                "key",
                                "kernel",
                                "arch",
                                "dtype",
                                "precision",
                                "D",
                                "flags",
                                "tiles",
                                "kind",
                            )
                        }
                        for b in bins
                    ],
                    compiled=[record(b) for b in todo],
                ),
                f,
            )
        return print(
            f"{len(bins)} binaries derived, {len(todo)} compiled in {time.time() - t0:.0f} s: {a.check}"
        )
    todo = [b for b in bins if b["core"]] if a.core else bins
    kept = {}  # --write: records whose key still matches need no compiling
    if a.write and not a.fresh and os.path.exists(REPORT):
        with open(REPORT) as f:
            kept = {r["key"]: r for r in json.load(f)["records"] if not r["error"]}
    fresh = [b for b in todo if b["key"] not in kept]
    print(
        f"# tools/compile_report.py: Triton {triton.__version__}, torch {torch.__version__}; {len(todo)} binaries"
        f"{' (--core)' if a.core else ''} of {len(bins)}, {len(fresh)} to compile on {a.jobs} processes",
        flush=True,
    )
    compile_all(fresh, a.jobs)
    records = [kept.get(b["key"]) or record(b) for b in todo]
    print(tables(records) + "\n\n" + summary(records) + f"; wall {time.time() - t0:.0f} s")
    for b in records:
        if b["error"]:
            print(
                f"FAILED {b['kernel']} sm_{b['arch']} {b['dtype']} D={b['D']} {b['flags']}: {b['error'][:500]}"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, records=records), f)
    if a.write:
        ptxas = ", ".join(
            f"sm_{arch}: ptxas "
            + re.search(r"release ([\d.]+)", make_backend(GPUTarget("cuda", arch, 32)).hash())[1]
            for arch in sorted({b["arch"] for b in todo}, reverse=True)
        )
        with open(REPORT, "w") as f:  # one record per line: diffs stay readable
            f.write(
                json.dumps(dict(triton=triton.__version__, ptxas=ptxas, core=a.core))[:-1]
                + ', "records": [\n'
                + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
                + "\n]}\n"
            )
        print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
