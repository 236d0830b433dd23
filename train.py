"""The training loop, flat and top to bottom (paper §3 and RQ3): the base model (the stand-in for
AthenaTest, which was never released) and the customization of a base model to one project with one
strategy (§2.2-2.6), trained "until the best validation loss is reached", with the compute of every
step accounted in PF-s (§3.4, Figure 4).

    make base                        # the shipped base's recipe, from scratch
                                     # -> checkpoints/base-new
    make base-next FROM=checkpoints/base  # a base's next stage (--init_base): CONTINUE_DEFAULTS
    make train STRATEGY=lldb [PROJECT=commons-io] [FOLD=0]  # customize, then score (evaluate.py)
    python train.py --mode=customize --strategy=prefix --project=commons-io --fold=1 --lr=1e-3
    torchrun --nproc_per_node=2 train.py --mode=base             # data parallel (base training)

The base is trained as AthenaTest was (Tufano et al. 2020): first `denoise_steps` of BART text
infilling on the base projects' Java (data/denoise.py), then the supervised stage on their
focal-method/test pairs, from the denoised weights, with every `denoise_every`-th step a denoising
batch still (the recipe: BASE_DEFAULTS; what was tried: docs/experiments.md). A trained base goes on
from its own folder as a next stage with a fresh optimizer (--init_base), recorded after its earlier
stages in training.json. Every evaluation
logs `source_gain`, the perplexity of the validation targets with another focal class's source over
the perplexity with their own: 1.0 means the model ignores its input (docs/source-gain.md).

A run folder runs/<name>/ (runs.py: its files) resumes from last.pt when rerun with the same name
and settings; the base checkpoint carries training.json, what it learned with, which
customization and evaluation read.

The file reads top to bottom: the settings and their parsing; the data (load_data) and the two
streams of training batches (PairStream, DenoiseStream); the model and the optimizer; the step
(schedule, forward and backward, compute); validation; and main, which strings them together."""

import dataclasses
import math
import os
import re
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import data
import flops
import runs
import strategies
from data import denoise
from data.batch import bucketed_batches, collate, labels
from data.tokenizer import SPECIAL_IDS, encode_pairs, load_tokenizer
from losses import loss_fn, source_nll, target_nll
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
    # base: go on from this base folder (a next stage: fresh optimizer, its own warmup and decay,
    # recorded after the folder's stages in the new training.json); "" = from scratch
    init_base="",
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
    # all stages together; a resume may change it only within the schedule's warmup (RESUMABLE)
    max_steps=2000,
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
# --mode=base --init_base=...: a next stage of a trained base replaces these (given ones win): no
# denoising stage (denoise_every still mixes text infilling in), a short warmup to half the first
# stage's peak, and a cosine decay of its own; the encoder trains from the first step
CONTINUE_DEFAULTS = dict(
    denoise_steps=0, warmup_steps=100, lr=2.5e-4, max_steps=2200, encoder_delay=0
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
# may change when a run resumes; every other setting is checked against config.json
# (runs.check_resume). Two of them within rules: max_steps sets the length of the supervised
# stage's cosine decay, so a resume may change it only up to step denoise_steps + warmup_steps,
# while every learning rate taken so far is the same under both values (runs.check_schedule; after
# that a longer or shorter run is a new run: another --name); dtype may be spelled otherwise
# (auto or the dtype it came to), but the compute dtype recorded in config.json's resolved.dtype
# may not change (runs.check_dtype: --dtype=auto resolves per machine)
RESUMABLE = ("max_steps", "max_minutes", "patience", "eval_interval", "device", "dtype")


def parse_args(argv, defaults):
    """--key=value settings -> (cfg, the keys given), checked, with the mode's defaults filled
    in."""
    cfg, given = runs.parse_settings(argv, defaults)
    if cfg["mode"] not in ("base", "customize"):
        raise SystemExit(f"mode must be 'base' or 'customize', got {cfg['mode']!r}")
    if cfg["mode"] == "base":
        cfg["strategy"] = "custom"
    if cfg["strategy"] not in strategies.STRATEGIES:
        raise SystemExit(
            f"unknown strategy {cfg['strategy']!r}; valid: {', '.join(strategies.STRATEGIES)}"
        )
    if cfg["focal_context"] and cfg["focal_context"] not in data.FOCAL_CONTEXTS:
        raise SystemExit(
            f"focal_context must be one of {', '.join(data.FOCAL_CONTEXTS)}, "
            f"got {cfg['focal_context']!r}"
        )
    if cfg["mode"] == "customize" and cfg["init_base"]:
        raise SystemExit(
            f"--init_base={cfg['init_base']} is for --mode=base (a base's next stage); a "
            f"customization starts from --base"
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
            f"attn_impl=triton has no attention dropout but "
            f"attention_dropout={cfg['attention_dropout']}:"
            f" set --attention_dropout=0 or --attn_impl=sdpa"
        )
    if not cfg["lr"]:
        cfg["lr"] = LR["base" if cfg["mode"] == "base" else cfg["strategy"]]
    if not cfg["name"]:
        project = os.path.splitext(os.path.basename(os.path.normpath(cfg["project"])))[0]
        if cfg["mode"] == "base":
            cfg["name"] = "base"
        else:
            cfg["name"] = f"{project}-{cfg['strategy']}-f{cfg['fold']}"
    if cfg["mode"] == "base":
        cfg.update({k: v for k, v in BASE_DEFAULTS.items() if k not in given})
        if cfg["init_base"]:
            cfg.update({k: v for k, v in CONTINUE_DEFAULTS.items() if k not in given})
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
    if cfg["strategy"] == "lora":
        return dict(r=cfg["lora_rank"])
    return {}


def denoises(cfg):
    """Does the run have denoising steps (a base's first stage, or mixed into its second)?"""
    return bool(cfg["denoise_steps"] or cfg["denoise_every"])


def noise_settings(cfg):
    """How denoising noises a window (data/denoise.py): the share of tokens masked, in spans of
    Poisson(poisson_lambda) length (BART §2.2)."""
    return dict(ratio=cfg["mask_ratio"], poisson_lambda=cfg["poisson_lambda"])


@dataclasses.dataclass
class Env:
    """Where this process trains (runs.resolve): under torchrun (ddp) rank `rank` of `world`; the
    device (cuda: a GPU) and the attention implementation; autocast: the compute dtype's, set
    once the dtype is picked."""

    ddp: bool
    rank: int
    world: int
    cuda: bool
    device: str
    attn_impl: str
    autocast: object = None

    @property
    def master(self):
        """The process that prints and writes the run folder."""
        return self.rank == 0


# -----------------------------------------------------------------------------
# the data: records -> splits -> token ids; the streams of training batches


@dataclasses.dataclass
class Data:
    """What a run learns from: the splits' records; the training pairs as token ids (targets as
    encoded, <s> t1..tn </s>) and how many of them were cut to the maximum lengths; the
    validation pairs (sources, targets, partners: source_check); in a run with denoising steps,
    the windows of Java text of at most `width` tokens and their validation set."""

    train: list
    val: list
    test: list
    src: list
    tgt: list
    truncated: int
    val_pairs: tuple
    windows: list = None
    dn_val: tuple = None
    width: int = 0


def load_records(cfg):
    """The records of the base projects (base) or of the target project, each with the focal
    context the base reads."""
    key = f"src_{cfg['focal_context']}"
    if cfg["mode"] == "base":
        names = cfg["base_projects"].replace(",", " ").split()
    else:
        names = [cfg["project"]]
    records = data.load_projects(names)
    lacking = next((r for r in records if key not in r), None)
    if lacking is not None:
        raise SystemExit(
            f"record {lacking.get('id')!r} of {lacking.get('project')!r} has no {key!r}, the "
            f"focal context the base reads ({cfg['focal_context']}): mine the corpus again with "
            f"`python -m data.mine`"
        )
    return records


def split(records, cfg):
    """(train, val, test): the customization's folds; the base has no test fold, 5% of its test
    classes validate."""
    if cfg["mode"] == "base":
        train, val = data.holdout(records, seed=cfg["seed"])
        test = []
    else:
        train, val, test = data.folds(records, cfg["fold"], cfg["k_folds"], cfg["seed"])
    if not train or not val:
        what = "the base" if cfg["mode"] == "base" else cfg["project"]
        raise SystemExit(
            f"the training or validation split of {what} (fold {cfg['fold']}) is empty: the "
            f"project has too few test classes"
        )
    return train, val, test


def load_data(cfg, tok):
    """The run's Data, in the focal context the base reads (src_<focal_context>). Binds the run
    to its records: cfg["corpus_checksum"] (a resume, or a scoring, on a rewritten corpus is
    refused by name)."""
    records = load_records(cfg)
    cfg["corpus_checksum"] = data.records_checksum(records)
    train, val, test = split(records, cfg)
    lengths = (cfg["max_src_len"], cfg["max_tgt_len"])
    key = f"src_{cfg['focal_context']}"
    src, tgt, truncated = encode_pairs(tok, train, *lengths, src_key=key)
    val_src, val_tgt, _ = encode_pairs(tok, val, *lengths, src_key=key)
    val_pairs = (val_src, val_tgt, data.other_class_partners(val))
    d = Data(train, val, test, src, tgt, truncated, val_pairs)
    if denoises(cfg):
        d.width = cfg["denoise_window"] or min(lengths) - 2
        # the text: the training records' Java, never the validation's
        d.windows, d.dn_val = denoise.stage(
            tok,
            train,
            val,
            cfg["focal_context"],
            d.width,
            cfg["seed"],
            text=cfg["denoise_text"],
            max_chars=cfg["denoise_chars"],
            **noise_settings(cfg),
        )
    return d


class PairStream:
    """The supervised batches, endlessly: each epoch the training pairs in the whole batches
    that bucketed_batches cuts for (seed, epoch), this rank's share of each global batch. The
    stream knows its place, the epoch and the batch within it, and keeps it in the checkpoint's
    state under epoch_key and batch_key: a resumed run draws the batches it would have drawn."""

    epoch_key = "epoch"
    batch_key = "batch"

    def __init__(self, src, tgt, batch_size, seed, env):
        self.src = src
        self.tgt = tgt
        self.batch_size = batch_size
        self.seed = seed
        self.rank = env.rank
        self.world = env.world
        self.epoch = 0
        self.batch = 0

    def pairs(self):
        """(sources, targets) of the current epoch."""
        return self.src, self.tgt

    def __iter__(self):
        return self

    def __next__(self):
        """This rank's share of the next batch, as (sources, targets); the stream moves on to
        its next batch, or to the next epoch."""
        src, tgt = self.pairs()
        lengths = [len(s) + len(t) for s, t in zip(src, tgt)]
        plan = bucketed_batches(lengths, self.batch_size * self.world, self.seed, self.epoch)
        idx = plan[self.batch][self.rank :: self.world]
        self.batch += 1
        if self.batch == len(plan):
            self.epoch += 1
            self.batch = 0
        return [src[i] for i in idx], [tgt[i] for i in idx]

    def save(self, state):
        state[self.epoch_key] = self.epoch
        state[self.batch_key] = self.batch

    def restore(self, state):
        self.epoch = state[self.epoch_key]
        self.batch = state[self.batch_key]


class DenoiseStream(PairStream):
    """The denoising batches, drawn as PairStream draws: the windows of Java text, noised afresh
    every epoch (noised_pairs, seeded by the epoch: the same noise after a resume)."""

    epoch_key = "dn_epoch"
    batch_key = "dn_batch"

    def __init__(self, tok, windows, noise, batch_size, seed, env):
        super().__init__(None, None, batch_size, seed, env)
        self.tok = tok
        self.windows = windows
        self.noise = noise
        self.noised_epoch = None

    def pairs(self):
        if self.noised_epoch != self.epoch:
            noised = denoise.noised_pairs(
                self.tok, self.windows, self.seed, self.epoch, **self.noise
            )
            self.src, self.tgt = noised
            self.noised_epoch = self.epoch
        return self.src, self.tgt


def make_streams(d, tok, cfg, env):
    """{"pairs": PairStream} and, in a run with denoising steps, "denoise": DenoiseStream."""
    streams = {"pairs": PairStream(d.src, d.tgt, cfg["batch_size"], cfg["seed"], env)}
    if denoises(cfg):
        # windows per batch: short windows, more of them
        size = cfg["denoise_batch_size"] or cfg["batch_size"]
        noise = noise_settings(cfg)
        streams["denoise"] = DenoiseStream(tok, d.windows, noise, size, cfg["seed"], env)
    return streams


# -----------------------------------------------------------------------------
# the machine, the model and the optimizer


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


def pick_dtype(cfg, cuda, run):
    """The run's compute dtype: --dtype, with auto resolved by native_bf16; a GPU without bf16
    refuses it in one line; a resumed run keeps the dtype it was trained in (runs.check_dtype:
    config.json's resolved dtype, whatever auto comes to on this machine)."""
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bf16" if native_bf16(cuda) else "fp32"
    if dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise SystemExit(
            f"--dtype={cfg['dtype']} computes in bf16, which this GPU does not: run it on a GPU "
            f"with bf16, or train a new run (another --name) with --dtype=fp32"
        )
    runs.check_dtype(run, cfg, dtype)
    return dtype


def measure_peak(device, dtype, n=2048, reps=5):
    """This machine's matmul peak in FLOP/s: the best of `reps` timings of an n x n x n matmul in
    `dtype`, measured (not taken from a data sheet) so that MFU reads against what this CPU or
    GPU really does."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    # warm-up (thread pool, AMX tile set-up, cuBLAS heuristics)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    # a multiply-add is 2 FLOPs (flops.py's convention)
    return 2 * n**3 / best


def autocast_of(dtype, cuda):
    """bf16: autocast runs the matmuls in bf16, the weights and AdamW's state stay fp32; fp32: an
    autocast that is off."""
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def print_dtype(dtype, peak, cuda):
    line = f"dtype: {dtype}"
    if dtype == "bf16":
        why = (
            "native on this machine"
            if native_bf16(cuda)
            else "emulated on this CPU: slower than fp32"
        )
        line += f" autocast, fp32 master weights ({why})"
    print(line + f"; measured {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s (2048^3)")


def build_model(cfg, tok, options, d, env):
    """The model on env.device: the preset from scratch (base), or the base checkpoint with the
    strategy applied (customize); this run's dropout replaces the checkpoint's."""
    vocab_size = tok.get_vocab_size()
    if cfg["mode"] == "base" and not cfg["init_base"]:
        config = config_from_preset(cfg["preset"], vocab_size=vocab_size, attn_impl=env.attn_impl)
        model = BART(config)
    else:
        # a customization's base, or the base a base's next stage goes on from
        start = cfg["init_base"] or cfg["base"]
        model = BART.from_pretrained(start, attn_impl=env.attn_impl, expect_vocab_size=vocab_size)
        if env.master and model.config.attention_dropout != cfg["attention_dropout"]:
            print(
                f"attention_dropout: the checkpoint's {model.config.attention_dropout} replaced "
                f"by this run's {cfg['attention_dropout']} (--attention_dropout)"
            )
    model.config.__dict__.update(dropout=cfg["dropout"], attention_dropout=cfg["attention_dropout"])
    model.to(env.device)
    init = {}
    if cfg["strategy"] == "prefix":
        # paper §2.5: initialized from the project's most frequent tokens
        ids = d.src + d.tgt
        init["init_ids"] = strategies.most_frequent_ids(ids, cfg["prefix_len"], exclude=SPECIAL_IDS)
    strategies.apply(model, cfg["strategy"], **options, **init)
    return model


def decays(name, p):
    """AdamW's weight decay applies to matrices only: not to biases, LayerNorms, embeddings or
    prefixes."""
    return p.dim() >= 2 and not ("shared" in name or "embed" in name or name.startswith("prefix"))


def build_optimizer(model, cfg, cuda):
    """AdamW over the trainable tensors, in groups by weight decay (named_parameters lists the
    tied embedding once, as model.shared.weight) and by whether they are the encoder's
    (encoder_delay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for decay in (True, False):
        for encoder in (True, False):
            params = [
                p
                for n, p in named
                if decays(n, p) == decay and n.startswith("model.encoder.") == encoder
            ]
            if params:
                weight_decay = cfg["weight_decay"] if decay else 0.0
                groups.append(dict(params=params, weight_decay=weight_decay, encoder=encoder))
    kernel = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, cfg["beta2"]), **kernel)


def data_parallel(model, env):
    """The model the steps run: under torchrun, wrapped in DistributedDataParallel."""
    if not env.ddp:
        return model
    return DistributedDataParallel(model, device_ids=[env.device] if env.cuda else None)


def write_config(run, cfg, options, model, d, dtype, env):
    """config.json: the resolved settings and what evaluate.py and a resume need."""
    trainable = sum(p.numel() for p in strategies.trainable_parameters(model))
    note = ""
    if denoises(cfg):
        note = f"; denoising: {len(d.windows)} windows of <= {d.width} tokens"
    saved = {
        **cfg,
        "strategy_options": options,
        "corpus": cfg["project"],
        "resolved": dict(device=env.device, attn_impl=env.attn_impl, dtype=dtype),
        "trainable_parameters": trainable,
        "total_parameters": model.num_parameters(),
        "truncated_training_pairs": d.truncated,
        "splits": dict(train=len(d.train), val=len(d.val), test=len(d.test)),
    }
    runs.write_config(run, saved, note)


# -----------------------------------------------------------------------------
# the step: schedule, forward and backward, compute


def stage_of(step, cfg):
    """(stage, first step of the stage, steps in the stage): denoising for the first
    denoise_steps, then pairs."""
    D = cfg["denoise_steps"]
    if step < D:
        return "denoise", 0, D
    return "supervised", D, cfg["max_steps"] - D


def get_lr(step, cfg, encoder=False):
    """Per stage: linear warmup, then cosine decay to lr * min_lr_ratio at the stage's end. The
    encoder's layers (encoder=True) wait encoder_delay steps (lr 0), then warm up over
    warmup_steps to that schedule."""
    if encoder and cfg["encoder_delay"]:
        s = step - cfg["encoder_delay"]
        if s < 0:
            return 0.0
        return get_lr(step, cfg) * min(1.0, (s + 1) / cfg["warmup_steps"])
    _, start, n = stage_of(step, cfg)
    s = step - start
    if s < cfg["warmup_steps"]:
        return cfg["lr"] * (s + 1) / cfg["warmup_steps"]
    progress = min(1.0, (s - cfg["warmup_steps"]) / max(1, n - cfg["warmup_steps"]))
    return cfg["lr"] * (
        cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def set_lr(optimizer, step, cfg):
    """Every parameter group's learning rate at `step`; returns the schedule's (not delayed)."""
    for g in optimizer.param_groups:
        g["lr"] = get_lr(step, cfg, encoder=g["encoder"])
    return get_lr(step, cfg)


def is_denoising_step(step, cfg):
    """Every step of the denoising stage; in the supervised stage every denoise_every-th step
    reconstructs Java instead."""
    if stage_of(step, cfg)[0] == "denoise":
        return True
    every = cfg["denoise_every"]
    return every > 0 and (step - cfg["denoise_steps"]) % every == every - 1


def forward_backward(train_model, stream, noising, cfg, tok, env):
    """The forward and backward passes of one optimizer step: grad_accum micro-batches drawn from
    `stream`, their gradients accumulated. Returns the step's loss and the micro-batches'
    (sources, targets)."""
    step_loss = 0.0
    drawn = []
    for _micro in range(cfg["grad_accum"]):
        src, tgt = next(stream)
        drawn.append((src, tgt))
        ids, mask, dec, y = collate(src, tgt, env.device)
        if cfg["word_dropout"] and not noising:
            # the labels stay; the decoder reads some of its inputs as <mask>
            dec = denoise.word_dropout(dec, cfg["word_dropout"], tok.token_to_id("<mask>"))
        loss = loss_fn(train_model, (ids, mask, dec, y), env.autocast) / cfg["grad_accum"]
        loss.backward()
        step_loss += loss.item()
    return step_loss, drawn


def add_flops(a, b):
    return {c: {k: a[c][k] + b[c][k] for k in b[c]} for c in b}


def step_compute(config, cfg, options, drawn, env):
    """What a step ran: {tokens, flops_exact, flops_paper}, at the real (unpadded) lengths (the
    compute the tokens need; flops.step_flops); under torchrun every rank's, summed (ranks'
    batches differ in length)."""
    tokens = 0
    fl = None
    for src, tgt in drawn:
        label_lens = [len(labels(t)) for t in tgt]
        src_lens = [len(s) for s in src]
        micro = flops.step_flops(config, cfg["strategy"], src_lens, label_lens, **options)
        fl = micro if fl is None else add_flops(fl, micro)
        tokens += sum(label_lens)
    done = torch.tensor([tokens, fl["exact"]["total"], fl["paper"]["total"]], dtype=torch.float64)
    if env.ddp:
        done = done.to(env.device)
        torch.distributed.all_reduce(done)
    return dict(tokens=int(done[0]), flops_exact=float(done[1]), flops_paper=float(done[2]))


def add_to_totals(state, ran, noising):
    """The loop's totals after a step: steps, denoising steps, tokens and FLOPs so far."""
    state["step"] += 1
    state["dn_steps"] += noising
    for key in ran:
        state[key] += ran[key]


def print_nonfinite(state, loss, run):
    last = os.path.join(run, "last.pt")
    print(f"step {state['step']}: loss is {loss}; stopping. The last good checkpoint is {last}")


def print_step(state, stage, loss, lr, dt, ran, peak, cfg, env):
    """A progress line: the step's loss, learning rate, speed and MFU, and the compute so far."""
    flop_rate = ran["flops_exact"] / dt
    eta = (cfg["max_steps"] - state["step"]) * dt / 60
    print(
        f"step {state['step']:5d} | {stage} | loss {loss:.4f} | lr {lr:.2e} | "
        f"{dt * 1e3:.0f} ms | {ran['tokens'] / dt:.0f} tok/s | {flop_rate / 1e12:.3f} TFLOP/s | "
        f"MFU {flop_rate / (peak * env.world):.1%} | "
        f"{state['flops_exact'] / 1e15:.4f} PF-s | "
        f"eta <= {eta:.1f} min"
    )


# -----------------------------------------------------------------------------
# validation, the checkpoints, the end


def source_check(model, val, cfg, device, autocast, n_gain=128, n_spread=8):
    """Does the model read its input (docs/source-gain.md)? val_loss: the mean validation loss
    per target token with each pair's own source (EOS included; the early-stopping criterion). On
    n_gain pairs taken evenly through the validation set also with the source of another focal
    class and with an empty source: source_gain = exp(other - own) on those pairs, exactly 1.0
    for a model that ignores its input. encoder_spread: the std across n_spread inputs of the
    encoder's output states (first L positions, L the shortest), averaged over positions and
    channels: it falls towards 0 as the encoder collapses (every input mapped to the same
    states)."""
    src, targets, partner = val
    tgt = [labels(t) for t in targets]

    def mean(nll):
        return sum(s for s, _ in nll) / sum(n for _, n in nll)

    # evenly through the class-ordered pairs
    sub = list(range(len(src)))[:: max(1, len(src) // n_gain)][:n_gain]
    size = 2 * cfg["batch_size"]
    model.eval()
    with autocast:
        own = target_nll(model, src, tgt, size, device)
        sub_src = [src[i] for i in sub]
        sub_tgt = [tgt[i] for i in sub]
        sub_other = [src[partner[i]] for i in sub]
        sides = source_nll(model, sub_src, sub_tgt, sub_other, size, device)
        ids, mask, _, _ = collate(src[:n_spread], targets[:n_spread], device)
        states = model.encode(ids, mask)[:, : int(mask.sum(1).min())]
        spread = states.float().std(dim=0).mean().item()
    model.train()
    return dict(
        val_loss=mean(own),
        val_loss_other_source=mean(sides[1]),
        val_loss_empty_source=mean(sides[2]),
        source_gain=math.exp(mean(sides[1]) - mean(sides[0])),
        encoder_spread=spread,
    )


def validate(model, stage, state, d, run, train_loss, t0, cfg, env):
    """Validation at the current step: source_check, a log line, the early-stopping state and
    the best checkpoint (supervised stage only). In the denoising stage the loss is the
    reconstruction of noised validation Java, and denoise_gain its source_gain with another
    window's source (how much of it is copied)."""
    check = source_check(model, d.val_pairs, cfg, env.device, env.autocast)
    if stage == "denoise":
        dn = source_check(model, d.dn_val, cfg, env.device, env.autocast)
        check.update(
            val_loss=dn["val_loss"],
            denoise_gain=dn["source_gain"],
            pairs_val_loss=check["val_loss"],
        )
    state["seconds"] = time.time() - t0
    better = stage == "supervised" and check["val_loss"] < state["best_val"]
    if better:
        state.update(best_val=check["val_loss"], best_step=state["step"], bad_evals=0)
    elif stage == "supervised":
        state["bad_evals"] += 1
    if env.master:
        runs.log_evaluation(run, state, stage, train_loss, check, better)
        if better:
            runs.save_trainable(model, os.path.join(run, "best.safetensors"))


def stop_reason(state, out_of_time, cfg):
    """Why the loop stops after an evaluation: early stopping or the time limit; None: go on."""
    if state["bad_evals"] >= cfg["patience"]:
        return f"early stopping: no better validation loss in {cfg['patience']} evaluations"
    if out_of_time:
        return f"time limit of {cfg['max_minutes']} minutes"
    return None


def save_checkpoint(run, model, optimizer, state, streams, env):
    """last.pt, the resume state, with the streams' places (a collective: every rank calls it)."""
    for stream in streams.values():
        stream.save(state)
    runs.save_state(run, model, optimizer, state, env.device, env.ddp, env.world, env.master)


def print_end(state, reason, cfg, t0):
    if cfg["mode"] == "base" or state["best_step"]:
        kept = f"step {state['best_step']}"
    else:
        kept = "the base itself: no step beat it"
    print(
        f"stopped at step {state['step']} ({reason}); best val loss {state['best_val']:.4f} "
        f"({kept}); {state['flops_exact'] / 1e15:.4f} PF-s (exact), "
        f"{state['flops_paper'] / 1e15:.4f} PF-s (paper); {time.time() - t0:.0f} s"
    )


def base_summary(d):
    """The data sizes training.json records for a base."""
    windows = d.windows or []
    return dict(
        training_pairs=len(d.train),
        validation_pairs=len(d.val),
        denoising_windows=len(windows),
        denoising_tokens=sum(map(len, windows)),
    )


# -----------------------------------------------------------------------------


def main(argv):
    cfg, given = parse_args(argv, settings)
    base = cfg["mode"] == "base"
    # a base's next stage: the training.json of the base it goes on from (else None)
    earlier = None
    if base:
        # now, not after hours of training
        runs.check_save_base(cfg["save_base"])
        if cfg["init_base"]:
            cfg, earlier = runs.continued_base(cfg, given)
    else:
        # what the base learned with, and its checksum (a resume onto another is refused)
        cfg = runs.base_settings(cfg, given, FOREIGN_BASE)
    # torchrun: data parallel (base training)
    env = Env(*runs.resolve(cfg))
    # dropout masks differ across ranks; the data order is seeded apart
    torch.manual_seed(cfg["seed"] + env.rank)

    # data: records -> splits -> token ids, and the streams of batches over them
    tok = load_tokenizer(cfg["tokenizer"])
    d = load_data(cfg, tok)
    streams = make_streams(d, tok, cfg, env)
    # after the data: a bad input leaves no empty run folder, and a failure before the first
    # checkpoint removes the folder this invocation made (runs.run_folder)
    with runs.run_folder(cfg["out_dir"], cfg["name"], env.master) as run:
        if env.master:
            # one writer per run folder
            runs.lock_run(run)

        # the model and its optimizer, in the compute dtype
        dtype = pick_dtype(cfg, env.cuda, run)
        env.autocast = autocast_of(dtype, env.cuda)
        # MFU's denominator: this machine, this dtype
        peak = measure_peak(env.device, dtype)
        if env.master:
            print_dtype(dtype, peak, env.cuda)
        options = strategy_options(cfg)
        model = build_model(cfg, tok, options, d, env)
        params = strategies.trainable_parameters(model)
        optimizer = build_optimizer(model, cfg, env.cuda)
        train_model = data_parallel(model, env)

        # resume: last.pt holds the trainable tensors, optimizer, step, the streams' places, RNG and
        # early-stopping state; a fresh start if there is no last.pt
        state = runs.resume(run, cfg, RESUMABLE, model, optimizer, env.rank, env.world, env.device)
        for stream in streams.values():
            stream.restore(state)
        if env.master:
            write_config(run, cfg, options, model, d, dtype, env)

        t0 = time.time() - state["seconds"]
        t_step = time.time()
        train_loss = float("nan")
        reason = state.get("done") or "max_steps"
        # step 0 (not on resume): the base is a candidate; a customization that only hurts keeps it
        if state["best_step"] < 0 and not state.get("done") and not base:
            validate(model, "supervised", state, d, run, train_loss, t0, cfg, env)
            save_checkpoint(run, model, optimizer, state, streams, env)
        model.train()
        while state["step"] < cfg["max_steps"] and not state.get("done"):
            stage = stage_of(state["step"], cfg)[0]
            lr = set_lr(optimizer, state["step"], cfg)
            noising = is_denoising_step(state["step"], cfg)
            stream = streams["denoise"] if noising else streams["pairs"]
            loss, drawn = forward_backward(train_model, stream, noising, cfg, tok, env)
            if not math.isfinite(loss):
                print_nonfinite(state, loss, run)
                reason = "non-finite loss"
                break
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ran = step_compute(model.config, cfg, options, drawn, env)
            add_to_totals(state, ran, noising)
            train_loss = loss
            dt = time.time() - t_step
            t_step = time.time()
            if env.master and (state["step"] % 5 == 0 or state["step"] == 1):
                shown = "denoise" if noising else stage
                print_step(state, shown, loss, lr, dt, ran, peak, cfg, env)
            out_of_time = cfg["max_minutes"] > 0 and time.time() - t0 > cfg["max_minutes"] * 60
            stage_end = state["step"] in (cfg["denoise_steps"], cfg["max_steps"])
            if state["step"] % cfg["eval_interval"] == 0 or stage_end or out_of_time:
                validate(model, stage, state, d, run, train_loss, t0, cfg, env)
                save_checkpoint(run, model, optimizer, state, streams, env)
                stop = stop_reason(state, out_of_time, cfg)
                if stop:
                    reason = stop
                    break
                # the evaluation's time is not the next step's
                t_step = time.time()

        # the best checkpoint restored: the model kept is the one at the best loss
        runs.finish(run, model, state, reason)
        save_checkpoint(run, model, optimizer, state, streams, env)
        if env.master:
            print_end(state, reason, cfg, t0)
            if base:
                saved = {**cfg, "dtype": dtype}
                runs.save_base(model, saved, run, state, base_summary(d), earlier)
        if env.ddp:
            torch.distributed.destroy_process_group()
        return model


if __name__ == "__main__":
    data.cli(main, sys.argv[1:])
