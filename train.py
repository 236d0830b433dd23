"""
The training loop, flat and top to bottom (paper §3 and RQ3): the base model (the stand-in for AthenaTest, which
was never released) and the customization of a base model to one project with one strategy (§2.2-2.6), trained
"until the best validation loss is reached", with the compute of every step accounted in PF-s (§3.4, Figure 4).

    make base                                    # tiny preset from scratch on the base projects -> checkpoints/base
    make train STRATEGY=lldb [PROJECT=commons-io] [FOLD=0]      # customize, then score with evaluate.py
    python train.py --mode=customize --strategy=prefix --project=commons-io --fold=1 --lr=1e-3
    torchrun --nproc_per_node=2 train.py --mode=base             # data parallel (base training)

A run folder runs/<name>/ holds config.json (everything needed to rerun), log.jsonl (one line per evaluation),
best.safetensors (trainable tensors only, at the best validation loss), last.pt (resume state);
metrics.json and predictions.jsonl are written by evaluate.py. A rerun with the same name resumes from last.pt.
"""
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import flops
import strategies
from data.tokenizer import EOS, PAD, encode_pairs, load_tokenizer
from model import BART, config_from_preset

# -----------------------------------------------------------------------------
# settings: override any of them as --key=value (type-checked, unknown keys rejected); the resolved config is
# printed and saved in the run folder. lr=0 picks the strategy's default from LR below.
settings = dict(
    mode="customize",  # "base": train `preset` from scratch on the base projects; "customize": adapt `base`
    name="",  # the run folder runs/<name>; default "base", or <project>-<strategy>-f<fold>
    out_dir="runs",
    project=data.DEFAULT_TARGET,  # customize: a target of data/projects.tsv, a records .jsonl, or a mined checkout
    base_projects=",".join(data.DEFAULT_BASE),  # base: comma-separated project names
    fold=0,  # customize: the held-out fold of k_folds (paper: 4-fold cross-validation per project)
    k_folds=4,
    seed=0,
    tokenizer="data/cache/tokenizer.json",
    max_src_len=256,  # BPE tokens; the paper's AthenaTest used 1024 (CPU preset: shorter)
    max_tgt_len=128,
    preset="tiny",  # base: the architecture (model.PRESETS)
    base="checkpoints/base",  # customize: the base model, an HF directory or a fairseq .pt
    save_base="checkpoints/base",  # base: where the best model is saved (HF layout)
    attn_impl="auto",  # math | sdpa | triton; auto = triton on GPU, sdpa on CPU
    strategy="lldb",  # custom | leo | lldb | prefix | lora
    prefix_len=200,  # prefix: P virtual keys/values per attention site (paper: 200)
    prefix_sites="encoder,decoder,cross",  # prefix: site kinds (36 sites on bart-large; the paper counts 24)
    prefix_mlp=0,  # prefix: hidden size of Li & Liang's reparametrization MLP (0 = none)
    lora_rank=8,
    batch_size=16,
    grad_accum=1,  # micro-batches per optimizer step
    lr=0.0,
    min_lr_ratio=0.1,  # cosine decay to lr * min_lr_ratio at max_steps
    warmup_steps=50,
    weight_decay=0.01,  # AdamW, on matrices only (not biases, LayerNorms, embeddings or prefixes)
    beta2=0.98,
    grad_clip=1.0,
    dropout=0.1,
    max_steps=2000,
    max_minutes=0.0,  # stop (and keep the best checkpoint) after this long; 0 = no limit
    eval_interval=25,  # steps between validation losses (each writes a log line and the resume state)
    patience=6,  # early stopping: evaluations without a better validation loss
    device="auto",
)
LR = {"base": 1e-3, "custom": 2e-4, "leo": 1e-3, "lldb": 1e-3, "prefix": 3e-3, "lora": 2e-3}  # from a small sweep


def parse_args(argv, defaults):
    cfg = dict(defaults)
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
    if cfg["mode"] not in ("base", "customize"):
        raise SystemExit(f"mode must be 'base' or 'customize', got {cfg['mode']!r}")
    cfg["strategy"] = "custom" if cfg["mode"] == "base" else cfg["strategy"]
    if cfg["strategy"] not in strategies.STRATEGIES:
        raise SystemExit(f"unknown strategy {cfg['strategy']!r}; valid: {', '.join(strategies.STRATEGIES)}")
    cfg["lr"] = cfg["lr"] or LR["base" if cfg["mode"] == "base" else cfg["strategy"]]
    project = os.path.splitext(os.path.basename(os.path.normpath(cfg["project"])))[0]
    cfg["name"] = cfg["name"] or ("base" if cfg["mode"] == "base" else f"{project}-{cfg['strategy']}-f{cfg['fold']}")
    return cfg


def strategy_options(cfg):
    """The keyword arguments of strategies.apply, as saved in config.json (evaluate.py rebuilds the model)."""
    if cfg["strategy"] == "prefix":
        return dict(prefix_len=cfg["prefix_len"], sites=tuple(cfg["prefix_sites"].split(",")), mlp_hidden=cfg["prefix_mlp"])
    return dict(r=cfg["lora_rank"]) if cfg["strategy"] == "lora" else {}


def collate(src, tgt, device):
    """Pad a list of (source, target) id lists into a batch. Targets are encoded <s> t1..tn </s>; as in fairseq's
    translation task (AthenaTest), the decoder reads </s> t1..tn and predicts t1..tn </s> (no <s>)."""
    y = [t[1:] for t in tgt]  # drop <s>
    S, T = max(map(len, src)), max(map(len, y))
    ids = torch.full((len(src), S), PAD, dtype=torch.long)
    dec = torch.full((len(src), T), PAD, dtype=torch.long)
    labels = torch.full((len(src), T), -100, dtype=torch.long)  # -100: ignored by cross_entropy (padding)
    for i, (s, t) in enumerate(zip(src, y)):
        ids[i, :len(s)] = torch.tensor(s)
        dec[i, :len(t)] = torch.tensor([EOS] + t[:-1])
        labels[i, :len(t)] = torch.tensor(t)
    return ids.to(device), (ids != PAD).long().to(device), dec.to(device), labels.to(device)


def batches(n, batch_size, seed, epoch):
    """This epoch's batches of example indices: a permutation seeded by (seed, epoch), so the data order is the
    same on every machine and a resumed run sees exactly the batches it would have seen."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]


def loss_fn(model, batch, autocast):
    ids, mask, dec, labels = batch
    with autocast:
        logits = model(ids, mask, dec)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def estimate_loss(model, pairs, cfg, device, autocast):
    """Mean validation loss per target token (EOS included), the early-stopping criterion."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs[0]), cfg["batch_size"]):
        ids, mask, dec, labels = collate(pairs[0][i:i + cfg["batch_size"]], pairs[1][i:i + cfg["batch_size"]], device)
        with autocast:
            logits = model(ids, mask, dec)
        total += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train()
    return total / count


def get_lr(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"]))
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def write_text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)
    return write


def atomic_save(write, path):
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv):
    cfg = parse_args(argv, settings)
    ddp = "RANK" in os.environ  # launched by torchrun: data parallel (base training)
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = cfg["device"] if cfg["device"] != "auto" else (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if ddp:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    torch.manual_seed(cfg["seed"])
    run = os.path.join(cfg["out_dir"], cfg["name"])
    try:
        os.makedirs(run, exist_ok=True)
        tempfile.TemporaryFile(dir=run).close()
    except OSError as e:
        raise SystemExit(f"cannot write the run folder {run}: {e.strerror}; choose another --out_dir") from None

    # data: records -> splits -> token ids
    tok = load_tokenizer(cfg["tokenizer"])
    if cfg["mode"] == "base":
        records = data.load_projects(cfg["base_projects"].split(","))
        train_r, more, val_r = data.folds(records, 0, k=20, seed=cfg["seed"])  # one 20th of the classes validates
        train_r = train_r + more
    else:
        train_r, val_r, test_r = data.folds(data.load_project(cfg["project"]), cfg["fold"], cfg["k_folds"], cfg["seed"])
    for split, rs in (("training", train_r), ("validation", val_r)):
        if not rs:
            raise SystemExit(f"the {split} split of {cfg['project'] if cfg['mode'] == 'customize' else 'the base corpus'} "
                             f"(fold {cfg['fold']}) is empty: the project has too few test classes")
    *train_p, n_trunc = encode_pairs(tok, train_r, cfg["max_src_len"], cfg["max_tgt_len"])
    *val_p, _ = encode_pairs(tok, val_r, cfg["max_src_len"], cfg["max_tgt_len"])

    # model: from scratch (base) or the base checkpoint + a strategy (customize)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    attn_impl = cfg["attn_impl"] if cfg["attn_impl"] != "auto" else ("triton" if device.startswith("cuda") else "sdpa")
    options = strategy_options(cfg)
    if cfg["mode"] == "base":
        model = BART(config_from_preset(cfg["preset"], vocab_size=tok.get_vocab_size(), dropout=cfg["dropout"], attn_impl=attn_impl))
    else:
        model = BART.from_pretrained(cfg["base"], attn_impl=attn_impl, expect_vocab_size=tok.get_vocab_size())
        model.config.dropout = cfg["dropout"]
    model.to(device)
    init = {}
    if cfg["strategy"] == "prefix":  # paper §2.5: initialized from the project's most frequent tokens
        init["init_ids"] = strategies.most_frequent_ids(train_p[0] + train_p[1], cfg["prefix_len"], exclude=range(4))
    strategies.apply(model, cfg["strategy"], **options, **init)
    params = strategies.trainable_parameters(model)
    n_train = sum(p.numel() for p in params)
    # weight decay on matrices only: not on biases, LayerNorms, embeddings or prefixes (named_parameters lists the
    # tied embedding once, as model.shared.weight)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not ("shared" in n or "embed" in n or n.startswith("prefix"))]
    no_decay = [p for n, p in named if all(p is not q for q in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, cfg["beta2"]),
                                  fused=device.startswith("cuda"))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model

    # resume: last.pt holds the trainable tensors, optimizer, step, data position, RNG and early-stopping state
    state = dict(step=0, epoch=0, batch=0, tokens=0, flops_exact=0.0, flops_paper=0.0, best_val=float("inf"),
                 bad_evals=0, seconds=0.0)
    last = os.path.join(run, "last.pt")
    if os.path.exists(last):
        ck = torch.load(last, map_location=device, weights_only=True)
        try:
            strategies.load_trainable(model, ck["trainable"])
            optimizer.load_state_dict(ck["optimizer"])
        except ValueError as e:  # the run was started with another strategy, other options or an older trainer
            raise SystemExit(f"{last} does not match this run's trainable parameters ({e}); "
                             f"start a fresh run: delete {run} or choose another --name") from None
        state.update(ck["state"])
        torch.set_rng_state(ck["rng"])
        print(f"resumed {run} at step {state['step']} (best val loss {state['best_val']:.4f})")
        log = os.path.join(run, "log.jsonl")  # drop lines logged after the checkpoint (a kill between the two)
        if master and os.path.exists(log):
            lines = [x for x in open(log) if json.loads(x)["step"] <= state["step"]]
            atomic_save(write_text("".join(lines)), log)
    elif os.path.exists(os.path.join(run, "log.jsonl")):
        os.remove(os.path.join(run, "log.jsonl"))  # a fresh start: the old log is stale
    if master:
        saved = {**cfg, "strategy_options": options, "corpus": cfg["project"], "device": device, "attn_impl": attn_impl,
                 "trainable_parameters": n_train, "total_parameters": model.num_parameters(),
                 "truncated_training_pairs": n_trunc, "splits": {"train": len(train_r), "val": len(val_r)}}
        if cfg["mode"] == "base":
            saved["base"] = cfg["save_base"]
        else:
            saved["splits"]["test"] = len(test_r)
        atomic_save(write_text(json.dumps(saved, indent=2)), os.path.join(run, "config.json"))
        print(json.dumps(saved, indent=2))
        print(f"parameters: {model.num_parameters():,} total, {n_train:,} trainable; {len(train_r)} training pairs "
              f"({n_trunc} truncated), {len(val_r)} validation pairs")

    def checkpoint():
        trainable = strategies.trainable_state_dict(model)
        atomic_save(lambda p: torch.save(dict(trainable=trainable, optimizer=optimizer.state_dict(), state=dict(state),
                                              rng=torch.get_rng_state()), p), last)

    t0, t_step = time.time() - state["seconds"], time.time()
    train_loss, reason = float("nan"), state.get("done") or "max_steps"
    model.train()
    while state["step"] < cfg["max_steps"] and not state.get("done"):
        lr = get_lr(state["step"], cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss, step_fl = 0.0, None
        for micro in range(cfg["grad_accum"]):
            plan = batches(len(train_p[0]), cfg["batch_size"] * world, cfg["seed"], state["epoch"])
            idx = plan[state["batch"]][rank::world]
            state["batch"] += 1
            if state["batch"] == len(plan):
                state["epoch"], state["batch"] = state["epoch"] + 1, 0
            src, tgt = [train_p[0][i] for i in idx], [train_p[1][i] for i in idx]
            loss = loss_fn(train_model, collate(src, tgt, device), autocast) / cfg["grad_accum"]
            loss.backward()
            step_loss += loss.item()
            fl = flops.step_flops(model.config, cfg["strategy"], [len(s) for s in src], [len(t) - 1 for t in tgt],
                                  **options)  # real (unpadded) lengths: the compute the tokens need
            step_fl = fl if step_fl is None else {c: {k: step_fl[c][k] + fl[c][k] for k in fl[c]} for c in fl}
            state["tokens"] += sum(len(t) - 1 for t in tgt) * world
        if not math.isfinite(step_loss):
            print(f"step {state['step']}: loss is {step_loss}; stopping. The last good checkpoint is {last}")
            reason = "non-finite loss"
            break
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["flops_exact"] += step_fl["exact"]["total"] * world
        state["flops_paper"] += step_fl["paper"]["total"] * world
        train_loss = step_loss
        dt, t_step = time.time() - t_step, time.time()
        if master and (state["step"] % 5 == 0 or state["step"] == 1):
            eta = (cfg["max_steps"] - state["step"]) * dt / 60
            print(f"step {state['step']:5d} | loss {step_loss:.4f} | lr {lr:.2e} | {dt * 1e3:.0f} ms | "
                  f"{sum(len(t) - 1 for t in tgt) * world / dt:.0f} tok/s | {step_fl['exact']['total'] / dt / 1e12:.3f} "
                  f"TFLOP/s | {state['flops_exact'] / 1e15:.4f} PF-s | eta <= {eta:.1f} min")
        out_of_time = cfg["max_minutes"] > 0 and time.time() - t0 > cfg["max_minutes"] * 60
        if state["step"] % cfg["eval_interval"] == 0 or state["step"] == cfg["max_steps"] or out_of_time:
            val = estimate_loss(model, val_p, cfg, device, autocast)
            state["seconds"] = time.time() - t0
            better = val < state["best_val"]
            state["best_val"], state["bad_evals"] = (val, 0) if better else (state["best_val"], state["bad_evals"] + 1)
            if master:
                line = dict(step=state["step"], tokens=state["tokens"], flops_exact=state["flops_exact"],
                            flops_paper=state["flops_paper"], pf_s_exact=state["flops_exact"] / 1e15,
                            pf_s_paper=state["flops_paper"] / 1e15, train_loss=train_loss, val_loss=val,
                            seconds=round(state["seconds"], 2))
                with open(os.path.join(run, "log.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
                print(f"step {state['step']}: val loss {val:.4f}{' (best)' if better else ''}")
                if better:
                    strategies.save_trainable(model, os.path.join(run, "best.safetensors"))
                checkpoint()
            if state["bad_evals"] >= cfg["patience"]:
                reason = f"early stopping: no better validation loss in {cfg['patience']} evaluations"
                break
            if out_of_time:
                reason = f"time limit of {cfg['max_minutes']} minutes"
                break
    # restore the best checkpoint: the model that is kept and evaluated is the one at the best validation loss
    best = os.path.join(run, "best.safetensors")
    if not os.path.exists(best):
        raise SystemExit(f"no validation loss was reached before stopping ({reason}); nothing saved in {run}")
    strategies.load_trainable(model, best)
    if master and reason != "non-finite loss" and not state.get("done"):
        state["done"] = reason  # a finished run: rerunning it resumes into "nothing to do"
        checkpoint()
    if master:
        print(f"stopped at step {state['step']} ({reason}); best val loss {state['best_val']:.4f}; "
              f"{state['flops_exact'] / 1e15:.4f} PF-s (exact), {state['flops_paper'] / 1e15:.4f} PF-s (paper); "
              f"{time.time() - t0:.0f} s")
        if cfg["mode"] == "base":
            model.save_pretrained(cfg["save_base"])
            print(f"base model saved to {cfg['save_base']}")
    if ddp:
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    main(sys.argv[1:])
