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


@pytest.mark.parametrize("module", ["data.mine", "data.tokenizer"])
def test_out_that_is_a_folder_or_under_a_file_is_refused_before_any_work(module, tmp_path):
    """`--out` naming a folder, or a path under a file: argparse's one line, exit 2, and nothing
    written (no temporary file left in the folder)."""
    (tmp_path / "afile").write_text("x")
    tree = tmp_path / "tree"
    tree.mkdir()
    for out, message in (
        (tmp_path, "is a folder; give the path of a file in it"),
        (tmp_path / "afile" / "out.json", "is a file, not a folder"),
    ):
        argv = ["-m", module, "--out", str(out)]
        if module == "data.mine":
            argv.insert(2, str(tree))
        p = subprocess.run(
            [sys.executable, *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "error: argument --out:" in last and message in last, last
        assert sorted(x.name for x in tmp_path.iterdir()) == ["afile", "tree"]
