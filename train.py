"""
The training loop, flat and top to bottom (paper §3 and RQ3): the base model (the stand-in for AthenaTest, which
was never released) and the customization of a base model to one project with one strategy (§2.2-2.6), trained
"until the best validation loss is reached", with the compute of every step accounted in PF-s (§3.4, Figure 4).

    make base                                    # tiny preset: denoising stage, then pairs -> checkpoints/base
    make train STRATEGY=lldb [PROJECT=commons-io] [FOLD=0]      # customize, then score with evaluate.py
    python train.py --mode=customize --strategy=prefix --project=commons-io --fold=1 --lr=1e-3
    torchrun --nproc_per_node=2 train.py --mode=base             # data parallel (base training)

The base is trained as AthenaTest was (Tufano et al. 2020): first `denoise_steps` of BART text infilling on the
base projects' Java (data/denoise.py), then the supervised stage on their focal-method/test pairs, from the
denoised weights, with every `denoise_every`-th step a denoising batch still (the recipe: BASE_DEFAULTS; what was
tried: README, "The base model"). Every evaluation logs `source_gain`, the perplexity of the validation targets with another focal
class's source over the perplexity with their own: 1.0 means the model ignores its input (docs/source-gain.md).

A run folder runs/<name>/ holds config.json (everything needed to rerun), log.jsonl (one line per evaluation),
best.safetensors (trainable tensors only, at the best validation loss), last.pt (resume state);
metrics.json and predictions.jsonl are written by evaluate.py. A rerun with the same name and settings resumes
from last.pt. The base checkpoint carries training.json: the focal context, lengths and tokenizer it learned
with, which customization and evaluation read (a different one given on the command line is an error).
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import data
import evaluate
import flops
import runs
import strategies
from data import denoise
from data.tokenizer import EOS, PAD, SPECIAL_IDS, encode_pairs, load_tokenizer
from model import BART, config_from_preset

# -----------------------------------------------------------------------------
# settings: override any of them as --key=value (type-checked, unknown keys rejected); the resolved config is
# printed and saved in the run folder. lr=0 picks the strategy's default from LR below.
settings = dict(
    mode="customize",  # "base": train `preset` from scratch on the base projects; "customize": adapt `base`
    name="",  # the run folder runs/<name>; default "base", or <project>-<strategy>-f<fold>
    out_dir="runs",
    project=data.DEFAULT_TARGET,  # customize: a target of data/projects.tsv, a records .jsonl, or a mined checkout
    base_projects=",".join(data.DEFAULT_BASE),  # base: project names, separated by commas or spaces
    fold=0,  # customize: the held-out fold of k_folds (paper: 4-fold cross-validation per project)
    k_folds=4,
    seed=0,
    # what the model reads; customize: "" / 0 = the base's own (training.json), anything else must agree with it
    tokenizer="",  # "" = data/cache/tokenizer.json for a base trained here
    focal_context="",  # fm | fm_fc | fm_fc_co | fm_fc_ms | fm_fc_ms_ff (methods2test's levels); base default fm_fc
    max_src_len=0,  # BPE tokens; base default 128 (the paper's AthenaTest: fm_fc_ms_ff, 1024)
    max_tgt_len=0,  # base default 128
    preset="tiny",  # base: the architecture (model.PRESETS)
    base="checkpoints/base",  # customize: the base model, an HF directory or a fairseq .pt
    save_base="checkpoints/base",  # base: where the best model is saved (HF layout + training.json)
    attn_impl="auto",  # math | sdpa | triton; auto = triton on GPU (sdpa if attention_dropout > 0), sdpa on CPU
    strategy="lldb",  # custom | leo | lldb | prefix | lora
    prefix_len=strategies.PREFIX_LEN,  # prefix: P virtual keys/values per attention site (paper: 200)
    prefix_sites=",".join(strategies.SITES),  # prefix: site kinds (36 sites on bart-large; the paper counts 24)
    prefix_mlp=0,  # prefix: hidden size of Li & Liang's reparametrization MLP (0 = none)
    lora_rank=strategies.LORA_RANK,
    batch_size=16,
    grad_accum=1,  # micro-batches per optimizer step
    lr=0.0,
    min_lr_ratio=0.1,  # cosine decay to lr * min_lr_ratio at the end of each stage
    warmup_steps=50,  # linear warmup at the start of each stage
    weight_decay=0.01,  # AdamW, on matrices only (not biases, LayerNorms, embeddings or prefixes)
    beta2=0.98,
    grad_clip=1.0,
    dropout=0.1,
    attention_dropout=0.0,  # replaces the checkpoint's value (the Triton kernel has none: it needs 0)
    denoise_steps=0,  # base: steps of BART text infilling before the supervised stage (make base sets it)
    denoise_every=0,  # base: every k-th supervised step is a denoising step instead (0 = none)
    encoder_delay=0,  # steps before the encoder's own tensors train (then they warm up): see encoder_lr
    denoise_batch_size=0,  # denoising: windows per batch (0 = batch_size; short windows: more of them)
    denoise_window=0,  # denoising: tokens per window (0 = as long as the model's sources and targets allow)
    mask_ratio=0.3,  # denoising: share of tokens masked, in spans of Poisson(poisson_lambda) length (BART §2.2)
    poisson_lambda=3.0,
    max_steps=2000,  # all stages together
    max_minutes=0.0,  # stop (and keep the best checkpoint) after this long; 0 = no limit
    eval_interval=25,  # steps between validation losses (each writes a log line and the resume state)
    patience=6,  # early stopping: evaluations without a better validation loss (supervised stage only)
    device="auto",
)
LR = {"base": 1e-3, "custom": 2e-4, "leo": 1e-3, "lldb": 1e-3, "prefix": 3e-3, "lora": 2e-3}  # from a small sweep
# --mode=base: these replace the defaults above (any of them given on the command line wins): the recipe of the
# README's "The base model" section, measured on 2 CPU cores
BASE_DEFAULTS = dict(tokenizer="data/cache/tokenizer.json", focal_context="fm_fc", max_src_len=128, max_tgt_len=128,
                     denoise_steps=400, denoise_every=4, denoise_window=32, denoise_batch_size=48, encoder_delay=100,
                     max_steps=1400, warmup_steps=100, eval_interval=100, patience=6)
# a base without training.json (real BART or AthenaTest weights): what AthenaTest read
FOREIGN_BASE = dict(tokenizer="data/cache/tokenizer.json", focal_context="fm_fc_ms_ff", max_src_len=1024, max_tgt_len=1024)
RESUMABLE = ("max_steps", "max_minutes", "patience", "eval_interval", "device")  # may change when a run resumes


def parse_args(argv, defaults):
    """--key=value settings -> (cfg, the keys given), checked, with the mode's defaults filled in."""
    cfg, given = runs.parse_settings(argv, defaults)
    if cfg["mode"] not in ("base", "customize"):
        raise SystemExit(f"mode must be 'base' or 'customize', got {cfg['mode']!r}")
    cfg["strategy"] = "custom" if cfg["mode"] == "base" else cfg["strategy"]
    if cfg["strategy"] not in strategies.STRATEGIES:
        raise SystemExit(f"unknown strategy {cfg['strategy']!r}; valid: {', '.join(strategies.STRATEGIES)}")
    if cfg["focal_context"] and cfg["focal_context"] not in data.FOCAL_CONTEXTS:
        raise SystemExit(f"focal_context must be one of {', '.join(data.FOCAL_CONTEXTS)}, got {cfg['focal_context']!r}")
    if cfg["mode"] == "customize" and (cfg["denoise_steps"] or cfg["denoise_every"]):
        raise SystemExit("denoising is part of the base (--mode=base); a customization is supervised only")
    if cfg["attn_impl"] == "triton" and cfg["attention_dropout"] > 0:
        raise SystemExit(f"attn_impl=triton has no attention dropout but attention_dropout={cfg['attention_dropout']}:"
                         f" set --attention_dropout=0 or --attn_impl=sdpa")
    cfg["lr"] = cfg["lr"] or LR["base" if cfg["mode"] == "base" else cfg["strategy"]]
    project = os.path.splitext(os.path.basename(os.path.normpath(cfg["project"])))[0]
    cfg["name"] = cfg["name"] or ("base" if cfg["mode"] == "base" else f"{project}-{cfg['strategy']}-f{cfg['fold']}")
    if cfg["mode"] == "base":
        cfg.update({k: v for k, v in BASE_DEFAULTS.items() if k not in given})
        if cfg["denoise_steps"] >= cfg["max_steps"]:
            raise SystemExit(f"denoise_steps={cfg['denoise_steps']} leaves no supervised step of max_steps={cfg['max_steps']}"
                             f": raise --max_steps or lower --denoise_steps")
    return cfg, given


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


def batches(lengths, batch_size, seed, epoch, bucket=64):
    """This epoch's batches of example indices. A permutation seeded by (seed, epoch) is cut into chunks of
    `bucket` batches; each chunk is sorted by length and cut into batches, and the batches are shuffled: batches
    of similar lengths (little padding) in a random order. The same on every machine, so a resumed run sees
    exactly the batches it would have seen. lengths[i]: the cost of example i (source + target tokens)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm, n = torch.randperm(len(lengths), generator=g).tolist(), len(lengths) - len(lengths) % batch_size
    chunks = [sorted(perm[i:i + bucket * batch_size], key=lambda j: lengths[j]) for i in range(0, n, bucket * batch_size)]
    out = [c[i:i + batch_size] for c in chunks for i in range(0, len(c) - batch_size + 1, batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()] or [perm]


def loss_fn(model, batch, autocast):
    """Mean cross-entropy per target token. The output layer runs on the real target positions only (pads would
    cost V = 8192 columns each and be thrown away)."""
    ids, mask, dec, labels = batch
    real = labels != -100
    with autocast:
        logits = model(ids, mask, dec, logits_at=real)  # (N real positions, V)
    return F.cross_entropy(logits.float(), labels[real])


def source_check(model, val, cfg, device, autocast, n_gain=128, n_spread=8):
    """Does the model read its input (docs/source-gain.md)? val_loss: the mean validation loss per target token
    with each pair's own source (EOS included; the early-stopping criterion). On n_gain pairs taken evenly through
    the validation set also with the source of another focal class and with an empty source: source_gain =
    exp(other - own) on those pairs, exactly 1.0 for a model that ignores its input. encoder_spread: the std across
    n_spread inputs of the encoder's output states (first L positions, L the shortest), averaged over positions and
    channels: it falls towards 0 as the encoder collapses (every input mapped to the same states)."""
    src, tgt, partner = val[0], [t[1:] for t in val[1]], val[2]  # evaluate's targets: t1..tn </s>, no <s>
    mean = lambda nll: sum(s for s, _ in nll) / sum(n for _, n in nll)
    sub = list(range(len(src)))[::max(1, len(src) // n_gain)][:n_gain]  # evenly through the class-ordered pairs
    model.eval()
    with autocast:
        own = evaluate.target_nll(model, src, tgt, 2 * cfg["batch_size"], device)
        sides = evaluate.source_nll(model, [src[i] for i in sub], [tgt[i] for i in sub], [src[partner[i]] for i in sub],
                                    2 * cfg["batch_size"], device)
        ids, mask, _, _ = collate(src[:n_spread], val[1][:n_spread], device)
        spread = model.encode(ids, mask)[:, :int(mask.sum(1).min())].float().std(dim=0).mean().item()
    model.train()
    return dict(val_loss=mean(own), val_loss_other_source=mean(sides[1]), val_loss_empty_source=mean(sides[2]),
                source_gain=math.exp(mean(sides[1]) - mean(sides[0])), encoder_spread=spread)


def stage_of(step, cfg):
    """(stage, first step of the stage, steps in the stage): denoising for the first denoise_steps, then pairs."""
    D = cfg["denoise_steps"]
    return ("denoise", 0, D) if step < D else ("supervised", D, cfg["max_steps"] - D)


def get_lr(step, cfg):
    """Per stage: linear warmup, then cosine decay to lr * min_lr_ratio at the stage's end."""
    _, start, n = stage_of(step, cfg)
    s = step - start
    if s < cfg["warmup_steps"]:
        return cfg["lr"] * (s + 1) / cfg["warmup_steps"]
    progress = min(1.0, (s - cfg["warmup_steps"]) / max(1, n - cfg["warmup_steps"]))
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def encoder_lr(step, cfg):
    """The encoder's layers wait encoder_delay steps (lr 0), then warm up over warmup_steps to the schedule."""
    s = step - cfg["encoder_delay"]
    if cfg["encoder_delay"] == 0:
        return get_lr(step, cfg)
    return 0.0 if s < 0 else get_lr(step, cfg) * min(1.0, (s + 1) / cfg["warmup_steps"])


def main(argv):
    cfg, given = parse_args(argv, settings)
    if cfg["mode"] == "customize":
        cfg = runs.base_settings(cfg, given, FOREIGN_BASE)
        cfg["base_checksum"] = runs.checksum(cfg["base"])  # a resume onto another base (same path) is refused
    ddp = "RANK" in os.environ  # launched by torchrun: data parallel (base training)
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    cuda = cfg["device"].startswith("cuda") or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cfg["device"] == "auto" and cuda else cfg["device"].replace("auto", "cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL: every rank its own GPU, not all on cuda:0
    if ddp:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    torch.manual_seed(cfg["seed"] + rank)  # dropout masks differ across ranks; the data order is seeded apart

    # data: records -> splits -> token ids, in the focal context the base reads (src_<focal_context>)
    tok, key = load_tokenizer(cfg["tokenizer"]), f"src_{cfg['focal_context']}"
    if cfg["mode"] == "base":  # the base has no test fold: 5% of its test classes validate
        records = data.load_projects(cfg["base_projects"].replace(",", " ").split())
        (train_r, val_r), test_r = data.holdout(records, seed=cfg["seed"]), []
    else:
        train_r, val_r, test_r = data.folds(data.load_project(cfg["project"]), cfg["fold"], cfg["k_folds"], cfg["seed"])
    if not train_r or not val_r:
        raise SystemExit(f"the training or validation split of {cfg['project'] if cfg['mode'] == 'customize' else 'the base'}"
                         f" (fold {cfg['fold']}) is empty: the project has too few test classes")
    train_src, train_tgt, n_trunc = encode_pairs(tok, train_r, cfg["max_src_len"], cfg["max_tgt_len"], src_key=key)
    val = (*encode_pairs(tok, val_r, cfg["max_src_len"], cfg["max_tgt_len"], src_key=key)[:2], data.other_class_partners(val_r))
    if cfg["denoise_steps"] or cfg["denoise_every"]:  # text: the training records' Java, never the validation's
        noise = dict(ratio=cfg["mask_ratio"], poisson_lambda=cfg["poisson_lambda"])
        width = cfg["denoise_window"] or min(cfg["max_src_len"], cfg["max_tgt_len"]) - 2
        dn_windows, dn_val = denoise.stage(tok, train_r, val_r, cfg["focal_context"], width, cfg["seed"], **noise)

    run = runs.open_run(cfg["out_dir"], cfg["name"])  # after the data: a bad input leaves no empty run folder

    # model: from scratch (base) or the base checkpoint + a strategy (customize)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    attn_impl = cfg["attn_impl"] if cfg["attn_impl"] != "auto" else "triton" if cuda and not cfg["attention_dropout"] else "sdpa"
    if cuda and cfg["attn_impl"] == "auto" and attn_impl == "sdpa":
        print(f"attention: sdpa, not the Triton kernel, which has no attention dropout (attention_dropout="
              f"{cfg['attention_dropout']}; --attention_dropout=0 selects the kernel)")
    options, over = strategy_options(cfg), dict(dropout=cfg["dropout"], attention_dropout=cfg["attention_dropout"])
    if cfg["mode"] == "base":
        model = BART(config_from_preset(cfg["preset"], vocab_size=tok.get_vocab_size(), attn_impl=attn_impl, **over))
    else:
        model = BART.from_pretrained(cfg["base"], attn_impl=attn_impl, expect_vocab_size=tok.get_vocab_size())
        if master and model.config.attention_dropout != cfg["attention_dropout"]:
            print(f"attention_dropout: the checkpoint's {model.config.attention_dropout} replaced by this run's "
                  f"{cfg['attention_dropout']} (--attention_dropout)")
        model.config.__dict__.update(over)
    model.to(device)
    init = {}
    if cfg["strategy"] == "prefix":  # paper §2.5: initialized from the project's most frequent tokens
        init["init_ids"] = strategies.most_frequent_ids(train_src + train_tgt, cfg["prefix_len"], exclude=SPECIAL_IDS)
    strategies.apply(model, cfg["strategy"], **options, **init)
    params = strategies.trainable_parameters(model)
    # AdamW; weight decay on matrices only: not on biases, LayerNorms, embeddings or prefixes (named_parameters lists
    # the tied embedding once, as model.shared.weight); the encoder's tensors in groups of their own (encoder_delay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = lambda n, p: p.dim() >= 2 and not ("shared" in n or "embed" in n or n.startswith("prefix"))
    groups = [{"params": [p for n, p in named if decays(n, p) == d and n.startswith("model.encoder.") == e],
               "weight_decay": cfg["weight_decay"] if d else 0.0, "encoder": e} for d in (True, False) for e in (True, False)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg["lr"], betas=(0.9, cfg["beta2"]),
                                  **({"fused": True} if cuda else {"foreach": True}))
    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) if ddp else model

    # resume: last.pt holds the trainable tensors, optimizer, step, data position, RNG and early-stopping state
    state = dict(step=0, epoch=0, batch=0, dn_epoch=0, dn_batch=0, dn_steps=0, tokens=0, flops_exact=0.0, flops_paper=0.0,
                 best_val=float("inf"), best_step=-1, bad_evals=0, seconds=0.0)
    last, log = os.path.join(run, "last.pt"), os.path.join(run, "log.jsonl")
    runs.resume(run, cfg, RESUMABLE, model, optimizer, state, rank, world, device)  # a fresh start if no last.pt
    if master:
        saved = runs.write_config(run, {**cfg, "strategy_options": options, "corpus": cfg["project"],
                                        "resolved": dict(device=device, attn_impl=attn_impl),
                                        "trainable_parameters": sum(p.numel() for p in params),
                                        "total_parameters": model.num_parameters(), "truncated_training_pairs": n_trunc,
                                        "splits": dict(train=len(train_r), val=len(val_r), test=len(test_r))})
        print(f"parameters: {model.num_parameters():,} total, {saved['trainable_parameters']:,} trainable; {len(train_r)} "
              f"training pairs ({n_trunc} truncated), {len(val_r)} validation pairs"
              + (f"; denoising: {len(dn_windows)} windows of <= {width} tokens" if cfg["denoise_steps"] or cfg["denoise_every"] else ""))

    def checkpoint():  # all ranks call it: every rank's generators are gathered into last.pt
        rng = runs.gather(runs.rng_states(device), ddp, world)
        if master:
            runs.save_state(last, runs.trainable_state_dict(model), optimizer, state, rng)

    def validate(stage):
        """Validation at the current step: a log line, the best checkpoint (supervised stage), the resume state."""
        check = source_check(model, val, cfg, device, autocast)
        if stage == "denoise":  # the loss is the reconstruction of noised validation Java; denoise_gain: with another
            dn = source_check(model, dn_val, cfg, device, autocast)  # window's source (how much of it is copied)
            check = dict(check, val_loss=dn["val_loss"], denoise_gain=dn["source_gain"], pairs_val_loss=check["val_loss"])
        state["seconds"] = time.time() - t0
        better = stage == "supervised" and check["val_loss"] < state["best_val"]
        if better:
            state.update(best_val=check["val_loss"], best_step=state["step"], bad_evals=0)
        state["bad_evals"] += stage == "supervised" and not better
        if master:
            line = dict(step=state["step"], stage=stage, denoising_steps=state["dn_steps"], tokens=state["tokens"],
                        flops_exact=state["flops_exact"], flops_paper=state["flops_paper"], pf_s_exact=state["flops_exact"] / 1e15,
                        pf_s_paper=state["flops_paper"] / 1e15, train_loss=train_loss, **check,
                        seconds=round(state["seconds"], 2))
            with open(log, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"step {state['step']} ({stage}): val loss {check['val_loss']:.4f}{' (best)' if better else ''} | "
                  + (f"denoise_gain {check['denoise_gain']:.2f} | " if stage == "denoise" else "") +
                  f"source_gain {check['source_gain']:.3f} | empty-source loss {check['val_loss_empty_source']:.3f} | "
                  f"encoder spread {check['encoder_spread']:.3f}")
            if better:
                runs.save_trainable(model, os.path.join(run, "best.safetensors"))
        checkpoint()

    t0, t_step = time.time() - state["seconds"], time.time()
    train_loss, reason = float("nan"), state.get("done") or "max_steps"
    noised = [None, None, None]  # (denoising epoch, its noised sources, targets)
    if state["best_step"] < 0 and not state.get("done") and cfg["mode"] == "customize":  # (not again on resume)
        validate("supervised")  # step 0: the base itself is a candidate; a customization that only hurts keeps it
    model.train()
    while state["step"] < cfg["max_steps"] and not state.get("done"):
        stage = stage_of(state["step"], cfg)[0]
        lr = get_lr(state["step"], cfg)
        for g in optimizer.param_groups:
            g["lr"] = encoder_lr(state["step"], cfg) if g["encoder"] else lr
        step_loss, step_fl, step_tokens = 0.0, None, 0
        every = cfg["denoise_every"]  # in the supervised stage: every k-th step reconstructs Java instead
        noising = stage == "denoise" or (every > 0 and (state["step"] - cfg["denoise_steps"]) % every == every - 1)
        for micro in range(cfg["grad_accum"]):
            if noising:  # this epoch's noise on every window (seeded by the epoch: resumable)
                if noised[0] != state["dn_epoch"]:
                    noised[:] = state["dn_epoch"], *denoise.noised_pairs(tok, dn_windows, cfg["seed"], state["dn_epoch"], **noise)
                S, T, ek, bk, size = noised[1], noised[2], "dn_epoch", "dn_batch", cfg["denoise_batch_size"] or cfg["batch_size"]
            else:
                S, T, ek, bk, size = train_src, train_tgt, "epoch", "batch", cfg["batch_size"]
            plan = batches([len(s) + len(t) for s, t in zip(S, T)], size * world, cfg["seed"], state[ek])
            idx = plan[state[bk]][rank::world]
            state[bk] += 1
            if state[bk] == len(plan):
                state[ek], state[bk] = state[ek] + 1, 0
            src, tgt = [S[i] for i in idx], [T[i] for i in idx]
            loss = loss_fn(train_model, collate(src, tgt, device), autocast) / cfg["grad_accum"]
            loss.backward()
            step_loss += loss.item()
            fl = flops.step_flops(model.config, cfg["strategy"], [len(s) for s in src], [len(t) - 1 for t in tgt],
                                  **options)  # real (unpadded) lengths: the compute the tokens need
            step_fl = fl if step_fl is None else {c: {k: step_fl[c][k] + fl[c][k] for k in fl[c]} for c in fl}
            step_tokens += sum(len(t) - 1 for t in tgt)
        if not math.isfinite(step_loss):
            print(f"step {state['step']}: loss is {step_loss}; stopping. The last good checkpoint is {last}")
            reason = "non-finite loss"
            break
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = torch.tensor([step_tokens, step_fl["exact"]["total"], step_fl["paper"]["total"]], dtype=torch.float64)
        if ddp:  # what every rank ran, summed (ranks' batches differ in length)
            torch.distributed.all_reduce(done := done.to(device))
        state["step"] += 1
        state["dn_steps"] += noising
        state["tokens"] += int(done[0])
        state["flops_exact"] += float(done[1])
        state["flops_paper"] += float(done[2])
        train_loss = step_loss
        dt, t_step = time.time() - t_step, time.time()
        if master and (state["step"] % 5 == 0 or state["step"] == 1):
            print(f"step {state['step']:5d} | {'denoise' if noising else stage} | loss {step_loss:.4f} | lr {lr:.2e} | {dt * 1e3:.0f} ms | "
                  f"{float(done[0]) / dt:.0f} tok/s | {float(done[1]) / dt / 1e12:.3f} TFLOP/s | "
                  f"{state['flops_exact'] / 1e15:.4f} PF-s | eta <= {(cfg['max_steps'] - state['step']) * dt / 60:.1f} min")
        out_of_time = cfg["max_minutes"] > 0 and time.time() - t0 > cfg["max_minutes"] * 60
        stage_end = state["step"] in (cfg["denoise_steps"], cfg["max_steps"])
        if state["step"] % cfg["eval_interval"] == 0 or stage_end or out_of_time:
            validate(stage)
            if state["bad_evals"] >= cfg["patience"]:
                reason = f"early stopping: no better validation loss in {cfg['patience']} evaluations"
                break
            if out_of_time:
                reason = f"time limit of {cfg['max_minutes']} minutes"
                break
            t_step = time.time()  # the evaluation's time is not the next step's
    # restore the best checkpoint: the model that is kept and evaluated is the one at the best validation loss
    best = os.path.join(run, "best.safetensors")
    if not os.path.exists(best):
        raise SystemExit(f"no supervised validation loss was reached before stopping ({reason}); nothing saved in {run}")
    runs.load_trainable(model, best)
    if reason != "non-finite loss" and not state.get("done"):
        state["done"] = reason  # a finished run: rerunning it resumes into "nothing to do"
    checkpoint()
    if master:
        kept = "the base itself: no step beat it" if state["best_step"] == 0 and cfg["mode"] == "customize" else f"step {state['best_step']}"
        print(f"stopped at step {state['step']} ({reason}); best val loss {state['best_val']:.4f} ({kept}); "
              f"{state['flops_exact'] / 1e15:.4f} PF-s (exact), {state['flops_paper'] / 1e15:.4f} PF-s (paper); "
              f"{time.time() - t0:.0f} s")
        if cfg["mode"] == "base":
            runs.save_base(model, cfg, {k: cfg[k] for k in ("preset", "base_projects", "denoise_steps", "denoise_every", "max_steps", "lr")})
            print(f"base model saved to {cfg['save_base']}")
    if ddp:
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    data.cli(main, sys.argv[1:])
