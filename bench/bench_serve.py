"""Serving many projects from one process (serve.py; the paper's deployment case, §1 and §5):
throughput and memory of one stream of requests for N = 1, 4, 16 projects, (a) mixed in the batches
of one serve.Server (one base, N deltas), against (b) the N customized models one after another,
each loaded (base + strategy + delta) and then dropped. Per strategy: prefix, lora, lldb, leo; the
stored delta per project beside it.

    PYTHONPATH=. .venv/bin/python bench/bench_serve.py [--preset tiny] [--requests 48] [--new-tokens 32] [--threads 2]
    python bench/bench_serve.py --device cuda --preset bart-base --requests 256 --batch 64   # a GPU (Triton kernel)

The models are the `tiny` preset with random deltas (generation costs the same whatever the
weights); EOS is barred (final_logits_bias), so that every test runs to --new-tokens and both
ways generate the same number of tokens. Every measurement runs in a child process of its own (a
fresh allocator): "tests/s" counts requests over the wall time including loading the checkpoints
from disk; "peak MiB" is the child's peak RSS (ru_maxrss, with torch's own ~200 MiB; on a GPU:
torch.cuda.max_memory_allocated); "model MiB" the bytes of every distinct tensor the child holds
for the weights, against base + N deltas. Goals: mixed N = 16 at >= 0.8x the throughput of N = 1,
and model memory within base + N deltas + 10%."""

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
import evaluate  # noqa: E402
import runs  # noqa: E402
import serve  # noqa: E402
import strategies  # noqa: E402
from data.tokenizer import EOS  # noqa: E402
from model import BART, config_from_preset  # noqa: E402

OPTS = {"prefix": dict(prefix_len=200), "lora": dict(r=8), "lldb": {}, "leo": {}}


def make_runs(d, preset, kind, n):
    """A base saved in HF layout and n random deltas of one strategy as best.safetensors files."""
    torch.manual_seed(0)
    base = BART(config_from_preset(preset))
    # no test ends early: every request costs the same
    base.final_logits_bias[0, EOS] = float("-inf")
    base.save_pretrained(os.path.join(d, "base"))
    for i in range(n):
        m = strategies.apply(BART.from_pretrained(os.path.join(d, "base")), kind, **OPTS[kind])
        with torch.no_grad():
            for p in strategies.trainable_parameters(m):
                p.add_(torch.randn_like(p) * 0.01)
        runs.save_trainable(m, os.path.join(d, f"run{i}.safetensors"))


def requests(n_req, n_runs, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    # focal contexts cut at 128 tokens
    lengths = torch.randint(32, 129, (n_req,), generator=g).tolist()
    src = [torch.randint(4, vocab, (L,), generator=g).tolist() for L in lengths]
    return [f"run{i % n_runs}" for i in range(n_req)], src


def tensor_bytes(modules, extra=()):
    seen, total = set(), 0
    for t in [t for m in modules for t in (*m.parameters(), *m.buffers())] + list(extra):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def load_delta(path, device="cpu"):
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=device) as f:
        return json.loads(f.metadata()["strategy"]), {k: f.get_tensor(k) for k in f.keys()}


def child(a):
    """One measurement, alone in this process; JSON on stdout."""
    torch.set_num_threads(a.threads)
    impl = "triton" if a.device.startswith("cuda") else "sdpa"
    names, src = requests(a.requests, a.n, config_from_preset(a.preset).vocab_size)
    kw = dict(k=5, beams=5, max_new_tokens=a.new_tokens, batch_size=a.batch)
    t0 = time.perf_counter()
    if a.mode == "mixed":
        deltas = {
            f"run{i}": load_delta(os.path.join(a.dir, f"run{i}.safetensors"), a.device)
            for i in range(a.n)
        }
        server = serve.Server(
            BART.from_pretrained(os.path.join(a.dir, "base"), impl).to(a.device), deltas
        )
        del deltas
        out = server.serve(names, src, **kw, device=a.device)
        held = tensor_bytes([server.base, *server.solo.values()], server.prefix_bank.values())
    else:  # one after another: each customized model loaded, used for its requests, dropped
        out = [None] * len(src)
        for i in range(a.n):
            model = BART.from_pretrained(os.path.join(a.dir, "base"), impl).to(a.device)
            strategy, delta = load_delta(os.path.join(a.dir, f"run{i}.safetensors"), a.device)
            runs.load_trainable(strategies.apply(model, a.kind, **strategy["options"]), delta)
            mine = [j for j, n in enumerate(names) if n == f"run{i}"]
            got = evaluate.beam_search(
                model.eval(),
                [src[j] for j in mine],
                kw["k"],
                kw["beams"],
                kw["max_new_tokens"],
                # batched by source length, as Server.serve batches
                kw["batch_size"],
                a.device,
            )
            for j, r in zip(mine, got):
                out[j] = r
    t2 = time.perf_counter()
    assert all(len(o[0]) == 5 for o in out)
    print(
        json.dumps(
            dict(
                seconds=t2 - t0,
                model_bytes=held if a.mode == "mixed" else None,
                peak_mib=torch.cuda.max_memory_allocated() / 2**20
                if a.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            )
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default="prefix,lora,lldb,leo")
    ap.add_argument("--ns", default="1,4,16")
    ap.add_argument("--child", action="store_true")
    (
        ap.add_argument("--mode"),
        ap.add_argument("--kind"),
        ap.add_argument("--n", type=int),
        ap.add_argument("--dir"),
    )
    a = ap.parse_args()
    if a.child:
        return child(a)
    ns = [int(x) for x in a.ns.split(",")]
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{a.threads} threads"
    print(
        f"machine: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), {where}, "
        f"torch {torch.__version__}; preset {a.preset}, {a.requests} requests (sources 32-128 tokens), beam 5, "
        f"5 returned, {a.new_tokens} new tokens each, batches of {a.batch}"
    )
    print(
        "| strategy | delta / project | N | mixed tests/s | one by one tests/s | mixed / N=1 mixed | "
        "mixed / one by one | model MiB (base + N deltas) | peak MiB mixed | peak MiB one by one |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in a.kinds.split(","):
        with tempfile.TemporaryDirectory() as d:
            with contextlib.redirect_stdout(io.StringIO()):
                make_runs(d, a.preset, kind, max(ns))
            base_b = tensor_bytes([BART.from_pretrained(os.path.join(d, "base"))])
            delta_b = os.path.getsize(os.path.join(d, "run0.safetensors"))
            first = None
            for n in ns:
                r = {}
                for mode in ("mixed", "one"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        f"--mode={mode}",
                        f"--kind={kind}",
                        f"--n={n}",
                        f"--dir={d}",
                        f"--preset={a.preset}",
                        f"--requests={a.requests}",
                        f"--new-tokens={a.new_tokens}",
                        f"--batch={a.batch}",
                        f"--threads={a.threads}",
                        f"--device={a.device}",
                    ]
                    res = subprocess.run(
                        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."}
                    )
                    if res.returncode:
                        raise SystemExit(res.stderr[-3000:])
                    r[mode] = json.loads(res.stdout.strip().splitlines()[-1])
                tps = {m: a.requests / r[m]["seconds"] for m in r}
                first = first or tps["mixed"]
                want = base_b + n * delta_b
                print(
                    f"| {kind} | {delta_b / 2**20:.2f} MiB | {n} | {tps['mixed']:.2f} | {tps['one']:.2f} | "
                    f"{tps['mixed'] / first:.2f}x | {tps['mixed'] / tps['one']:.2f}x | "
                    f"{r['mixed']['model_bytes'] / 2**20:.1f} ({want / 2**20:.1f}: "
                    f"{r['mixed']['model_bytes'] / want:.2f}x) | {r['mixed']['peak_mib']:.0f} | "
                    f"{r['one']['peak_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
