"""The run folder and the base checkpoint on disk (docs/design.md, "Run folder" and "Base
checkpoint"): what train.py writes and resumes from, and what evaluate.py reads and writes. Kept out
of train.py so that the loop reads top to bottom.

    runs/<name>/config.json       every setting of the run (train.py), checked again when the run resumes
    runs/<name>/log.jsonl         one line per evaluation; a line cut short by a kill is dropped on resume
    runs/<name>/last.pt           resume state: trainable tensors, optimizer, step, data position, each rank's RNG
    runs/<name>/best.safetensors  the trainable tensors at the best validation loss (save_trainable)
    runs/<name>/predictions.jsonl, metrics.json   evaluate.py's (check_predictions; data.read_jsonl reads them)
    runs/.cache/base-<key>.json   the base's scores on one fold and decoding, shared by every strategy (cached)
    checkpoints/base/training.json  focal context, lengths and tokenizer the base learned with

The delta's own files (save_trainable, load_trainable: train.py writes and resumes them, evaluate.py
loads them through load_models) and train.py's --key=value settings parser (parse_settings) live
here too, so that neither train.py nor evaluate.py imports the other; so does resolve, what a run's
"auto" settings come to on this machine.

Nothing here is unpickled beyond tensors (torch.load weights_only=True); every file is written
through a temporary file and a rename (data.atomic_write), except log.jsonl, appended a line at a
time (a cut last line is dropped)."""

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

import data
import strategies
from model import BART

ROOT = os.path.dirname(os.path.abspath(__file__))
# what a base passes on to its customizations
CARRIED = ("tokenizer", "focal_context", "max_src_len", "max_tgt_len")
# and its recipe
RECORDED = ("preset", "base_projects", "denoise_steps", "denoise_every", "max_steps", "lr")
# train.py's loop at step 0 (its state in last.pt): data position per stream, tokens, FLOPs, early
# stopping, time
FRESH = dict(
    step=0,
    epoch=0,
    batch=0,
    dn_epoch=0,
    dn_batch=0,
    dn_steps=0,
    tokens=0,
    flops_exact=0.0,
    flops_paper=0.0,
    best_val=float("inf"),
    best_step=-1,
    bad_evals=0,
    seconds=0.0,
)


# run folder -> the open lock file of this process (the kernel drops the lock when the process ends)
_HELD = {}


def lock_run(run):
    """One writer per run folder: an exclusive flock on <run>/.lock for the rest of this process
    (train.py for the whole training, evaluate.py while it scores). Another process holding it:
    one line naming its pid. A lock of a process that died is no lock (flock is released with the
    process), so a kill -9 never leaves the run locked; the temporary files such a kill left
    behind are removed once the lock is held."""
    key = os.path.abspath(run)
    if key in _HELD:
        return
    f = open(os.path.join(run, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(
            f"{run} is in use by process {holder} (a train.py or evaluate.py on the same run); wait "
            f"for it to finish, or give this one another --name"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = f
    # the temporary files of a writer killed inside a save (data.atomic_write's .tmp-*): with the
    # lock held, no other writer can own them
    for name in os.listdir(run):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(run, name))


def check_save_base(path):
    """--save_base, checked before a base trains for hours: not an existing file, and under a
    folder this process can write (the nearest existing ancestor, where the missing folders will
    be made)."""
    path = os.path.abspath(str(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(
            f"--save_base={path}: is a file; a base is saved as a folder: choose another path"
        )
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise SystemExit(
            f"--save_base={path}: {ancestor} is a file, not a folder: choose another path"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SystemExit(f"--save_base={path}: cannot write in {ancestor}: choose another path")


def unlock_run(run):
    """Drop this process's lock on a run folder (lock_run), as before the folder is removed."""
    f = _HELD.pop(os.path.abspath(run), None)
    if f is not None:
        f.close()


@contextlib.contextmanager
def run_folder(out_dir, name, master=True):
    """open_run for the rest of a training: a run folder this invocation made is removed again
    (the master's lock dropped) when the training fails before its first checkpoint (no last.pt),
    so that a failure leaves no empty folder, nor one holding only config.json. A folder that was
    there before (a resumed run) keeps its files; so does one with a last.pt (it resumes)."""
    made = not os.path.exists(os.path.join(out_dir, name))
    run = open_run(out_dir, name)
    try:
        yield run
    except BaseException:
        if made and master and not os.path.exists(os.path.join(run, "last.pt")):
            unlock_run(run)
            shutil.rmtree(run, ignore_errors=True)
        raise


def open_run(out_dir, name):
    """runs/<name>, created and checked writable (a clear error instead of a crash at the first
    checkpoint)."""
    run = os.path.join(out_dir, name)
    try:
        os.makedirs(run, exist_ok=True)
        tempfile.TemporaryFile(dir=run).close()
    except OSError as e:
        raise SystemExit(
            f"cannot write the run folder {run}: {e.strerror}; choose another --out_dir"
        ) from None
    return run


def resolve(cfg):
    """(ddp, rank, world, cuda, device, attn_impl): under torchrun data parallel, every rank on
    its own GPU; auto: the GPU if there is one, and the Triton kernel on it (sdpa on CPU, or with
    attention dropout: said)."""
    ddp = "RANK" in os.environ  # launched by torchrun: data parallel (base training)
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    cuda = cfg["device"].startswith("cuda") or (
        cfg["device"] == "auto" and torch.cuda.is_available()
    )
    local = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device = local if cfg["device"] == "auto" and cuda else cfg["device"].replace("auto", "cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL: every rank its own GPU, not all on cuda:0
    if ddp:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    attn_impl = "triton" if cuda and not cfg["attention_dropout"] else "sdpa"
    if cuda and cfg["attn_impl"] == "auto" and attn_impl == "sdpa":
        print(
            f"attention: sdpa, not the Triton kernel, which has no attention dropout (attention_dropout="
            f"{cfg['attention_dropout']}; --attention_dropout=0 selects the kernel)"
        )
    return (
        ddp,
        rank,
        world,
        cuda,
        device,
        cfg["attn_impl"] if cfg["attn_impl"] != "auto" else attn_impl,
    )


def disk_full(e, path):
    """Did writing `path` fail for want of space? An OSError says ENOSPC; safetensors' writer says
    it in words; torch.save's only that the write failed (the folder's free space tells)."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
        return True
    folder = os.path.dirname(os.path.abspath(path))
    return "file write failed" in str(e) and shutil.disk_usage(folder).free < 1 << 20


def out_of_space(path):
    """The one-line error of a write that found the disk full (disk_full)."""
    return SystemExit(
        f"{path}: no space left on device: free space and rerun (the run resumes from its "
        f"last checkpoint)"
    )


def write_file(path, content):
    """data.atomic_write, with a full disk said in one line naming the file: the file keeps its
    previous version and atomic_write removes its temporary file, so the run resumes from its
    last checkpoint."""
    try:
        data.atomic_write(path, content)
    except Exception as e:
        if not disk_full(e, path):
            raise
        raise out_of_space(path) from None


def saved_config(run):
    """The config.json of an existing run ({} if there is none); not JSON: one line naming it."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        return json.load(open(path, encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(
            f"{path}: not valid JSON ({e}); delete {run} and rerun to retrain the run"
        ) from None


def read_log(path, upto_step=None):
    """log.jsonl -> its lines as dicts. A partial last line (a kill during the write) is dropped
    and said; a corrupt line elsewhere is an error naming the file and line. upto_step: drop
    lines logged after that step."""
    lines = open(path, encoding="utf-8").read().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: the write was cut short
                print(
                    f"{path}:{n}: dropping a partial last line (the run was killed while logging)"
                )
                continue
            raise SystemExit(
                f"{path}:{n}: corrupt log line; delete the run folder to start afresh"
            ) from None
    return [r for r in rows if upto_step is None or r["step"] <= upto_step]


def parse_settings(argv, defaults):
    """["--key=value", ...] -> (settings, the keys given): each value converted to the type of
    its default (bools: true/false); an unknown key or a value of the wrong type is an error
    naming it and the valid choices."""
    cfg, given = dict(defaults), set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --key=value (keys: {', '.join(defaults)})")
        key, val = arg[2:].split("=", 1)
        if key not in defaults:
            raise SystemExit(f"unknown setting {key!r}; valid settings: {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            cfg[key] = {"true": True, "false": False}[val.lower()] if kind is bool else kind(val)
        except (ValueError, KeyError):
            raise SystemExit(f"setting {key}={val!r} is not a valid {kind.__name__}") from None
        given.add(key)
    return cfg, given


def write_config(run, saved, note=""):
    """config.json: every setting of the run and what it resolved to (device, splits,
    parameters); printed, then the parameters and the data in a line (and `note`)."""
    write_file(os.path.join(run, "config.json"), json.dumps(saved, indent=2))
    print(json.dumps(saved, indent=2))
    print(
        f"parameters: {saved['total_parameters']:,} total, {saved['trainable_parameters']:,} trainable; "
        f"{saved['splits']['train']} training pairs ({saved['truncated_training_pairs']} truncated), "
        f"{saved['splits']['val']} validation pairs{note}"
    )


def resume(run, cfg, may_change, model, optimizer, rank, world, device):
    """The loop's state: FRESH, or runs/<name>'s last.pt if it is there (same settings only:
    check_resume), loaded with the trainable tensors, the optimizer and this rank's generators. A
    run stopped by max_steps or the time limit goes on when the rerun raises them (max_steps only
    within check_schedule's rule); one that stopped early stays done. Log lines written after the
    checkpoint (a kill between the two) are dropped; a fresh start drops the old log. A last.pt or
    best.safetensors cut short (a full disk or a kill during an older train.py's save) is one line
    saying the run must be retrained."""
    last, log, state = os.path.join(run, "last.pt"), os.path.join(run, "log.jsonl"), dict(FRESH)
    if not os.path.exists(last):
        if rank == 0 and os.path.exists(log):
            os.remove(log)
        return state
    old = check_resume(run, cfg, may_change)
    ck = read_state(run, device)
    if os.path.exists(os.path.join(run, "best.safetensors")):
        read_delta(os.path.join(run, "best.safetensors"))
    try:
        load_trainable(model, ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
    except ValueError as e:  # another strategy, other options, or an older trainer
        raise SystemExit(
            f"{last} does not match this run's trainable parameters ({e}); "
            f"start a fresh run: delete {run} or choose another --name"
        ) from None
    if len(ck["rng"]) != world:
        raise SystemExit(
            f"{last} was saved by {len(ck['rng'])} processes, this run has {world}: resume with "
            f"--nproc_per_node={len(ck['rng'])}"
        )
    state.update(ck["state"])
    check_schedule(run, old, cfg, state["step"])
    torch.set_rng_state(ck["rng"][rank]["cpu"])
    if device.startswith("cuda"):
        torch.cuda.set_rng_state(ck["rng"][rank]["cuda"], device)
    print(f"resumed {run} at step {state['step']} (best val loss {state['best_val']:.4f})")
    if (
        str(state.get("done")).startswith(("max_steps", "time limit"))
        and state["step"] < cfg["max_steps"]
    ):
        del state["done"]
    if rank == 0 and os.path.exists(log):
        write_file(log, "".join(json.dumps(x) + "\n" for x in read_log(log, state["step"])))
    return state


def read_state(run, device):
    """last.pt's contents (tensors only); a file cut short or corrupt: one line naming it."""
    last = os.path.join(run, "last.pt")
    try:
        return torch.load(last, map_location=device, weights_only=True)
    except PermissionError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):
        raise SystemExit(
            f"{last}: cut short or corrupt (a full disk or a kill during an older train.py's "
            f"save): the run cannot resume from it; delete {run} and rerun to retrain it from the "
            f"start"
        ) from None


def check_schedule(run, old, cfg, step):
    """max_steps sets the length of the supervised stage's cosine decay (train.get_lr): a resume
    may change it only while every step taken so far had the same learning rate under both
    values, i.e. up to the end of that stage's warmup (step denoise_steps + warmup_steps). Later
    it would join two schedules while config.json named only the new one: refused by name."""
    before = old.get("max_steps", cfg["max_steps"])
    limit = cfg["denoise_steps"] + cfg["warmup_steps"]
    if before == cfg["max_steps"] or step <= limit:
        return
    raise SystemExit(
        f"--max_steps={cfg['max_steps']}: {run} is at step {step} of a learning-rate schedule "
        f"for max_steps={before} (its cosine decay after step {limit}); a resume may change "
        f"max_steps only up to step {limit}: keep --max_steps={before}, or train a new run "
        f"(another --name) with --max_steps={cfg['max_steps']}"
    )


def check_dtype(run, cfg, dtype):
    """A run resumes in the compute dtype it was trained in (config.json's resolved dtype):
    --dtype=auto resolves per machine, and going on in the other dtype would change its numbers
    silently. Another one is refused naming both, with the --dtype that resumes it."""
    if not os.path.exists(os.path.join(run, "last.pt")):
        return
    old = saved_config(run).get("resolved", {}).get("dtype")
    if old in (None, dtype):
        return
    raise SystemExit(
        f"{run} was trained in {old} (config.json: resolved.dtype) but would resume in {dtype} "
        f"(--dtype={cfg['dtype']} on this machine): pass --dtype={old} to resume it in {old}, or "
        f"train a new run (another --name)"
    )


def log_evaluation(run, state, stage, train_loss, check, better):
    """A line of log.jsonl: the step and its stage, the denoising steps, tokens, FLOPs and PF-s
    so far, the last training loss, the validation's numbers (`check`, train.source_check) and
    the seconds so far; printed in short."""
    line = dict(
        step=state["step"],
        stage=stage,
        denoising_steps=state["dn_steps"],
        tokens=state["tokens"],
        flops_exact=state["flops_exact"],
        flops_paper=state["flops_paper"],
        pf_s_exact=state["flops_exact"] / 1e15,
        pf_s_paper=state["flops_paper"] / 1e15,
        # step 0: no step yet (strict JSON)
        train_loss=train_loss if math.isfinite(train_loss) else None,
        **check,
        seconds=round(state["seconds"], 2),
    )
    path = os.path.join(run, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as e:
        if not disk_full(e, path):
            raise
        # a line cut short is dropped on resume (read_log)
        raise out_of_space(path) from None
    print(
        f"step {state['step']} ({stage}): val loss {check['val_loss']:.4f}{' (best)' if better else ''} | "
        + (f"denoise_gain {check['denoise_gain']:.2f} | " if stage == "denoise" else "")
        + f"source_gain {check['source_gain']:.3f} | empty-source loss {check['val_loss_empty_source']:.3f} | "
        f"encoder spread {check['encoder_spread']:.3f}"
    )


def check_resume(run, cfg, may_change):
    """A run resumes only with the settings that made it: another fold, project, strategy,
    learning rate... would continue another run (a model trained on what is now its test fold).
    Each differing setting is named. Returns the saved config.json ({} if none)."""
    old = saved_config(run)
    if not old:
        return old
    differ = [
        f"{k}: {old.get(k)!r} -> {v!r}"
        for k, v in cfg.items()
        if k not in may_change and old.get(k) != v
    ]
    if differ:
        raise SystemExit(
            f"{run} was started with other settings ({'; '.join(differ)}); resuming would continue "
            f"another run. Use the same settings, another --name, or delete {run}"
        )
    return old


# ---- the delta: best.safetensors holds exactly the trainable tensors, the strategy in its metadata
# ----


def trainable_state_dict(model):
    """Exactly the trainable tensors under their model names (tied weights once, as
    model.shared.weight); detached views of the live tensors: clone them to keep a snapshot."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, path):
    """The delta as safetensors, the strategy in the metadata; via a temporary file: never
    half-written."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
    write_file(path, lambda p: save_file(sd, p, metadata={"strategy": json.dumps(model.strategy)}))


def read_delta(path, device="cpu"):
    """A save_trainable file -> (its strategy or None, its tensors on `device`). A file cut short
    or corrupt (a full disk or a kill during an older version's save): ValueError naming it and
    saying that the run must be retrained."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            saved = json.loads((f.metadata() or {}).get("strategy", "null"))
            return saved, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, json.JSONDecodeError):
        raise ValueError(
            f"{path}: cut short or corrupt, not a whole safetensors file (a full disk or a kill "
            f"during an older version's save): the run must be retrained: delete "
            f"{os.path.dirname(os.path.abspath(path))} and rerun train.py"
        ) from None


def load_trainable(model, src):
    """Copy a delta (a save_trainable path, or a state dict) onto a base model to which the same
    strategy was applied: the result is the customized model bit for bit. Another strategy,
    option or shape: ValueError."""
    if getattr(model, "strategy", None) is None:
        raise ValueError(
            "apply the delta's strategy to the model first (strategies.apply(model, name, ...))"
        )
    if isinstance(src, (str, os.PathLike)):
        saved, sd = read_delta(src)
        if saved is not None and saved != model.strategy:
            raise ValueError(
                f"{src}: a delta of {saved} cannot load onto a model customized with {model.strategy}"
            )
    else:
        sd = src
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise ValueError(
            f"the delta does not hold this model's trainable tensors ({model.strategy['name']}): missing "
            f"{missing[:3]}, unexpected {extra[:3]}; was it saved from another strategy?"
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(p.shape)}"
        for k, p in own.items()
        if sd[k].shape != p.shape
    ]
    if bad:
        raise ValueError(
            f"the delta's shapes do not match this model's (another model size?): {bad[:3]}"
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])
    return model


def save_state(run, model, optimizer, state, device, ddp, world, master):
    """last.pt: the trainable tensors, the optimizer, the loop's state and every rank's random
    generators (the CPU one, and the current CUDA device's: dropout draws from it). A collective:
    every rank calls it, the master writes."""
    mine = dict(cpu=torch.get_rng_state())
    if device.startswith("cuda"):
        mine["cuda"] = torch.cuda.get_rng_state(device)
    rng = [None] * world if ddp else [mine]
    if ddp:
        torch.distributed.all_gather_object(rng, mine)
    if master:
        ck = dict(
            trainable=trainable_state_dict(model),
            optimizer=optimizer.state_dict(),
            state=dict(state),
            rng=rng,
        )
        write_file(os.path.join(run, "last.pt"), lambda p: torch.save(ck, p))


def finish(run, model, state, reason):
    """The end of a run: the model kept and evaluated is the one at the best validation loss
    (best.safetensors); a run that stopped for any reason but a non-finite loss is done:
    rerunning it resumes into "nothing to do"."""
    best = os.path.join(run, "best.safetensors")
    if not os.path.exists(best):
        raise SystemExit(
            f"no supervised validation loss was reached before stopping ({reason}); nothing saved in "
            f"{run}"
        )
    load_trainable(model, best)
    if reason != "non-finite loss" and not state.get("done"):
        state["done"] = reason


def machine():
    """The machine a base was trained on, for training.json: CPU model and cores (or the GPU),
    torch's version."""
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = dict(cpu=cpu, cores=torch.get_num_threads(), torch=torch.__version__)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_base(model, out_dir, training, tokenizer_path, log_text):
    """Write a self-contained base folder (docs/design.md, "Base checkpoint"): config.json and
    model.safetensors with the weights rounded to bf16 (half the bytes; customization loads them
    back into fp32 master weights), the tokenizer it was trained with, its log.jsonl (log_text),
    training.json (`training`, with the tokenizer named relative to the folder) and SHA256SUMS
    over every other file, which the loader checks (weights.verify_sha256sums). Built in a
    temporary folder next to out_dir and renamed into place: never half-written."""
    import copy
    import shutil

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-base-", dir=parent)
    try:
        folder = os.path.join(staging, "base")
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder)
        shutil.copyfile(tokenizer_path, os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "log.jsonl"), "w", encoding="utf-8") as f:
            f.write(log_text)
        training = {**training, "tokenizer": "tokenizer.json", "weights_dtype": "bf16"}
        with open(os.path.join(folder, "training.json"), "w", encoding="utf-8") as f:
            json.dump(training, f, indent=2, allow_nan=False)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp's 0700 and safetensors' 0600 -> what the umask gives
        os.chmod(folder, 0o777 & ~umask)
        for name in os.listdir(folder):
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        names = sorted(os.listdir(folder))
        sums = "".join(f"{sha256_file(os.path.join(folder, n))}  {n}\n" for n in names)
        with open(os.path.join(folder, "SHA256SUMS"), "w", encoding="utf-8") as f:
            f.write(sums)
        if os.path.isdir(out_dir):
            os.replace(out_dir, os.path.join(staging, "old"))
        os.replace(folder, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def base_training_record(cfg, state, summary, earlier=None):
    """training.json of a base trained here: what customization reads (CARRIED), the recipe
    (every setting), the data, the dtype and the machine as one stage of `stages`, after the
    stages of the base it continued (`earlier`, that base's training.json; --init_base), and the
    totals over every stage (steps, tokens, PF-s, time)."""
    stage = dict(
        settings={k: v for k, v in cfg.items() if k not in ("save_base",)},
        machine=machine(),
        steps=state["step"],
        denoising_steps=state["dn_steps"],
        tokens=state["tokens"],
        pf_s_exact=state["flops_exact"] / 1e15,
        pf_s_paper=state["flops_paper"] / 1e15,
        seconds=round(state["seconds"]),
        best_step=state["best_step"],
        best_val_loss=state["best_val"],
        stopped=state.get("done"),
        **summary,
    )
    stages = (earlier["stages"] if earlier else []) + [stage]
    totals = {
        k: sum(s[k] for s in stages)
        for k in ("steps", "tokens", "pf_s_exact", "pf_s_paper", "seconds")
    }
    notes = {"notes": earlier["notes"]} if earlier and earlier.get("notes") else {}
    return {**{k: cfg[k] for k in CARRIED + RECORDED}, **totals, "stages": stages, **notes}


def continued_base(cfg, given):
    """--init_base: a base's next stage starts from a base folder (export_base's layout) with a
    fresh optimizer. Returns (cfg with that base's CARRIED settings and preset, a differing value
    given on the command line refused by name, and init_checksum; its training.json, whose
    stages the new base lists first)."""
    folder = str(cfg["init_base"])
    path = os.path.join(folder, "training.json")
    if not os.path.isfile(path):
        raise SystemExit(
            f"--init_base={folder}: no training.json; a base goes on from a folder written by "
            f"`make base` or tools/ship_base.py (checkpoints/base/ is one)"
        )
    out = base_settings({**cfg, "base": folder}, given, {})
    earlier = json.load(open(path, encoding="utf-8"))
    if not earlier.get("stages") or "preset" not in earlier:
        raise SystemExit(f"{path}: no stages or no preset: not a base folder of this repository")
    if "preset" in given and cfg["preset"] != earlier["preset"]:
        raise SystemExit(
            f"--preset={cfg['preset']} differs from the base's preset={earlier['preset']} "
            f"({path}): a base goes on in its own architecture; drop --preset"
        )
    out.update(base=cfg["base"], preset=earlier["preset"], init_checksum=out.pop("base_checksum"))
    return out, earlier


def stage_log(run_log, earlier_log, stage):
    """The log.jsonl of a base that continued another: the earlier base's lines (each with its
    base_stage, 1 where a line has none), then this run's lines, each with base_stage=`stage`."""
    lines = read_log(earlier_log)
    for line in lines:
        line.setdefault("base_stage", 1)
    lines += [{**line, "base_stage": stage} for line in read_log(run_log)]
    return "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines)


def save_base(model, cfg, run, state, summary, earlier=None):
    """The base checkpoint of a base trained here (export_base), said; after `earlier`'s stages
    where it continued a base (--init_base)."""
    training = base_training_record(cfg, state, summary, earlier)
    log = os.path.join(run, "log.jsonl")
    if earlier:
        earlier_log = os.path.join(cfg["init_base"], "log.jsonl")
        log_text = stage_log(log, earlier_log, len(training["stages"]))
    else:
        log_text = open(log, encoding="utf-8").read()
    export_base(model, cfg["save_base"], training, cfg["tokenizer"], log_text)
    print(
        f"base model saved to {cfg['save_base']} ({training['pf_s_exact']:.3f} PF-s exact, "
        f"{training['steps']} steps)"
    )


def clamp_lengths(cfg, given, base):
    """A base without training.json (an HF directory): lengths beyond its position table cannot
    be read. A default length is cut to it (said); a length given on the command line beyond it
    is an error naming both."""
    hf = os.path.join(str(base), "config.json")
    if not os.path.isfile(hf):
        return cfg
    try:
        limit = json.load(open(hf, encoding="utf-8")).get("max_position_embeddings")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return cfg  # the loader names the broken file
    if not isinstance(limit, int):
        return cfg
    for k in ("max_src_len", "max_tgt_len"):
        if cfg[k] > limit:
            if k in given:
                raise SystemExit(
                    f"--{k}={cfg[k]} is longer than the base's position table ({limit} positions, "
                    f"{hf}): give at most {limit}"
                )
            print(f"{k}: {cfg[k]} cut to {limit}, the base's max_position_embeddings ({hf})")
            cfg[k] = limit
    return cfg


def base_settings(cfg, given, fallback):
    """Customize: focal context, lengths and tokenizer from the base's training.json; a value
    given on the command line that differs is an error naming it. A base without training.json
    (real BART or AthenaTest weights) takes the given values, else `fallback`. base_checksum: the
    base's checksum (a resume onto another base is refused)."""
    path = os.path.join(str(cfg["base"]), "training.json")
    if not os.path.isfile(path):
        out = {
            **cfg,
            **{k: cfg[k] or fallback[k] for k in CARRIED},
            "base_checksum": checksum(cfg["base"]),
        }
        return clamp_lengths(out, given, cfg["base"])
    try:
        trained = json.load(open(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(
            f"{path}: not valid JSON ({e}); retrain the base with `make base`"
        ) from None
    if missing := [k for k in CARRIED if k not in trained]:
        raise SystemExit(f"{path}: lacks {', '.join(missing)}; retrain the base with `make base`")
    # the tokenizer: beside the base (a folder of export_base), else a path relative to the checkout
    # (older bases)
    beside = os.path.join(str(cfg["base"]), trained["tokenizer"])
    trained["tokenizer"] = (
        beside if os.path.isfile(beside) else os.path.join(ROOT, trained["tokenizer"])
    )

    # a tokenizer is the same one when its file holds the same bytes (a base folder keeps a copy)
    def same(k):
        if k == "tokenizer":
            return os.path.isfile(cfg[k]) and sha256_file(cfg[k]) == sha256_file(trained[k])
        return cfg[k] == trained[k]

    for k in CARRIED:
        if k in given and not same(k):
            raise SystemExit(
                f"--{k}={cfg[k]} differs from the base's {k}={trained[k]} ({path}): a base is "
                f"customized and scored with what it learned from; drop the setting or retrain the base"
            )
    return {**cfg, **{k: trained[k] for k in CARRIED}, "base_checksum": checksum(cfg["base"])}


def run_config(run):
    """evaluate.py: a trained run's config.json (best.safetensors must exist beside it)."""
    for f, why in (
        ("config.json", "not a run folder"),
        ("best.safetensors", "no checkpoint: train.py writes it"),
    ):
        if not (Path(run) / f).is_file():
            raise FileNotFoundError(f"{run}: no {f} ({why})")
    cfg = json.loads((Path(run) / "config.json").read_text())
    if missing := [k for k in CARRIED if not cfg.get(k)]:
        raise ValueError(
            f"{run}/config.json lacks {', '.join(missing)} (a run of an older train.py): retrain it"
        )
    return cfg


def checksum(path):
    """sha256 of a checkpoint: a file, or every file of a folder (names and bytes, in sorted
    order)."""
    h, p = hashlib.sha256(), Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file() and f.name != "training.json":
            h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()


# ---- what evaluate.py reads and writes in a run folder ----


def check_predictions(rows, path, expected_ids=()):
    """Every row: id, reference and per model a non-empty list of strings and a token count; no
    test id missing."""
    for r, m in ((r, m) for r in rows or [{}] for m in ("base", "customized")):
        if (
            "id" not in r
            or not isinstance(r.get("reference"), str)
            or not isinstance(r.get(m), dict)
        ):
            raise ValueError(
                f"{path}: row {r.get('id', '?')} lacks id, reference or the {m} model's entry"
            )
        if not (
            r[m].get("predictions")
            and all(type(x) is str for x in r[m]["predictions"])
            and r[m].get("tokens")
        ):
            raise ValueError(
                f"{path}: id {r['id']}: empty predictions (or no token count) for the {m} model"
            )
    if missing := sorted(set(expected_ids) - {r["id"] for r in rows}):
        raise ValueError(
            f"{path}: predictions missing for {len(missing)} test ids, e.g. {missing[:3]}"
        )


def load_models(run, cfg, vocab_size, device="cpu"):
    """The base, and base + strategy + the run's delta (strategies.py). sdpa: math's numbers, 25%
    faster on CPU. A base that is not the one the run was trained on (its checksum in
    config.json) is refused by name."""
    saved = cfg.get("base_checksum")
    if saved and checksum(cfg["base"]) != saved:
        raise SystemExit(
            f"{cfg['base']} is not the base {run} was trained on (its checksum differs from the "
            f"base_checksum in {Path(run) / 'config.json'}): restore that base, or retrain the run"
        )
    base, cust = (
        BART.from_pretrained(cfg["base"], "sdpa", expect_vocab_size=vocab_size) for _ in range(2)
    )
    # the delta overwrites it
    options = {k: v for k, v in cfg.get("strategy_options", {}).items() if k != "init_ids"}
    strategies.apply(cust, cfg["strategy"], **options)
    load_trainable(cust, str(Path(run) / "best.safetensors"))
    return base.to(device).eval(), cust.to(device).eval()


def cached(folder, what, key, compute):
    """JSON computed once per key (any JSON value: everything the result depends on): read from
    folder/<what>-<sha256 of key>.json, else computed and written (atomically). A lock beside it
    makes concurrent runs (make -j) wait for the first one's result instead of computing it
    twice."""
    path = Path(folder) / f"{what}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        print(f"{what}: {'from ' + str(path) if path.is_file() else 'scoring'}")
        if not path.is_file():
            data.atomic_write(path, json.dumps(compute()))
        return json.loads(path.read_text())
