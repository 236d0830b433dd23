"""Benchmark of the execution harness (issue 30, execute.py): the wall-clock seconds of each
phase for one run folder, with no cached outcome (every reference and candidate is compiled and
run again; the helpers and the project's compiled main classes, built once, are kept).

Phases: prepare (the test classes read, each candidate put in place, keys), compile (one javac
JVM, --jobs compiler threads), run (the compiled ones in sandboxed JVMs, --jobs at a time),
diagnose (the original test of each pair whose reference fails), total; and the CPU seconds of
this process and every process it waited for (javac, the sandboxed JVMs), which a machine shared
with other jobs stretches less than the wall clock. The goal of issue 30: the 111 pairs x 5
candidates of commons-io fold 0 within 3 minutes on 2 cores.

    python bench/bench_execute.py runs/commons-io-lldb-f0 [--k 5] [--timeout 10] [--jobs 2]
"""

import argparse
import os
import platform
import resource
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data
import execute


def cpu_model():
    """lscpu's model name, else the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_seconds():
    """User + system seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder with predictions.jsonl")
    ap.add_argument("--k", type=data.positive_int, default=execute.K)
    ap.add_argument("--timeout", type=data.positive_int, default=10)
    ap.add_argument("--jobs", type=data.positive_int, default=2)
    a = ap.parse_args()
    timing = {}
    cpu = cpu_seconds()
    result = execute.execute_run(a.run, a.k, a.timeout, a.jobs, False, timing)
    cpu = cpu_seconds() - cpu
    if result["harness_valid"] is None:
        print(f"{a.run}: {result['status']}")
        return
    models = list(result["models"])
    candidates = result["pairs"] * len(models) * a.k
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {execute._java_version()}")
    head = "| run | pairs | models | candidates | unique jobs | compiled | prepare s | compile s "
    head += "| run s | diagnose s | total s | CPU s |"
    print(head + "\n" + "|---" * 12 + "|")
    phases = ("prepare_s", "compile_s", "run_s", "diagnose_s", "total_s")
    cells = [os.path.basename(os.path.normpath(a.run)), result["pairs"], len(models), candidates]
    cells += [timing.get("unique", 0), timing.get("compiled", 0)]
    cells += [f"{timing.get(p, 0.0):.1f}" for p in phases] + [f"{cpu:.1f}"]
    print("| " + " | ".join(str(c) for c in cells) + " |")
    print(
        f"\nharness_valid {result['harness_valid']:.3f}; "
        + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["models"][m].items())
            for m in models
        )
    )


if __name__ == "__main__":
    data.cli(main)
