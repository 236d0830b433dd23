"""The bad-input table of docs/testing.md, regenerated: every entry point is run on a set of bad
inputs (no training is needed for any of them), and the exit status and last line each prints are
written as a markdown table. A traceback, or an exit status 0 where an error was due, is marked.

    python tools/bad_inputs.py            # print the table
    python tools/bad_inputs.py --write    # replace the table in docs/testing.md

The cases that need a trained run (a locked run folder, a corpus rewritten since training, a
replaced base, a cut checkpoint) are tested in tests/test_train_runs.py and tests/test_evaluate.py;
the table lists those tests below the measured rows.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTING_MD = ROOT / "docs" / "testing.md"
BEGIN = "<!-- bad-input table: tools/bad_inputs.py --write -->"
END = "<!-- end of the bad-input table -->"


def make_files(d):
    """The bad files the cases point at, in folder `d`."""
    (d / "notjson.jsonl").write_text("this is not json\n")
    (d / "latin.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    (d / "empty.jsonl").write_text("")
    (d / "A.java").write_text("class A { int f() { return 1; } }\n")
    (d / "other.json").write_text('{"a" 1}')
    (d / "ro").mkdir()
    (d / "nojava").mkdir()
    (d / "notests").mkdir()
    (d / "notests" / "B.java").write_text("class B { }\n")
    bad_record = {"id": "x", "project": "p", "src": "class A {}", "tgt": 5}
    (d / "badrecord.jsonl").write_text(json.dumps(bad_record) + "\n")
    (d / "requests.jsonl").write_text(json.dumps({"id": 1, "run": "a", "src": "x"}) + "\n")


def cases(d):
    """(entry point: bad input, argv) for every case; paths are under `d`."""
    runs = str(d / "norun")
    return [
        ("train.py: unknown setting", ["train.py", "--nope=1"]),
        ("train.py: wrong type", ["train.py", "--batch_size=x"]),
        ("train.py: a setting out of its range", ["train.py", "--grad_clip=-1"]),
        ("train.py: no such device", ["train.py", "--device=nope"]),
        ("train.py: missing project", ["train.py", f"--project={d}/nothere.jsonl"]),
        ("train.py: records not JSON lines", ["train.py", f"--project={d}/notjson.jsonl"]),
        ("train.py: records not UTF-8", ["train.py", f"--project={d}/latin.jsonl"]),
        ("train.py: empty records file", ["train.py", f"--project={d}/empty.jsonl"]),
        (
            "train.py: a record whose tgt is not text",
            ["train.py", f"--project={d}/badrecord.jsonl"],
        ),
        ("train.py: missing base", ["train.py", f"--base={d}/nobase"]),
        ("train.py: tokenizer of another format", ["train.py", f"--tokenizer={d}/other.json"]),
        (
            "train.py --mode=base: --save_base under a file",
            ["train.py", "--mode=base", f"--save_base={d}/A.java/base"],
        ),
        ("evaluate.py: missing run folder", ["evaluate.py", runs]),
        ("evaluate.py: a folder that is not a run", ["evaluate.py", str(d)]),
        ("evaluate.py: a count below 1", ["evaluate.py", runs, "--beams", "0"]),
        ("evaluate.py --report: no scored run", ["evaluate.py", "--report", str(d / "ro")]),
        (
            "evaluate.py generate: missing run folder",
            ["evaluate.py", "generate", "--run", runs, "--java", f"{d}/no.java", "--method", "f"],
        ),
        (
            "evaluate.py generate --runs: no run named",
            ["evaluate.py", "generate", "--runs", ",", "--requests", f"{d}/requests.jsonl"]
            + ["--out", f"{d}/out.jsonl"],
        ),
        (
            "evaluate.py generate --runs: missing requests file",
            ["evaluate.py", "generate", "--runs", runs, "--requests", f"{d}/no.jsonl"]
            + ["--out", f"{d}/out.jsonl"],
        ),
        (
            "evaluate.py generate --runs: --out a folder",
            ["evaluate.py", "generate", "--runs", runs, "--requests", f"{d}/requests.jsonl"]
            + ["--out", str(d)],
        ),
        ("data.fetch: unknown project", ["-m", "data.fetch", "no-such-project"]),
        ("data.fetch: missing path", ["-m", "data.fetch", f"{d}/nodir/"]),
        ("data.mine: missing folder", ["-m", "data.mine", f"{d}/nodir", "--out", f"{d}/o.jsonl"]),
        (
            "data.mine: a folder with no Java",
            ["-m", "data.mine", f"{d}/nojava", "--out", f"{d}/o.jsonl"],
        ),
        (
            "data.mine: Java but no tests",
            ["-m", "data.mine", f"{d}/notests", "--out", f"{d}/o.jsonl"],
        ),
        ("data.mine: --out a folder", ["-m", "data.mine", f"{d}/notests", "--out", str(d)]),
        ("data.tokenizer: unknown project", ["-m", "data.tokenizer", "--projects", "no-such"]),
        ("data.tokenizer: --out under a file", ["-m", "data.tokenizer", "--out", f"{d}/A.java/t"]),
        ("data.tokenizer: a size below 1", ["-m", "data.tokenizer", "--vocab-size", "-1"]),
        ("flops.py: unknown model", ["flops.py", "--model", "nope"]),
        ("flops.py: a count below 1", ["flops.py", "--batch", "0"]),
        ("execute.py: missing run folder", ["execute.py", runs]),
    ]


def run_case(argv, d):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # run from the repository, as a user runs them (the shipped base is the default base)
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    last = lines[-1] if lines else ""
    traceback = "Traceback (most recent call last)" in result.stderr
    return result.returncode, last, traceback


def table(d):
    rows = ["| entry point: bad input | exit | what it prints (last line) |", "|---|---|---|"]
    bad = 0
    for label, argv in cases(d):
        argv = [str(ROOT / argv[0])] + argv[1:] if argv[0].endswith(".py") else argv
        code, last, traceback = run_case(argv, d)
        last = last.replace(str(d), "<dir>").replace(str(ROOT) + "/", "").replace("|", "\\|")
        if len(last) > 200:
            last = last[:197] + "..."
        mark = ""
        if traceback or code == 0:
            mark = " **(traceback)**" if traceback else " **(exit 0)**"
            bad += 1
        rows.append(f"| {label} | {code} | `` {last} ``{mark} |")
        print(rows[-1], file=sys.stderr)
    return "\n".join(rows), bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {TESTING_MD}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        d = Path(folder)
        make_files(d)
        text, bad = table(d)
    print(text)
    print(f"{bad} cases with a traceback or exit status 0", file=sys.stderr)
    if args.write:
        doc = TESTING_MD.read_text()
        if BEGIN not in doc or END not in doc:
            sys.exit(f"{TESTING_MD}: no {BEGIN} ... {END} markers; add them around the table")
        head = doc.split(BEGIN)[0]
        tail = doc.split(END)[1]
        TESTING_MD.write_text(head + BEGIN + "\n" + text + "\n" + END + tail)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
