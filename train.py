"""The training loop, flat and top to bottom (paper §3 and RQ3): the base model (the stand-in for
AthenaTest, which was never released) and the customization of a base model to one project with one
strategy (§2.2-2.6), trained "until the best validation loss is reached", with the compute of every
step accounted in PF-s (§3.4, Figure 4).

    make base                                    # the shipped base's recipe, from scratch -> checkpoints/base-new
    make train STRATEGY=lldb [PROJECT=commons-io] [FOLD=0]      # customize, then score with evaluate.py
    python train.py --mode=customize --strategy=prefix --project=commons-io --fold=1 --lr=1e-3
    torchrun --nproc_per_node=2 train.py --mode=base             # data parallel (base training)

The base is trained as AthenaTest was (Tufano et al. 2020): first `denoise_steps` of BART text
infilling on the base projects' Java (data/denoise.py), then the supervised stage on their
focal-method/test pairs, from the denoised weights, with every `denoise_every`-th step a denoising
batch still (the recipe: BASE_DEFAULTS; what was tried: README, "The base model"). Every evaluation
logs `source_gain`, the perplexity of the validation targets with another focal class's source over
the perplexity with their own: 1.0 means the model ignores its input (docs/source-gain.md).

A run folder runs/<name>/ (runs.py: its files) resumes from last.pt when rerun with the same name
and settings; the base checkpoint carries training.json, what it learned with, which
customization and evaluation read."""

import functools
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import data
import evaluate
import flops
import runs
import strategies
from data import denoise
from data.tokenizer import EOS, PAD, SPECIAL_IDS, encode_pairs, load_tokenizer
from model import BART, config_from_preset

# -----------------------------------------------------------------------------
# settings: override any of them as --key=value (type-checked, unknown keys rejected); the resolved
# config is printed and saved in the run folder. lr=0 picks the strategy's default from LR below.
settings = dict(
    # "base": train `preset` from scratch on the base projects; "customize": adapt `base`
    mode="customize",
    name="",  # the run folder runs/<name>; default "base", or <project>-<strategy>-f<fold>
    out_dir="runs",
    # customize: a target of data/projects.tsv, a records .jsonl, or a mined checkout
    project=data.DEFAULT_TARGET,
    base_projects=",".join(data.DEFAULT_BASE),  # base: project names, separated by commas or spaces
    fold=0,  # customize: the held-out fold of k_folds (paper: 4-fold cross-validation per project)
    k_folds=4,
    seed=0,
    # what the model reads; customize: "" / 0 = the base's own (training.json), anything else must
    # agree with it
    tokenizer="",  # "" = data/cache/tokenizer.json for a base trained here
    # fm | fm_fc | fm_fc_co | fm_fc_ms | fm_fc_ms_ff (methods2test's levels); base default fm_fc
    focal_context="",
    max_src_len=0,  # BPE tokens; base default 128 (the paper's AthenaTest: fm_fc_ms_ff, 1024)
    max_tgt_len=0,  # base default 128
    preset="tiny",  # base: the architecture (model.PRESETS)
    base="checkpoints/base",  # customize: the base model, an HF directory or a fairseq .pt
    save_base="checkpoints/base",  # base: where the best model is saved (HF layout + training.json)
    # math | sdpa | triton; auto = triton on GPU (sdpa if attention_dropout > 0), sdpa on CPU
    attn_impl="auto",
    strategy="lldb",  # custom | leo | lldb | prefix | lora
    # prefix: P virtual keys/values per attention site (paper: 200)
    prefix_len=strategies.PREFIX_LEN,
    # prefix: site kinds (36 sites on bart-large; the paper counts 24)
    prefix_sites=",".join(strategies.SITES),
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
    # replaces the checkpoint's value (the Triton kernel has none: it needs 0)
    attention_dropout=0.0,
    # base: steps of BART text infilling before the supervised stage (make base sets it)
    denoise_steps=0,
    denoise_every=0,  # base: every k-th supervised step is a denoising step instead (0 = none)
    # steps before the encoder's own tensors train (then they warm up): see encoder_lr
    encoder_delay=0,
    # denoising: windows per batch (0 = batch_size; short windows: more of them)
    denoise_batch_size=0,
    # denoising: tokens per window (0 = as long as the model's sources and targets allow)
    denoise_window=0,
    # denoising: "pairs" (the focal methods and tests) or "all" (every .java file of the base)
    denoise_text="pairs",
    # denoising text "all": at most this many characters of Java (data/denoise.py)
    denoise_chars=60_000_000,
    # denoising: share of tokens masked, in spans of Poisson(poisson_lambda) length (BART §2.2)
    mask_ratio=0.3,
    poisson_lambda=3.0,
    # pairs: share of the decoder's input tokens replaced by <mask> (data/denoise.word_dropout)
    word_dropout=0.0,
    max_steps=2000,  # all stages together
    max_minutes=0.0,  # stop (and keep the best checkpoint) after this long; 0 = no limit
    # steps between validation losses (each writes a log line and the resume state)
    eval_interval=25,
    # early stopping: evaluations without a better validation loss (supervised stage only)
    patience=6,
    device="auto",
    # fp32 | bf16 | auto. bf16: autocast runs the matmuls in bf16, the weights and AdamW's state
    # stay fp32. auto = bf16 where the hardware multiplies bf16 natively (a GPU; a CPU with
    # AVX512-BF16 or AMX), else fp32
    dtype="auto",
)
# from a small sweep
LR = {"base": 1e-3, "custom": 2e-4, "leo": 1e-3, "lldb": 1e-3, "prefix": 3e-3, "lora": 2e-3}
# --mode=base: these replace the defaults above (any of them given on the command line wins): the
# recipe of the shipped base, checkpoints/base/ (its training.json records the run;
# docs/experiments.md, "The shipped base")
BASE_DEFAULTS = dict(
    tokenizer="data/cache/tokenizer.json",
    focal_context="fm_fc",
    max_src_len=128,
    max_tgt_len=128,
    preset="small",
    lr=5e-4,
    warmup_steps=200,
    denoise_text="all",
    denoise_steps=1000,
    denoise_every=4,
    denoise_window=32,
    denoise_batch_size=48,
    encoder_delay=100,
    max_steps=4400,
    eval_interval=250,
    patience=20,
)
# a base without training.json (real BART or AthenaTest weights): what AthenaTest read
FOREIGN_BASE = dict(
    tokenizer=BASE_DEFAULTS["tokenizer"],
    focal_context="fm_fc_ms_ff",
    max_src_len=1024,
    max_tgt_len=1024,
)
# every numeric setting's range, checked when the settings are parsed (before any data is read or
# file written): setting -> (the rule, as the error says it, the test)
BOUNDS = {
    "fold": ("an integer >= 0 and < k_folds", lambda v, c: 0 <= v < c["k_folds"]),
    "k_folds": ("an integer >= 2", lambda v, c: v >= 2),
    "seed": ("an integer >= 0", lambda v, c: v >= 0),
    "max_src_len": ("0 (the base's) or an integer >= 4", lambda v, c: v == 0 or v >= 4),
    "max_tgt_len": ("0 (the base's) or an integer >= 4", lambda v, c: v == 0 or v >= 4),
    "prefix_len": ("an integer >= 1", lambda v, c: v >= 1),
    "prefix_mlp": ("an integer >= 0", lambda v, c: v >= 0),
    "lora_rank": ("an integer >= 1", lambda v, c: v >= 1),
    "batch_size": ("an integer >= 1", lambda v, c: v >= 1),
    "grad_accum": ("an integer >= 1", lambda v, c: v >= 1),
    "lr": ("0 (the strategy's default) or a number > 0", lambda v, c: v >= 0),
    "min_lr_ratio": ("a number in [0, 1]", lambda v, c: 0 <= v <= 1),
    "warmup_steps": ("an integer >= 1", lambda v, c: v >= 1),
    "weight_decay": ("a number >= 0", lambda v, c: v >= 0),
    "beta2": ("a number in (0, 1)", lambda v, c: 0 < v < 1),
    "grad_clip": ("a number > 0 (the largest gradient norm)", lambda v, c: v > 0),
    "dropout": ("a number in [0, 1)", lambda v, c: 0 <= v < 1),
    "attention_dropout": ("a number in [0, 1)", lambda v, c: 0 <= v < 1),
    "denoise_steps": ("an integer >= 0", lambda v, c: v >= 0),
    "denoise_every": ("an integer >= 0", lambda v, c: v >= 0),
    "encoder_delay": ("an integer >= 0", lambda v, c: v >= 0),
    "denoise_batch_size": ("an integer >= 0", lambda v, c: v >= 0),
    "denoise_window": (
        "0 (as long as the lengths allow) or an integer >= 4",
        lambda v, c: v == 0 or v >= 4,
    ),
    "denoise_chars": ("an integer >= 1", lambda v, c: v >= 1),
    "mask_ratio": ("a number in (0, 1)", lambda v, c: 0 < v < 1),
    "poisson_lambda": ("a number > 0", lambda v, c: v > 0),
    "word_dropout": ("a number in [0, 1]", lambda v, c: 0 <= v <= 1),
    "max_steps": ("an integer >= 1", lambda v, c: v >= 1),
    "max_minutes": ("a number >= 0 (0: no limit)", lambda v, c: v >= 0),
    "eval_interval": ("an integer >= 1", lambda v, c: v >= 1),
    "patience": ("an integer >= 1", lambda v, c: v >= 1),
}
# may change when a run resumes
RESUMABLE = ("max_steps", "max_minutes", "patience", "eval_interval", "device")


def parse_args(argv, defaults):
    """--key=value settings -> (cfg, the keys given), checked, with the mode's defaults filled
    in."""
    cfg, given = runs.parse_settings(argv, defaults)
    if cfg["mode"] not in ("base", "customize"):
        raise SystemExit(f"mode must be 'base' or 'customize', got {cfg['mode']!r}")
    cfg["strategy"] = "custom" if cfg["mode"] == "base" else cfg["strategy"]
    if cfg["strategy"] not in strategies.STRATEGIES:
        raise SystemExit(
            f"unknown strategy {cfg['strategy']!r}; valid: {', '.join(strategies.STRATEGIES)}"
        )
    if cfg["focal_context"] and cfg["focal_context"] not in data.FOCAL_CONTEXTS:
        raise SystemExit(
            f"focal_context must be one of {', '.join(data.FOCAL_CONTEXTS)}, got {cfg['focal_context']!r}"
        )
    if cfg["mode"] == "customize" and (cfg["denoise_steps"] or cfg["denoise_every"]):
        raise SystemExit(
            "denoising is part of the base (--mode=base); a customization is supervised only"
        )
    for key, (rule, ok) in BOUNDS.items():
        if not ok(cfg[key], cfg):
            raise SystemExit(f"--{key}={cfg[key]}: must be {rule}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg["device"]):
        raise SystemExit(f"--device={cfg['device']}: must be auto, cpu, cuda or cuda:N")
    if cfg["dtype"] not in ("auto", "fp32", "bf16"):
        raise SystemExit(f"dtype must be fp32, bf16 or auto, got {cfg['dtype']!r}")
    if cfg["attn_impl"] == "triton" and cfg["attention_dropout"] > 0:
        raise SystemExit(
            f"attn_impl=triton has no attention dropout but attention_dropout={cfg['attention_dropout']}:"
            f" set --attention_dropout=0 or --attn_impl=sdpa"
        )
    cfg["lr"] = cfg["lr"] or LR["base" if cfg["mode"] == "base" else cfg["strategy"]]
    project = os.path.splitext(os.path.basename(os.path.normpath(cfg["project"])))[0]
    cfg["name"] = cfg["name"] or (
        "base" if cfg["mode"] == "base" else f"{project}-{cfg['strategy']}-f{cfg['fold']}"
    )
    if cfg["mode"] == "base":
        cfg.update({k: v for k, v in BASE_DEFAULTS.items() if k not in given})
        if cfg["denoise_steps"] >= cfg["max_steps"]:
            raise SystemExit(
                f"denoise_steps={cfg['denoise_steps']} leaves no supervised step of max_steps="
                f"{cfg['max_steps']}: raise --max_steps or lower --denoise_steps"
            )
    return cfg, given


def strategy_options(cfg):
    """The keyword arguments of strategies.apply, as saved in config.json (evaluate.py rebuilds
    the model)."""
    if cfg["strategy"] == "prefix":
        return dict(
            prefix_len=cfg["prefix_len"],
            sites=tuple(cfg["prefix_sites"].split(",")),
            mlp_hidden=cfg["prefix_mlp"],
        )
    return dict(r=cfg["lora_rank"]) if cfg["strategy"] == "lora" else {}


def collate(src, tgt, device):
    """Pad a list of (source, target) id lists into a batch. Targets are encoded <s> t1..tn </s>;
    as in fairseq's translation task (AthenaTest), the decoder reads </s> t1..tn and predicts
    t1..tn </s> (no <s>)."""
    y = [t[1:] for t in tgt]  # drop <s>
    S, T = max(map(len, src)), max(map(len, y))
    ids = torch.full((len(src), S), PAD, dtype=torch.long)
    dec = torch.full((len(src), T), PAD, dtype=torch.long)
    # -100: ignored by cross_entropy (padding)
    labels = torch.full((len(src), T), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src, y)):
        ids[i, : len(s)] = torch.tensor(s)
        dec[i, : len(t)] = torch.tensor([EOS] + t[:-1])
        labels[i, : len(t)] = torch.tensor(t)
    return ids.to(device), (ids != PAD).long().to(device), dec.to(device), labels.to(device)


def batches(lengths, batch_size, seed, epoch, bucket=64):
    """This epoch's batches of example indices. A permutation seeded by (seed, epoch) is cut into
    chunks of `bucket` batches; each chunk is sorted by length and cut into batches, and the
    batches are shuffled: batches of similar lengths (little padding) in a random order. The same
    on every machine, so a resumed run sees exactly the batches it would have seen. lengths[i]:
    the cost of example i (source + target tokens)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm, n = (
        torch.randperm(len(lengths), generator=g).tolist(),
        len(lengths) - len(lengths) % batch_size,
    )
    chunk = bucket * batch_size
    chunks = [sorted(perm[i : i + chunk], key=lambda j: lengths[j]) for i in range(0, n, chunk)]
    out = [
        c[i : i + batch_size] for c in chunks for i in range(0, len(c) - batch_size + 1, batch_size)
    ]
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()] or [perm]


def loss_fn(model, batch, autocast):
    """Mean cross-entropy per target token. The output layer runs on the real target positions
    only (pads would cost V = 8192 columns each and be thrown away)."""
    ids, mask, dec, labels = batch
    real = labels != -100
    with autocast:
        logits = model(ids, mask, dec, logits_at=real)  # (N real positions, V)
    return F.cross_entropy(logits.float(), labels[real])


def source_check(model, val, cfg, device, autocast, n_gain=128, n_spread=8):
    """Does the model read its input (docs/source-gain.md)? val_loss: the mean validation loss
    per target token with each pair's own source (EOS included; the early-stopping criterion). On
    n_gain pairs taken evenly through the validation set also with the source of another focal
    class and with an empty source: source_gain = exp(other - own) on those pairs, exactly 1.0
    for a model that ignores its input. encoder_spread: the std across n_spread inputs of the
    encoder's output states (first L positions, L the shortest), averaged over positions and
    channels: it falls towards 0 as the encoder collapses (every input mapped to the same
    states)."""
    # evaluate's targets: t1..tn </s>, no <s>
    src, tgt, partner = val[0], [t[1:] for t in val[1]], val[2]

    def mean(nll):
        return sum(s for s, _ in nll) / sum(n for _, n in nll)

    # evenly through the class-ordered pairs
    sub = list(range(len(src)))[:: max(1, len(src) // n_gain)][:n_gain]
    model.eval()
    with autocast:
        own = evaluate.target_nll(model, src, tgt, 2 * cfg["batch_size"], device)
        sides = evaluate.source_nll(
            model,
            [src[i] for i in sub],
            [tgt[i] for i in sub],
            [src[partner[i]] for i in sub],
            2 * cfg["batch_size"],
            device,
        )
        ids, mask, _, _ = collate(src[:n_spread], val[1][:n_spread], device)
        spread = (
            model.encode(ids, mask)[:, : int(mask.sum(1).min())].float().std(dim=0).mean().item()
        )
    model.train()
    return dict(
        val_loss=mean(own),
        val_loss_other_source=mean(sides[1]),
        val_loss_empty_source=mean(sides[2]),
        source_gain=math.exp(mean(sides[1]) - mean(sides[0])),
        encoder_spread=spread,
    )


def native_bf16(cuda):
    """Does this machine multiply bf16 natively? A GPU does; a CPU does if it has AVX512-BF16 or
    AMX-BF16 (Linux lists them in /proc/cpuinfo). Elsewhere PyTorch emulates bf16 matmuls, slower
    than fp32."""
    if cuda:
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(cfg, cuda):
    """The run's compute dtype: --dtype, with auto resolved by native_bf16."""
    if cfg["dtype"] == "auto":
        return "bf16" if native_bf16(cuda) else "fp32"
    return cfg["dtype"]


def measure_peak(device, dtype, n=2048, reps=5):
    """This machine's matmul peak in FLOP/s: the best of `reps` timings of an n x n x n matmul in
    `dtype`, measured (not taken from a data sheet) so that MFU reads against what this CPU or
    GPU really does."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(2):  # warm-up (thread pool, AMX tile set-up, cuBLAS heuristics)
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best  # a multiply-add is 2 FLOPs (flops.py's convention)


def stage_of(step, cfg):
    """(stage, first step of the stage, steps in the stage): denoising for the first
    denoise_steps, then pairs."""
    D = cfg["denoise_steps"]
    return ("denoise", 0, D) if step < D else ("supervised", D, cfg["max_steps"] - D)


def get_lr(step, cfg, encoder=False):
    """Per stage: linear warmup, then cosine decay to lr * min_lr_ratio at the stage's end. The
    encoder's layers (encoder=True) wait encoder_delay steps (lr 0), then warm up over
    warmup_steps to that schedule."""
    if encoder and cfg["encoder_delay"]:
        s = step - cfg["encoder_delay"]
        return 0.0 if s < 0 else get_lr(step, cfg) * min(1.0, (s + 1) / cfg["warmup_steps"])
    _, start, n = stage_of(step, cfg)
    s = step - start
    if s < cfg["warmup_steps"]:
        return cfg["lr"] * (s + 1) / cfg["warmup_steps"]
    progress = min(1.0, (s - cfg["warmup_steps"]) / max(1, n - cfg["warmup_steps"]))
    return cfg["lr"] * (
        cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def main(argv):
    cfg, given = parse_args(argv, settings)
    if cfg["mode"] == "base":
        runs.check_save_base(cfg["save_base"])  # now, not after hours of training
    # what the base learned with, and its checksum (a resume onto another is refused)
    if cfg["mode"] == "customize":
        cfg = runs.base_settings(cfg, given, FOREIGN_BASE)
    # torchrun: data parallel (base training)
    ddp, rank, world, cuda, device, attn_impl = runs.resolve(cfg)
    master = rank == 0
    # dropout masks differ across ranks; the data order is seeded apart
    torch.manual_seed(cfg["seed"] + rank)

    # data: records -> splits -> token ids, in the focal context the base reads
    # (src_<focal_context>)
    tok, key, base = (
        load_tokenizer(cfg["tokenizer"]),
        f"src_{cfg['focal_context']}",
        cfg["mode"] == "base",
    )
    records = data.load_projects(
        cfg["base_projects"].replace(",", " ").split() if base else [cfg["project"]]
    )
    lacking = next((r for r in records if key not in r), None)
    if lacking is not None:
        raise SystemExit(
            f"record {lacking.get('id')!r} of {lacking.get('project')!r} has no {key!r}, the focal context "
            f"the base reads ({cfg['focal_context']}): mine the corpus again with `python -m data.mine`"
        )
    # the run is bound to these records: a resume (or a scoring) on a rewritten corpus is refused by
    # name
    cfg["corpus_checksum"] = data.records_checksum(records)
    # the base has no test fold: 5% of its test classes validate
    train_r, val_r, test_r = (
        (*data.holdout(records, seed=cfg["seed"]), [])
        if base
        else data.folds(records, cfg["fold"], cfg["k_folds"], cfg["seed"])
    )
    if not train_r or not val_r:
        raise SystemExit(
            f"the training or validation split of {'the base' if base else cfg['project']} (fold "
            f"{cfg['fold']}) is empty: the project has too few test classes"
        )
    train_src, train_tgt, n_trunc = encode_pairs(
        tok, train_r, cfg["max_src_len"], cfg["max_tgt_len"], src_key=key
    )
    val = (
        *encode_pairs(tok, val_r, cfg["max_src_len"], cfg["max_tgt_len"], src_key=key)[:2],
        data.other_class_partners(val_r),
    )
    # the streams of batches (noising or not): (pairs of an epoch, their epoch and batch counters in
    # state, batch size)
    streams = {False: (lambda epoch: (train_src, train_tgt), "epoch", "batch", cfg["batch_size"])}
    # text: the training records' Java, never the val's
    if denoising := cfg["denoise_steps"] or cfg["denoise_every"]:
        noise = dict(ratio=cfg["mask_ratio"], poisson_lambda=cfg["poisson_lambda"])
        width = cfg["denoise_window"] or min(cfg["max_src_len"], cfg["max_tgt_len"]) - 2
        dn_windows, dn_val = denoise.stage(
            tok,
            train_r,
            val_r,
            cfg["focal_context"],
            width,
            cfg["seed"],
            text=cfg["denoise_text"],
            max_chars=cfg["denoise_chars"],
            **noise,
        )
        # each epoch's noise on every window, seeded by the epoch: resumable
        noised = functools.lru_cache(1)(
            lambda epoch: denoise.noised_pairs(tok, dn_windows, cfg["seed"], epoch, **noise)
        )
        streams[True] = (
            noised,
            "dn_epoch",
            "dn_batch",
            cfg["denoise_batch_size"] or cfg["batch_size"],
        )

    # after the data: a bad input leaves no empty run folder
    run = runs.open_run(cfg["out_dir"], cfg["name"])
    if master:
        runs.lock_run(run)  # one writer per run folder

    # model: from scratch (base) or the base checkpoint + a strategy (customize)
    dtype = pick_dtype(cfg, cuda)
    autocast = torch.autocast(
        "cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"
    )
    peak = measure_peak(device, dtype)  # MFU's denominator: this machine, this dtype
    if master:
        why = (
            "native on this machine"
            if native_bf16(cuda)
            else "emulated on this CPU: slower than fp32"
        )
        print(
            f"dtype: {dtype}"
            + (f" autocast, fp32 master weights ({why})" if dtype == "bf16" else "")
            + f"; measured {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s (2048^3)"
        )
    model = (
        BART(
            config_from_preset(cfg["preset"], vocab_size=tok.get_vocab_size(), attn_impl=attn_impl)
        )
        if base
        else BART.from_pretrained(
            cfg["base"], attn_impl=attn_impl, expect_vocab_size=tok.get_vocab_size()
        )
    )
    if master and not base and model.config.attention_dropout != cfg["attention_dropout"]:
        print(
            f"attention_dropout: the checkpoint's {model.config.attention_dropout} replaced by this run's "
            f"{cfg['attention_dropout']} (--attention_dropout)"
        )
    model.config.__dict__.update(dropout=cfg["dropout"], attention_dropout=cfg["attention_dropout"])
    model.to(device)
    options, init = strategy_options(cfg), {}
    # paper §2.5: initialized from the project's most frequent tokens
    if cfg["strategy"] == "prefix":
        init["init_ids"] = strategies.most_frequent_ids(
            train_src + train_tgt, cfg["prefix_len"], exclude=SPECIAL_IDS
        )
    strategies.apply(model, cfg["strategy"], **options, **init)
    params = strategies.trainable_parameters(model)
    # AdamW; weight decay on matrices only: not on biases, LayerNorms, embeddings or prefixes
    # (named_parameters lists the tied embedding once, as model.shared.weight); the encoder's
    # tensors in groups of their own (encoder_delay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def decays(n, p):
        return p.dim() >= 2 and not ("shared" in n or "embed" in n or n.startswith("prefix"))

    groups = [
        {
            "params": [
                p for n, p in named if decays(n, p) == d and n.startswith("model.encoder.") == e
            ],
            "weight_decay": cfg["weight_decay"] if d else 0.0,
            "encoder": e,
        }
        for d in (True, False)
        for e in (True, False)
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg["lr"],
        betas=(0.9, cfg["beta2"]),
        **({"fused": True} if cuda else {"foreach": True}),
    )
    train_model = (
        DistributedDataParallel(model, device_ids=[device] if cuda else None) if ddp else model
    )

    # resume: last.pt holds the trainable tensors, optimizer, step, data position, RNG and
    # early-stopping state a fresh start if no last.pt
    state = runs.resume(run, cfg, RESUMABLE, model, optimizer, rank, world, device)
    if master:
        runs.write_config(
            run,
            {
                **cfg,
                "strategy_options": options,
                "corpus": cfg["project"],
                "resolved": dict(device=device, attn_impl=attn_impl, dtype=dtype),
                "trainable_parameters": sum(p.numel() for p in params),
                "total_parameters": model.num_parameters(),
                "truncated_training_pairs": n_trunc,
                "splits": dict(train=len(train_r), val=len(val_r), test=len(test_r)),
            },
            f"; denoising: {len(dn_windows)} windows of <= {width} tokens" if denoising else "",
        )

    # on every rank
    def checkpoint():
        return runs.save_state(run, model, optimizer, state, device, ddp, world, master)

    def validate(stage):
        """Validation at the current step: a log line, the best checkpoint (supervised stage),
        the resume state."""
        check = source_check(model, val, cfg, device, autocast)
        # the loss is the reconstruction of noised validation Java; denoise_gain: with another
        if stage == "denoise":
            # window's source (how much of it is copied)
            dn = source_check(model, dn_val, cfg, device, autocast)
            check.update(
                val_loss=dn["val_loss"],
                denoise_gain=dn["source_gain"],
                pairs_val_loss=check["val_loss"],
            )
        state["seconds"] = time.time() - t0
        if better := stage == "supervised" and check["val_loss"] < state["best_val"]:
            state.update(best_val=check["val_loss"], best_step=state["step"], bad_evals=0)
        state["bad_evals"] += stage == "supervised" and not better
        if master:
            runs.log_evaluation(run, state, stage, train_loss, check, better)
            if better:
                runs.save_trainable(model, os.path.join(run, "best.safetensors"))
        checkpoint()

    t0, t_step = time.time() - state["seconds"], time.time()
    train_loss, reason = float("nan"), state.get("done") or "max_steps"
    if state["best_step"] < 0 and not state.get("done") and not base:  # (not again on resume)
        # step 0: the base itself is a candidate; a customization that only hurts keeps it
        validate("supervised")
    model.train()
    while state["step"] < cfg["max_steps"] and not state.get("done"):
        stage = stage_of(state["step"], cfg)[0]
        lr = get_lr(state["step"], cfg)
        for g in optimizer.param_groups:
            g["lr"] = get_lr(state["step"], cfg, encoder=g["encoder"])
        step_loss, step_fl, step_tokens = 0.0, None, 0
        # in the supervised stage: every k-th step reconstructs Java instead
        every = cfg["denoise_every"]
        noising = stage == "denoise" or (
            every > 0 and (state["step"] - cfg["denoise_steps"]) % every == every - 1
        )
        for _micro in range(cfg["grad_accum"]):
            pairs, ek, bk, size = streams[noising]
            S, T = pairs(state[ek])
            plan = batches(
                [len(s) + len(t) for s, t in zip(S, T)], size * world, cfg["seed"], state[ek]
            )
            # this rank's share; the stream moves on to its next batch or epoch
            idx = plan[state[bk]][rank::world]
            state[ek], state[bk] = (
                (state[ek], state[bk] + 1) if state[bk] + 1 < len(plan) else (state[ek] + 1, 0)
            )
            src, tgt = [S[i] for i in idx], [T[i] for i in idx]
            batch = collate(src, tgt, device)
            # the labels stay; the decoder reads some of its inputs as <mask>
            if cfg["word_dropout"] and not noising:
                batch = (
                    *batch[:2],
                    denoise.word_dropout(batch[2], cfg["word_dropout"], tok.token_to_id("<mask>")),
                    batch[3],
                )
            loss = loss_fn(train_model, batch, autocast) / cfg["grad_accum"]
            loss.backward()
            step_loss += loss.item()
            fl = flops.step_flops(
                model.config,
                cfg["strategy"],
                [len(s) for s in src],
                [len(t) - 1 for t in tgt],
                **options,
            )  # real (unpadded) lengths: the compute the tokens need
            step_fl = (
                fl
                if step_fl is None
                else {c: {k: step_fl[c][k] + fl[c][k] for k in fl[c]} for c in fl}
            )
            step_tokens += sum(len(t) - 1 for t in tgt)
        if not math.isfinite(step_loss):
            print(
                f"step {state['step']}: loss is {step_loss}; stopping. The last good checkpoint is "
                f"{os.path.join(run, 'last.pt')}"
            )
            reason = "non-finite loss"
            break
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = torch.tensor(
            [step_tokens, step_fl["exact"]["total"], step_fl["paper"]["total"]], dtype=torch.float64
        )
        if ddp:  # what every rank ran, summed (ranks' batches differ in length)
            torch.distributed.all_reduce(done := done.to(device))
        ran = dict(
            step=1,
            dn_steps=noising,
            tokens=int(done[0]),
            flops_exact=float(done[1]),
            flops_paper=float(done[2]),
        )
        state.update({k: state[k] + v for k, v in ran.items()})  # the totals so far
        train_loss = step_loss
        dt, t_step = time.time() - t_step, time.time()
        if master and (state["step"] % 5 == 0 or state["step"] == 1):
            print(
                f"step {state['step']:5d} | {'denoise' if noising else stage} | loss {step_loss:.4f} | lr {lr:.2e} | "
                f"{dt * 1e3:.0f} ms | {float(done[0]) / dt:.0f} tok/s | {float(done[1]) / dt / 1e12:.3f} TFLOP/s | "
                f"MFU {float(done[1]) / dt / (peak * world):.1%} | "
                f"{state['flops_exact'] / 1e15:.4f} PF-s | "
                f"eta <= {(cfg['max_steps'] - state['step']) * dt / 60:.1f} min"
            )
        out_of_time = cfg["max_minutes"] > 0 and time.time() - t0 > cfg["max_minutes"] * 60
        stage_end = state["step"] in (cfg["denoise_steps"], cfg["max_steps"])
        if state["step"] % cfg["eval_interval"] == 0 or stage_end or out_of_time:
            validate(stage)
            if state["bad_evals"] >= cfg["patience"]:
                reason = (
                    f"early stopping: no better validation loss in {cfg['patience']} evaluations"
                )
                break
            if out_of_time:
                reason = f"time limit of {cfg['max_minutes']} minutes"
                break
            t_step = time.time()  # the evaluation's time is not the next step's
    # the best checkpoint restored: the model kept is the one at the best loss
    runs.finish(run, model, state, reason)
    checkpoint()
    if master:
        kept = (
            f"step {state['best_step']}"
            if base or state["best_step"]
            else "the base itself: no step beat it"
        )
        print(
            f"stopped at step {state['step']} ({reason}); best val loss {state['best_val']:.4f} ({kept}); "
            f"{state['flops_exact'] / 1e15:.4f} PF-s (exact), {state['flops_paper'] / 1e15:.4f} PF-s (paper); "
            f"{time.time() - t0:.0f} s"
        )
        if base:
            summary = dict(
                training_pairs=len(train_r),
                validation_pairs=len(val_r),
                denoising_windows=len(dn_windows) if denoising else 0,
                denoising_tokens=sum(map(len, dn_windows)) if denoising else 0,
            )
            runs.save_base(model, {**cfg, "dtype": dtype}, run, state, summary)
    if ddp:
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    data.cli(main, sys.argv[1:])
