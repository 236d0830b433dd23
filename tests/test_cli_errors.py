"""Bad counts and sizes at the command-line entry points: one line of argparse naming the option
and its rule, exit status 2, no traceback (evaluate.py, flops.py, data.tokenizer; train.py's
settings: tests/test_train_runs.py). Run: `make test`."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "argv, option",
    [
        (["evaluate.py", "runs/none", "--beams", "0"], "--beams"),
        (["evaluate.py", "runs/none", "--limit", "-1"], "--limit"),
        (["evaluate.py", "runs/none", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (
            [
                "evaluate.py",
                "generate",
                "--run",
                "runs/none",
                "--java",
                "F.java",
                "--method",
                "m",
                "--k",
                "0",
            ],
            "--k",
        ),
        (["flops.py", "--batch", "0"], "--batch"),
        (["flops.py", "--src", "-5"], "--src"),
        (["flops.py", "--steps", "-1"], "--steps"),
        (["-m", "data.tokenizer", "--vocab-size", "-1"], "--vocab-size"),
    ],
)
def test_bad_counts_are_one_line(argv, option):
    p = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"error: argument {option}: must be an integer >= 1" in p.stderr.strip().splitlines()[-1]
