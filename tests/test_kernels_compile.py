"""The sm_90 (H100, H200) and sm_80 (A100) binaries of kernels/attention.py, without a GPU: every
binary attention() can launch (the model's among them) compiles, none spills, and none needs more
shared memory than its architecture has (sm_90 227 KiB, sm_80 163 KiB per block).
tools/compile_report.py derives the binaries from the launchers themselves (the autograd.Function
with pick_config's tiles, for every dtype -- fp32 with "ieee" and "tf32" dots, fp16, bf16 --, head
dim, causal or not, mask or not, prefix kind) and measures them (triton.compile for an explicit
GPUTarget, the ptxas and cuobjdump of the Triton wheel).

What this test compiles, and why not everything: the 804 binaries (402 per arch) took about 50 CPU-minutes to compile
here (54 min on 2 busy cores; the fp32 kernels are large), far beyond this suite's budget. So their figures are
compiled once into tools/compile_report.json (`python -m tools.compile_report --write`, which compiles only
the binaries without a current record), and this test
  - derives every binary from the launchers again and requires a record for each, under the same key (the source
    of every @triton.jit function, signature, constexprs, specialisation attributes, options, the versions of
    Triton and ptxas): none goes unchecked, and an edit of a kernel, a tile, a launch or the Triton pin fails here
    until the file is rewritten;
  - requires every record to have compiled without spills and within the shared-memory limit;
  - compiles a sample again -- per kernel and arch, the binary with the most registers and the one with the most
    shared memory: 16 binaries, ~1 CPU-minute -- and requires exactly the recorded registers, spills and shared
    memory, so the file holds what this Triton builds here.
COMPILE_ALL=1 compiles all 804 instead of the sample. Compiling runs in a subprocess: tests/conftest.py sets
TRITON_INTERPRET=1, under which @triton.jit builds interpreter functions, not compilable ones.

PYTHONPATH=. python -m pytest tests/test_kernels_compile.py -q     (57 s on 2 busy cores, cold
Triton cache)"""

import json
import os
import subprocess
import sys

import pytest
import torch

import kernels.attention as A

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "tools", "compile_report.json")
REFRESH = "python -m tools.compile_report --write (after a kernel edit ~55 min on 2 cores; a tile change: minutes)"
# bytes per block, opt-in (CUDA programming guide, compute capabilities)
SMEM_LIMIT = {90: 232448, 80: 166912}


def describe(b):
    return f"{b['kernel']} sm_{b['arch']} {b['dtype']} {b['precision']} D={b['D']} {b['flags']} {b['tiles']}"


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """Every binary derived from the launchers (key + description) and the sample compiled again."""
    out = tmp_path_factory.mktemp("compile") / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tools.compile_report", "--check", str(out), "--jobs", "2"]
    r = subprocess.run(
        cmd + (["--all"] if os.environ.get("COMPILE_ALL") == "1" else []),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def records():
    assert os.path.exists(REPORT), f"no {REPORT}: run {REFRESH}"
    with open(REPORT) as f:
        return json.load(f)["records"]


def test_a_current_record_for_every_binary(check, records):
    derived, have = {b["key"]: b for b in check["derived"]}, {r["key"] for r in records}
    missing = [describe(b) for k, b in derived.items() if k not in have]
    stale = [describe(r) for r in records if r["key"] not in derived]
    assert not missing and not stale, (
        f"{len(missing)} binaries without a record and {len(stale)} stale records "
        f"(e.g. {(missing + stale)[:3]}): run {REFRESH}"
    )


def test_every_kernel_dtype_head_dim_and_tile_config(check, monkeypatch):
    """The derivation spans the five kernels, every dtype x precision x head dim for both archs,
    each variant of causal / mask / per-row prefix of the three attention kernels, and exactly
    pick_config's GPU tiles."""
    # pick_config's GPU branch (it reads the variable when called)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    derived = check["derived"]
    assert {b["kernel"] for b in derived} == {
        "_attn_fwd",
        "_attn_bwd_delta",
        "_attn_bwd_dkdv",
        "_attn_bwd_dq",
        "_reduce_prefix_grad",
    }
    phases = {"_attn_fwd": "fwd", "_attn_bwd_dkdv": "dkdv", "_attn_bwd_dq": "dq"}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for kernel, phase in phases.items():
        for arch in (90, 80):
            for dt, precision in (
                ("fp32", "ieee"),
                ("fp32", "tf32"),
                ("fp16", "tf32"),
                ("bf16", "tf32"),
            ):
                for D in A.HEAD_DIMS:
                    mine = [
                        b
                        for b in derived
                        if (b["kernel"], b["arch"], b["dtype"], b["precision"], b["D"])
                        == (kernel, arch, dt, precision, D)
                    ]
                    assert len(mine) == 8, (
                        f"{kernel} sm_{arch} {dt} {precision} D={D}: {len(mine)} variants, not 8"
                    )
                    want = A.pick_config(D, dtypes[dt], precision)[phase]
                    for b in mine:
                        t = b["tiles"]
                        assert (
                            t["BLOCK_M"],
                            t["BLOCK_N"],
                            t["num_warps"],
                            t["num_stages"],
                        ) == want, describe(b)
    # the delta kernel per dtype x head dim; the reduction per prefix dtype x bank or not
    for arch in (90, 80):
        assert (
            len([b for b in derived if b["kernel"] == "_attn_bwd_delta" and b["arch"] == arch])
            == 12
        )
        assert (
            len([b for b in derived if b["kernel"] == "_reduce_prefix_grad" and b["arch"] == arch])
            == 6
        )


def test_no_spills_and_shared_memory_within_limits(records):
    failed = [describe(r) + f": {r['error'][:300]}" for r in records if r["error"]]
    assert not failed, f"{len(failed)} binaries do not compile: {failed[:3]}"
    spills = [
        describe(r) + f": {r['regs']} registers, {r['spill_bytes']} bytes spilled"
        for r in records
        if r["spill_bytes"]
    ]
    assert not spills, f"{len(spills)} binaries spill: {spills[:5]}"
    over = [
        describe(r) + f": {r['smem']} bytes" for r in records if r["smem"] > SMEM_LIMIT[r["arch"]]
    ]
    assert not over, f"{len(over)} binaries need more shared memory than their arch has: {over[:5]}"


def test_sample_compiles_as_recorded(check, records):
    by_key = {r["key"]: r for r in records}
    compiled = check["compiled"]
    assert {(c["kernel"], c["arch"]) for c in compiled} >= {
        (k, a) for k in {b["kernel"] for b in check["derived"]} for a in (90, 80)
    }, "a kernel x arch is not sampled"
    for c in compiled:
        assert not c["error"], f"{describe(c)}: {c['error'][:1000]}"
        r = by_key[c["key"]]
        assert (c["regs"], c["spill_bytes"], c["smem"]) == (
            r["regs"],
            r["spill_bytes"],
            r["smem"],
        ), (
            f"{describe(c)}: compiled here {c['regs']} registers / {c['spill_bytes']} B spilled / {c['smem']} B "
            f"shared, recorded {r['regs']} / {r['spill_bytes']} / {r['smem']}: run {REFRESH}"
        )
