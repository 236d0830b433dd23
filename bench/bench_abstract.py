"""Benchmark of abstract_java.abstract (the src2abs abstraction behind the §3.3 abstracted-match
metric) on real methods: every method declaration of the .java files under a folder (sorted paths,
first N methods, annotations included, javadoc not), abstracted one by one on one core. Goal: 10,000
methods in <= 10 s.

python bench/bench_abstract.py DIR [--n 10000]"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import abstract_java as aj


def methods_under(root, n):
    out = []
    for d, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".java")):
            with open(os.path.join(d, name), "rb") as f:
                src = f.read()
            stack = [aj._PARSER.parse(src).root_node]
            while stack and len(out) < n:  # pre-order walk, methods in file order
                node = stack.pop()
                if node.type == "method_declaration":
                    out.append(node.text.decode("utf-8", "replace"))
                stack.extend(reversed(node.children))
            if len(out) >= n:
                return out
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "root",
        nargs="?",
        default="data/cache/src",
        help="folder of Java sources (default: the fetched projects)",
    )
    ap.add_argument("--n", type=int, default=10000)
    args = ap.parse_args()
    methods = methods_under(args.root, args.n)
    chars = sum(map(len, methods))
    print(f"{len(methods)} methods, {chars / len(methods):.0f} chars on average, from {args.root}")
    print(f"{'mode':8} {'methods':>8} {'seconds':>8} {'methods/s':>10} {'parse failures':>15}")
    for compat in (False, True):
        # not timed
        failed = sum(not aj._collect(aj.preprocess(m, compat)[0], set(), set()) for m in methods)
        t0 = time.process_time()  # CPU time of this one process: one core
        for m in methods:
            aj.abstract(m, compat=compat)
        dt = time.process_time() - t0
        print(
            f"{'compat' if compat else 'clean':8} {len(methods):8d} {dt:8.2f} {len(methods) / dt:10.0f} "
            f"{failed / len(methods):14.1%}"
        )


if __name__ == "__main__":
    main()
