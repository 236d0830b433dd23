"""Behaviour-unchanged check for refactors: run a fixed set of short jobs through the command line
and write a digest of everything they leave on disk and print, so that two checkouts (before and
after a refactor) can be compared file by file.

The jobs, all on a synthetic corpus and the tiny preset (about two minutes on 2 cores):
  - a short base run: denoising, mixing of the two streams, the encoder delay, the saved base folder;
  - one customization of each strategy (custom, leo, lldb, prefix, lora) from that base;
  - a resume: an lldb run killed once it has written a checkpoint, then rerun to its end;
  - early stopping: a run with patience 1;
  - scoring one run (evaluate.py RUN) and serving a mixed request file over three runs.
The jobs run in /tmp/compare-outputs-work (the same paths for both checkouts), then move to --out.

Digests: the sha256 of each file's bytes, except where a file holds wall-clock figures: log.jsonl,
metrics.json and training.json are compared with their timing fields dropped, last.pt by its
tensors and values (timings dropped), and printed output with durations and rates masked.

    python tools/compare_outputs.py --out /tmp/after                 # this checkout
    python tools/compare_outputs.py --out /tmp/before --repo OLD     # another checkout (a worktree)
    python tools/compare_outputs.py --compare /tmp/before /tmp/after # lists every difference
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STRATEGIES = ["custom", "leo", "lldb", "prefix", "lora"]

# keys that hold wall-clock figures (seconds, rates, dates, machine): not part of behaviour
TIMING_KEYS = {
    "time",
    "elapsed",
    "elapsed_s",
    "seconds",
    "minutes",
    "wall_s",
    "ms_per_step",
    "tokens_per_s",
    "mfu",
    "peak_flops",
    "peak_gflops",
    "machine",
    "date",
    "created",
    "eval_seconds",
    "train_seconds",
    "dt",
    # checksums of files that hold timings (the base folder's training.json)
    "base_checksum",
}

# printed durations, rates and MFU; the numbers before these units vary from run to run
PRINT_MASKS = [
    (re.compile(r"[\d.,]+\s*(ms|s|min|h|GFLOP/s|TFLOP/s|tok/s|tokens/s|it/s)\b"), "<t>"),
    (re.compile(r"(mfu|MFU)[^,;)\n]*"), "<mfu>"),
    (re.compile(r"(peak|pid)\s*[\d.,]+"), r"\1 <n>"),
    (re.compile(r"[\d.,]+ per second"), "<rate>"),
    # where the killed run resumes depends on when the kill lands; its outputs do not
    (re.compile(r"resumed (\S+) at step \d+ \(best val loss [\d.]+\)"), r"resumed \1 at step <n>"),
    (re.compile(r'"base_checksum": "[0-9a-f]+"'), '"base_checksum": <sha>'),
]

# every job runs in this folder, so that paths are the same in both checkouts' outputs
WORK = Path("/tmp/compare-outputs-work")


def records(n_classes=12, per_class=3):
    """Synthetic focal-method/test pairs (the same as tests/train_fixtures.py)."""
    levels = ["fm", "fm_fc", "fm_fc_co", "fm_fc_ms", "fm_fc_ms_ff"]
    out = []
    for c in range(n_classes):
        for m in range(per_class):
            name = f"get{chr(65 + c)}{m}"
            src = f"Box{c} {{ public int {name}(int x) {{ return x + {c * m}; }} }}"
            test = f"@Test public void test{name}() {{ assertEquals({c * m + 1}, new Box{c}().{name}(1)); }}"
            record = {
                "id": f"demo_{c}_{m}",
                "project": "demo",
                "test_class": {"file": f"T{c}.java", "identifier": f"T{c}Test"},
                "focal_class": {"file": f"Box{c}.java", "identifier": f"Box{c}"},
                "src": src,
                "tgt": test,
            }
            for level in levels:
                record[f"src_{level}"] = src
            out.append(record)
    return out


def run(repo, argv, log):
    """Run `python argv...` in `repo`; append its output to `log`; return the output."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, *argv], cwd=repo, env=env, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    log.append("$ " + " ".join(argv) + f"\n[exit {result.returncode}]\n" + output)
    return output


def short_settings(work, **over):
    settings = dict(
        project=work / "demo.jsonl",
        tokenizer=work / "tokenizer.json",
        out_dir=work / "runs",
        batch_size=4,
        eval_interval=3,
        max_steps=12,
        warmup_steps=2,
        patience=50,
        prefix_len=4,
        max_src_len=48,
        max_tgt_len=32,
        dtype="fp32",
    )
    settings.update(over)
    return [f"--{k}={v}" for k, v in settings.items()]


def kill_after_checkpoint(repo, argv, run_dir, log):
    """Start a run, kill -9 it once it has logged three evaluations, then rerun it."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        # past its second evaluation: a checkpoint after some steps, so the rerun resumes mid-run
        log_file = run_dir / "log.jsonl"
        if log_file.exists() and len(log_file.read_text().splitlines()) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    log.append(f"killed: {proc.returncode == -signal.SIGKILL}")
    return run(repo, argv, log)


def make_jobs(repo):
    work = WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recs = records()
    (work / "demo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # the tokenizer through the repository's own function (its bytes are digested too)
    code = (
        "import sys; from data.tokenizer import train_tokenizer; import json\n"
        "recs = [json.loads(l) for l in open(sys.argv[1])]\n"
        "tok = train_tokenizer((r[k] for r in recs for k in ('src', 'tgt')), vocab_size=300,"
        " min_frequency=1)\n"
        "tok.save(sys.argv[2])\n"
    )
    log = []
    run(repo, ["-c", code, str(work / "demo.jsonl"), str(work / "tokenizer.json")], log)

    base_dir = work / "base"
    base_argv = short_settings(
        work,
        mode="base",
        name="base",
        base_projects=work / "demo.jsonl",
        save_base=base_dir,
        preset="tiny",
        denoise_text="pairs",
        denoise_steps=4,
        denoise_every=3,
        encoder_delay=3,
        max_steps=10,
    )
    run(repo, ["train.py", *base_argv], log)

    for strategy in STRATEGIES:
        argv = short_settings(work, base=base_dir, strategy=strategy, name=f"demo-{strategy}")
        run(repo, ["train.py", *argv], log)

    resume_argv = short_settings(work, base=base_dir, strategy="lldb", name="resumed")
    kill_after_checkpoint(repo, ["train.py", *resume_argv], work / "runs" / "resumed", log)

    early_argv = short_settings(
        work, base=base_dir, strategy="lldb", name="early", patience=1, eval_interval=2, lr=3e-2
    )
    run(repo, ["train.py", *early_argv], log)

    run(repo, ["evaluate.py", str(work / "runs" / "demo-lldb")], log)

    requests = []
    for i, rec in enumerate(recs[:6]):
        which = ["demo-lldb", "demo-lora", "demo-prefix"][i % 3]
        requests.append({"id": f"r{i}", "run": which, "src": rec["src_fm_fc"]})
    requests.append({"id": "unknown", "run": "nope", "src": recs[0]["src"]})
    (work / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    run_list = ",".join(str(work / "runs" / n) for n in ("demo-lldb", "demo-lora", "demo-prefix"))
    serve_argv = [
        "evaluate.py",
        "generate",
        "--runs",
        run_list,
        "--requests",
        str(work / "requests.jsonl"),
        "--out",
        str(work / "served.jsonl"),
        "--k",
        "2",
        "--beams",
        "3",
    ]
    run(repo, serve_argv, log)
    return work, log


def drop_timings(value):
    if isinstance(value, dict):
        return {k: drop_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [drop_timings(v) for v in value]
    return value


def digest_json_lines(path):
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(drop_timings(json.loads(line)))
        except json.JSONDecodeError:
            lines.append(line)
    return sha(json.dumps(lines, sort_keys=True))


def digest_checkpoint(path):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    parts = []

    def visit(prefix, value):
        if isinstance(value, torch.Tensor):
            parts.append(prefix + ":" + hashlib.sha256(value.numpy().tobytes()).hexdigest())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if key not in TIMING_KEYS:
                    visit(f"{prefix}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{prefix}[{i}]", item)
        else:
            parts.append(f"{prefix}={value!r}")

    visit("", state)
    return sha("\n".join(parts))


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def mask_printed(text, work):
    text = text.replace(str(work), "<work>")
    for pattern, replacement in PRINT_MASKS:
        text = pattern.sub(replacement, text)
    return text


def digest(work, printed):
    found = {}
    for path in sorted(work.rglob("*")):
        if not path.is_file() or path.suffix == ".lock" or path.name == ".lock":
            continue
        name = str(path.relative_to(work))
        if path.parent.name == ".cache":
            # cache files are named by a checksum of the base folder (timings included)
            name = f"{path.parent.relative_to(work)}/{path.name.split('-')[0]}-*{path.suffix}"
        if path.suffix == ".jsonl":
            found[name] = digest_json_lines(path)
        elif path.suffix == ".json":
            found[name] = sha(
                json.dumps(drop_timings(json.loads(path.read_text())), sort_keys=True)
            )
        elif path.suffix == ".pt":
            found[name] = digest_checkpoint(path)
        elif path.name == "SHA256SUMS":
            # lists the base folder's files, training.json (timings) among them
            lines = path.read_text().splitlines()
            kept = [x for x in lines if not x.endswith(("training.json", "log.jsonl"))]
            found[name] = sha("\n".join(kept))
        elif path.name == "config.json":
            found[name] = sha(
                json.dumps(drop_timings(json.loads(path.read_text())), sort_keys=True)
            )
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    found["<printed>"] = sha(printed)
    return found


def compare(before, after):
    a = json.loads((before / "digests.json").read_text())
    b = json.loads((after / "digests.json").read_text())
    differ = 0
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            differ += 1
            print(f"DIFFERS  {name}")
    if a.get("<printed>") != b.get("<printed>"):
        print(f"compare the printed output: diff {before}/printed.txt {after}/printed.txt")
    print(f"{len(set(a) | set(b))} outputs, {differ} differ")
    return differ


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="an empty or new folder for the jobs and digests")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--redigest", type=Path, metavar="OUT", help="digest OUT's jobs again")
    args = parser.parse_args(argv)
    if args.redigest:
        found = digest(args.redigest / "work", (args.redigest / "printed.txt").read_text())
        (args.redigest / "digests.json").write_text(json.dumps(found, indent=1, sort_keys=True))
        return
    if args.compare:
        sys.exit(1 if compare(*args.compare) else 0)
    if args.out is None:
        parser.error("give --out FOLDER (or --compare BEFORE AFTER)")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out={args.out}: not empty; give a new folder")
    start = time.time()
    work, log = make_jobs(args.repo.resolve())
    printed = mask_printed("\n".join(log), work)
    found = digest(work, printed)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work), str(args.out / "work"))
    (args.out / "digests.json").write_text(json.dumps(found, indent=1, sort_keys=True))
    (args.out / "printed.txt").write_text(printed)
    print(f"{len(found)} outputs digested in {time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
