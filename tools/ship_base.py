"""Ship a base run as the repository's base checkpoint (checkpoints/base/, the stand-in for
AthenaTest's unreleased weights; paper §2.1): the weights at the run's best validation loss, rounded
to bf16, with the tokenizer, the run's log.jsonl, training.json (recipe, data, dtype, steps, PF-s,
machine, every stage) and SHA256SUMS.

python tools/ship_base.py /path/to/runs/base --out checkpoints/base

A base trained by `make base` is written in this layout already (runs.save_base); this tool is
for a run whose folder is kept outside the work tree (hours of training that resumes from its
last.pt there), or one trained by an older train.py."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runs  # noqa: E402
import strategies  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import BART, config_from_preset  # noqa: E402


def run_summary(run):
    """The run's config.json and the data sizes it records (the denoising windows and tokens,
    which train.py prints but an older train.py did not save, come from the command line)."""
    cfg = json.load(open(os.path.join(run, "config.json"), encoding="utf-8"))
    splits = cfg.get("splits", {})
    return cfg, dict(training_pairs=splits.get("train"), validation_pairs=splits.get("val"))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Ship a base run as a self-contained base checkpoint folder."
    )
    ap.add_argument(
        "run", help="the base run's folder (config.json, log.jsonl, last.pt, best.safetensors)"
    )
    ap.add_argument(
        "--out", default="checkpoints/base", help="the base folder to write (replaced atomically)"
    )
    ap.add_argument(
        "--denoising-windows", type=int, default=None, help="as train.py printed them (recorded)"
    )
    ap.add_argument(
        "--denoising-tokens", type=int, default=None, help="as counted for the run (recorded)"
    )
    ap.add_argument("--commit", default="", help="the commit of train.py the run used (recorded)")
    a = ap.parse_args(argv)

    cfg, summary = run_summary(a.run)
    if cfg.get("mode") != "base":
        raise SystemExit(f"{a.run}: not a base run (mode={cfg.get('mode')!r})")
    summary.update(denoising_windows=a.denoising_windows, denoising_tokens=a.denoising_tokens)
    state = torch.load(os.path.join(a.run, "last.pt"), map_location="cpu", weights_only=True)[
        "state"
    ]
    tok = load_tokenizer(cfg["tokenizer"])
    model = BART(config_from_preset(cfg["preset"], vocab_size=tok.get_vocab_size()))
    strategies.apply(model, "custom")
    runs.load_trainable(model, os.path.join(a.run, "best.safetensors"))
    cfg["dtype"] = cfg.get("resolved", {}).get("dtype", cfg.get("dtype", "fp32"))
    training = runs.base_training_record(cfg, state, summary)
    if a.commit:
        training["stages"][0]["commit"] = a.commit
    log_text = open(os.path.join(a.run, "log.jsonl"), encoding="utf-8").read()
    runs.export_base(model, a.out, training, cfg["tokenizer"], log_text)
    print(
        f"{a.out}: {training['pf_s_exact']:.3f} PF-s exact over {len(training['stages'])} stage(s), "
        f"{training['steps']} steps, {training['seconds'] / 60:.1f} minutes"
    )


if __name__ == "__main__":
    main()
