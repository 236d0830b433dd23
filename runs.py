"""
The run folder and the base checkpoint on disk (docs/design.md, "Run folder" and "Base checkpoint"): what train.py
writes and resumes from, and what evaluate.py reads. Kept out of train.py so that the loop reads top to bottom.

    runs/<name>/config.json       every setting of the run (train.py), checked again when the run resumes
    runs/<name>/log.jsonl         one line per evaluation; a line cut short by a kill is dropped on resume
    runs/<name>/last.pt           resume state: trainable tensors, optimizer, step, data position, each rank's RNG
    runs/<name>/best.safetensors  the trainable tensors at the best validation loss (strategies.save_trainable)
    checkpoints/base/training.json  focal context, lengths and tokenizer the base learned with

Nothing here is unpickled beyond tensors (torch.load weights_only=True); every file is written through a temporary
file and a rename (data.atomic_write).
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

import data

ROOT = os.path.dirname(os.path.abspath(__file__))
CARRIED = ("tokenizer", "focal_context", "max_src_len", "max_tgt_len")  # what a base passes on to its customizations


def open_run(out_dir, name):
    """runs/<name>, created and checked writable (a clear error instead of a crash at the first checkpoint)."""
    run = os.path.join(out_dir, name)
    try:
        os.makedirs(run, exist_ok=True)
        tempfile.TemporaryFile(dir=run).close()
    except OSError as e:
        raise SystemExit(f"cannot write the run folder {run}: {e.strerror}; choose another --out_dir") from None
    return run


def read_log(path, upto_step=None):
    """log.jsonl -> its lines as dicts. A partial last line (a kill during the write) is dropped and said; a corrupt
    line elsewhere is an error naming the file and line. upto_step: drop lines logged after that step."""
    lines = open(path, encoding="utf-8").read().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: the write was cut short
                print(f"{path}:{n}: dropping a partial last line (the run was killed while logging)")
                continue
            raise SystemExit(f"{path}:{n}: corrupt log line; delete the run folder to start afresh") from None
    return [r for r in rows if upto_step is None or r["step"] <= upto_step]


def check_resume(run, cfg, may_change):
    """A run resumes only with the settings that made it: another fold, project, strategy, learning rate... would
    continue another run (a model trained on what is now its test fold). Each differing setting is named."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        return
    old = json.load(open(path))
    differ = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in cfg.items() if k not in may_change and old.get(k) != v]
    if differ:
        raise SystemExit(f"{run} was started with other settings ({'; '.join(differ)}); resuming would continue "
                         f"another run. Use the same settings, another --name, or delete {run}")


def rng_states(device):
    """This process's random generators: the CPU one, and the current CUDA device's (dropout draws from it)."""
    return dict(cpu=torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.startswith("cuda") else {}))


def gather(obj, ddp, world):
    """[obj of rank 0, obj of rank 1, ...] under DDP (a collective: every rank calls it); [obj] alone."""
    if not ddp:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def save_state(path, model_state, optimizer, state, rng):
    data.atomic_write(path, lambda p: torch.save(dict(trainable=model_state, optimizer=optimizer.state_dict(),
                                                      state=dict(state), rng=rng), p))


def load_state(path, run, model, optimizer, state, rank, world, device):
    """Resume from last.pt: the trainable tensors, the optimizer, the loop's state and this rank's generators."""
    import strategies
    ck = torch.load(path, map_location=device, weights_only=True)
    try:
        strategies.load_trainable(model, ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
    except ValueError as e:  # another strategy, other options, or an older trainer
        raise SystemExit(f"{path} does not match this run's trainable parameters ({e}); "
                         f"start a fresh run: delete {run} or choose another --name") from None
    if len(ck["rng"]) != world:
        raise SystemExit(f"{path} was saved by {len(ck['rng'])} processes, this run has {world}: resume with "
                         f"--nproc_per_node={len(ck['rng'])}")
    state.update(ck["state"])
    torch.set_rng_state(ck["rng"][rank]["cpu"])
    if device.startswith("cuda"):
        torch.cuda.set_rng_state(ck["rng"][rank]["cuda"], device)
    print(f"resumed {run} at step {state['step']} (best val loss {state['best_val']:.4f})")


def save_base(model, cfg, extra):
    """The base checkpoint: the HF layout (model.save_pretrained), then training.json (tokenizer path relative to
    the checkout, so the folder can move with it)."""
    model.save_pretrained(cfg["save_base"])
    trained = {**{k: cfg[k] for k in CARRIED}, "tokenizer": os.path.relpath(os.path.abspath(cfg["tokenizer"]), ROOT),
               **extra}
    data.atomic_write(os.path.join(cfg["save_base"], "training.json"), json.dumps(trained, indent=2))


def base_settings(cfg, given, fallback):
    """Customize: focal context, lengths and tokenizer from the base's training.json; a value given on the command
    line that differs is an error naming it. A base without training.json (real BART or AthenaTest weights) takes
    the given values, else `fallback`."""
    path = os.path.join(str(cfg["base"]), "training.json")
    if not os.path.isfile(path):
        return {**cfg, **{k: cfg[k] or fallback[k] for k in CARRIED}}
    try:
        trained = json.load(open(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); retrain the base with `make base`") from None
    if missing := [k for k in CARRIED if k not in trained]:
        raise SystemExit(f"{path}: lacks {', '.join(missing)}; retrain the base with `make base`")
    trained["tokenizer"] = os.path.join(ROOT, trained["tokenizer"])
    same = lambda k: os.path.abspath(cfg[k]) == os.path.abspath(trained[k]) if k == "tokenizer" else cfg[k] == trained[k]
    for k in CARRIED:
        if k in given and not same(k):
            raise SystemExit(f"--{k}={cfg[k]} differs from the base's {k}={trained[k]} ({path}): a base is "
                             f"customized and scored with what it learned from; drop the setting or retrain the base")
    return {**cfg, **{k: trained[k] for k in CARRIED}}


def run_config(run):
    """evaluate.py: a trained run's config.json (best.safetensors must exist beside it)."""
    for f, why in (("config.json", "not a run folder"), ("best.safetensors", "no checkpoint: train.py writes it")):
        if not (Path(run) / f).is_file():
            raise FileNotFoundError(f"{run}: no {f} ({why})")
    cfg = json.loads((Path(run) / "config.json").read_text())
    if missing := [k for k in CARRIED if not cfg.get(k)]:
        raise ValueError(f"{run}/config.json lacks {', '.join(missing)} (a run of an older train.py): retrain it")
    return cfg


def checksum(path):
    """sha256 of a checkpoint: a file, or every file of a folder (names and bytes, in sorted order)."""
    h, p = hashlib.sha256(), Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file() and f.name != "training.json":
            h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()
