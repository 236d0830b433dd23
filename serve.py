"""Many projects' customized models served from one process: one frozen base, each run's delta, and
batches that mix runs row by row. The paper's case for the lightweight strategies is this
deployment (§1 and §5: a frozen base shared by every project and a small per-project delta,
instead of "tens or hundreds of thousands of custom models"); it argues it and does not build it.
Each row of a batch is computed with its own run's delta:

  prefix  the runs' prefixes stacked in a bank, and a per-row index into it (model.py's
          prefix_index, which the attention implementations and the Triton kernel read)
  lora    a bank of (A, B) per run applied per row: a gather and two batched matmuls (Punica's
          segmented matmul, unfused); a run without a LoRA at a site holds zeros there, so its
          rows get the base's output exactly
  lldb    the frozen trunk runs once for the whole batch; the last decoder block once per group
          of rows of one run (a bank of blocks), each group on its own rows of the KV cache
  leo     per group of rows of one run: its token embedding, position tables (and
          layernorm_embedding, if it trained them) and output layer
  custom  shares nothing with the base: served as its own model in the same command, as is a
          prefix run whose shape (length, sites) differs from the first prefix run's

lora, lldb and leo rows share batches: each of these runs has a slot, and a batch's `route` (one
slot per row) goes as an argument through model.generate, which hands each bank (a model.Routed
module) the slots of exactly the rows it computes. Prefix rows are batched apart (a prefix is
never neutral: a row without one cannot sit in an attention call that has one). A row generates
what its customized model alone generates, the same sequences and scores up to float rounding
(tests/test_serve.py: greedy and beam 5, three runs per strategy); throughput and memory against
serving the models one by one: bench/bench_serve.py.

    python serve.py --runs runs/a-lora-f0,runs/b-lldb-f0 --requests requests.jsonl --out tests.jsonl
    python evaluate.py generate --runs ...         # the same, from evaluate.py
    python evaluate.py generate --run runs/commons-io-lldb-f0 --java Foo.java --method bar

A request is one JSON object per line: {"id": ..., "run": one of --runs (the folder as given, or
its name), and either "java" (a file) with "method" (a method name), or "src" (the focal context
as the base reads it)}. Each output line: {"id", "run", "tests": [{"score", "code"}, ... the k
best first]}, or {"id", "run", "error"} for a request that cannot be served (unknown run, a run
on another base than the first run's, a missing method, a line that is not a JSON object): the
others are served. One output line per request line, in order (blank lines are skipped). A
request without an "id", or a line that is not a JSON object, is answered with "id": null and
"line": its line number in the requests file, so that it is never taken for a request whose id
is a number.

Bad arguments are refused in one line before any model loads, and nothing is written: --runs
naming no folder; two runs of one folder name (a request names its run by it); an --out that is
a folder, lies under a file, or whose folder is missing or not writable. This file is not in the
design card's top level: evaluate.py would not hold it, and serving is its own job (README,
Layout)."""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import runs
import strategies
from data.batch import pad
from data.tokenizer import encode_pairs, load_tokenizer
from model import BART, Routed

# strategies whose rows share one batch over the base's own modules
SHARED = ("lora", "lldb", "leo")


def variant_groups(variant_of, route):
    """[(variant, the rows it computes)] of a call whose rows have the run slots `route`;
    route None: every row is the base's (variant 0)."""
    if route is None:
        return [(0, None)]
    v = variant_of[route]
    return [(int(u), (v == u).nonzero()[:, 0]) for u in v.unique()]


def pick(t, rows):
    """t[rows]; None stays None."""
    if t is None:
        return None
    return t[rows]


class Grouped(Routed):
    """One module per variant (variant 0 is the base's own); each row is computed by its run's
    variant, one call per group of rows. A batch of one variant is one plain call, at the base's
    speed."""

    def __init__(self, variants, variant_of):
        super().__init__()
        self.variants = nn.ModuleList(variants)
        # (slots,) long: each slot's variant
        self.register_buffer("variant_of", variant_of, persistent=False)

    def forward(self, x, route):
        groups = variant_groups(self.variant_of, route)
        if len(groups) == 1:
            return self.variants[groups[0][0]](x)
        n = len(route)
        # the positions of a cached step come as one (1, T) row for every row
        x = x.expand(n, *x.shape[1:])
        parts = [(r, self.variants[u](x[r])) for u, r in groups]
        first = parts[0][1]
        out = first.new_empty((n, *first.shape[1:]))
        for r, y in parts:
            out[r] = y
        return out


class GroupedBlock(nn.Module):
    """lldb's bank of last decoder blocks, in the decoder's last layer: each group of rows (whole
    inputs, all their beams: consecutive rows) runs its run's block on its rows of the KV cache,
    gathered through the beams' parents as the block appends its new keys, and the groups' caches
    are then put back together. Variant 0 is the base's own block (which may hold LoRA banks)."""

    def __init__(self, variants, variant_of):
        super().__init__()
        self.variants = nn.ModuleList(variants)
        # (slots,) long: each slot's variant
        self.register_buffer("variant_of", variant_of, persistent=False)

    def forward(
        self,
        x,
        enc,
        enc_mask,
        dec_mask=None,
        prefix=(None, None),
        prefix_index=None,
        cache=None,
        beams=1,
        route=None,
    ):
        """model.DecoderLayer's arguments and output."""
        groups = variant_groups(self.variant_of, route)
        if len(groups) == 1:
            block = self.variants[groups[0][0]]
            return block(x, enc, enc_mask, dec_mask, prefix, prefix_index, cache, beams, route)
        order = None
        slices = {}
        first_step = False
        if cache is not None:
            # the beams' parents (model.generate)
            order = cache.pop("order", None)
            first_step = "ck" not in cache
            slices = cross_slices(cache)
        out = torch.empty_like(x)
        parts = []
        for u, r in groups:
            # the group's inputs
            i = r[::beams] // beams
            sub = None
            if cache is not None:
                sub = group_cache(cache, slices, u, r, i, order)
            out[r] = self.variants[u](
                x[r],
                enc[i],
                enc_mask[i],
                pick(dec_mask, r),
                prefix,
                pick(prefix_index, r),
                sub,
                beams,
                route[r],
            )
            parts.append((r, i, sub))
        if cache is not None:
            merge_caches(cache, parts, first_step, x.shape[0], enc.shape[0])
        return out


def cross_slices(cache):
    """variant -> its inputs' cross-attention K/V, kept in the cache while the batch's inputs
    stay the same (model.generate slices "ck" when inputs leave; they are then taken again)."""
    if "ck" not in cache:
        return {}
    held = cache.get("groups")
    if held is None or held[0] is not cache["ck"]:
        cache["groups"] = (cache["ck"], {})
    return cache["groups"][1]


def group_cache(cache, slices, u, r, i, order):
    """The KV cache of variant u's rows r (inputs i). The past self-attention K/V stay whole: the
    block's append_kv gathers the group's rows (through their parents) straight into its new
    cache, one copy; the cross K/V slices are kept while the batch's inputs do not change."""
    sub = {}
    if "k" in cache:
        sub["k"] = cache["k"]
        sub["v"] = cache["v"]
        sub["order"] = r
        if order is not None:
            sub["order"] = order[r]
    if "ck" in cache:
        if u not in slices:
            slices[u] = (cache["ck"][i], cache["cv"][i])
        sub["ck"], sub["cv"] = slices[u]
    return sub


def merge_caches(cache, parts, first_step, n_rows, n_inputs):
    """The groups' new self-attention K/V (and at the first step their cross K/V, one per input)
    put back together in the layer's cache."""
    keys = ["k", "v"]
    if first_step:
        keys += ["ck", "cv"]
    for key in keys:
        per_input = key in ("ck", "cv")
        first = parts[0][2][key]
        n = n_rows
        if per_input:
            n = n_inputs
        full = first.new_empty((n, *first.shape[1:]))
        for r, i, sub in parts:
            if per_input:
                full[i] = sub[key]
            else:
                full[r] = sub[key]
        cache[key] = full


class BankLoRA(Routed):
    """LoRA per row: y = base(x) + s_j (x A_j^T) B_j^T for a row of slot j, as
    strategies.LoRALinear computes it. A (N, r, in), B (N, out, r), s (N,); a slot with no LoRA
    here holds zeros (a smaller rank: zero rows)."""

    def __init__(self, base, A, B, scaling):
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("scaling", scaling, persistent=False)
        self.register_buffer("has", B.flatten(1).any(1), persistent=False)

    def forward(self, x, route):
        y = self.base(x)
        # no row of a LoRA run: the base's output, bit for bit
        if route is None or not self.has[route].any():
            return y
        # (n, T, in)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        # (n, T, r): a gather, then a batched matmul
        a = torch.bmm(x3, self.A[route].transpose(1, 2))
        b = torch.bmm(a, self.B[route].transpose(1, 2)) * self.scaling[route, None, None]
        return y + b.view(y.shape)


class Head(nn.Module):
    """leo's output layer of one run: its (tied) embedding as the weight, plus its logits bias."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x):
        return F.linear(x, self.weight) + self.bias


def prefix_of(config, strategy, delta):
    """{site: (L, 2, H, P, hd)} of a prefix run's delta (a reparametrization MLP is run once
    here)."""
    o = strategies.with_defaults("prefix", strategy["options"])
    pre = strategies.Prefix(config, o["prefix_len"], o["sites"], o["mlp_hidden"])
    pre.load_state_dict({k.removeprefix("prefix."): v for k, v in delta.items()})
    with torch.no_grad():
        return {s: t.detach().clone() for s, t in pre().items()}


def prefix_shape(prefix):
    return sorted((s, tuple(t.shape)) for s, t in prefix.items())


class Server:
    """Serves every run given as {name: (strategy, delta)}: the strategy as model.strategy holds
    it, the delta as runs.trainable_state_dict (the run's best.safetensors). `base` is the shared
    model; it is changed in place (the modules some run changes become banks), so hand it a model
    of its own.

    Families (one batch holds one): "prefix", the prefix runs of the first prefix shape, each
    with its entry in the prefix bank (prefix_index); "shared", the lora, lldb and leo runs, each
    with its slot in the banks (slot); every other run (custom, another prefix shape) is a solo
    model, its own family."""

    def __init__(self, base, deltas):
        self.base = base.eval().requires_grad_(False)
        self.device = base.model.shared.weight.device
        prefixes = {}
        for n, (s, d) in deltas.items():
            if s["name"] == "prefix":
                prefixes[n] = prefix_of(base.config, s, d)
        first_shape = None
        if prefixes:
            first_shape = prefix_shape(next(iter(prefixes.values())))
        banked = [n for n in prefixes if prefix_shape(prefixes[n]) == first_shape]
        shared = [n for n, (s, _) in deltas.items() if s["name"] in SHARED]
        # the others: copies of the base as it was loaded, before any bank replaces a module
        self.solo = {}
        for n, (s, d) in deltas.items():
            if n in banked or n in shared:
                continue
            model = strategies.apply(copy.deepcopy(base), s["name"], **s["options"])
            runs.load_trainable(model, d)
            self.solo[n] = model.eval()
        self.family = {}
        self.prefix_index = {}
        for i, n in enumerate(banked):
            self.prefix_index[n] = i
            self.family[n] = "prefix"
        self.slot = {}
        for i, n in enumerate(shared):
            self.slot[n] = i
            self.family[n] = "shared"
        self.prefix_bank = {}
        if banked:
            self.prefix_bank = BART.prefix_bank([prefixes[n] for n in banked])
        lora_scale = {}
        for n, (s, _) in deltas.items():
            if s["name"] == "lora":
                o = strategies.with_defaults("lora", s["options"])
                lora_scale[self.slot[n]] = o["alpha"] / o["r"]
        # the last block's copies are taken before LoRA banks wrap the base's projections
        blocks = self.lldb_variants(self.slots_deltas(deltas, "lldb"))
        self.add_lora(self.slots_deltas(deltas, "lora"), lora_scale)
        if blocks:
            self.base.model.decoder.layers[-1] = GroupedBlock(*blocks)
        self.add_leo(self.slots_deltas(deltas, "leo"))

    def slots_deltas(self, deltas, kind):
        """[(slot, delta)] of the runs of one shared strategy."""
        return [(self.slot[n], d) for n, (s, d) in deltas.items() if s["name"] == kind]

    def variants(self, slots_deltas, make, base_module):
        """(variants, variant_of): variant 0 is the base's module, variant j + 1 the j-th run's;
        variant_of (slots,) maps each slot to its variant (0 for the runs that keep the base's
        module)."""
        variant_of = torch.zeros(len(self.slot), dtype=torch.long, device=self.device)
        for j, (slot, _) in enumerate(slots_deltas):
            variant_of[slot] = j + 1
        variants = [base_module] + [make(d) for _, d in slots_deltas]
        return variants, variant_of

    def add_lora(self, slots_deltas, scale):
        """Each linear layer some LoRA run adapts becomes a BankLoRA over every slot."""
        paths = set()
        for _, d in slots_deltas:
            for k in d:
                if k.endswith(".lora_A"):
                    paths.add(k.removesuffix(".lora_A"))
        n_slots = len(self.slot)
        for path in sorted(paths):
            parent_path, _, name = path.rpartition(".")
            parent = self.base.get_submodule(parent_path)
            lin = getattr(parent, name)
            key_A = path + ".lora_A"
            key_B = path + ".lora_B"
            r = max(d[key_A].shape[0] for _, d in slots_deltas if key_A in d)
            A = lin.weight.new_zeros(n_slots, r, lin.in_features)
            B = lin.weight.new_zeros(n_slots, lin.out_features, r)
            for slot, d in slots_deltas:
                if key_A in d:
                    A[slot, : d[key_A].shape[0]] = d[key_A]
                    B[slot, :, : d[key_B].shape[1]] = d[key_B]
            s = torch.tensor(
                [scale.get(i, 0.0) for i in range(n_slots)],
                dtype=lin.weight.dtype,
                device=lin.weight.device,
            )
            setattr(parent, name, BankLoRA(lin, A, B, s))

    def lldb_variants(self, slots_deltas):
        """lldb's variants of the last decoder block (variant 0: the base's own), from the
        pristine block."""
        if not slots_deltas:
            return None
        layers = self.base.model.decoder.layers
        p = f"model.decoder.layers.{len(layers) - 1}."

        def block(d):
            b = copy.deepcopy(layers[-1])
            # strict: the delta is the whole block
            b.load_state_dict({k.removeprefix(p): v for k, v in d.items()})
            return b.eval()

        return self.variants(slots_deltas, block, layers[-1])

    def add_leo(self, slots_deltas):
        """leo's banks: the token embedding, both position tables (and layernorm_embedding where
        a run trained it) and the output layer, each a Grouped over the runs' tensors."""
        if not slots_deltas:
            return
        m = self.base.model

        def table(key):
            # the delta's tensor itself, not a copy
            return lambda d: nn.Embedding.from_pretrained(d[key])

        emb = Grouped(*self.variants(slots_deltas, table("model.shared.weight"), m.shared))
        m.encoder.embed_tokens = emb
        m.decoder.embed_tokens = emb
        for name, side in (("model.encoder", m.encoder), ("model.decoder", m.decoder)):
            positions = table(name + ".embed_positions.weight")
            side.embed_positions = Grouped(
                *self.variants(slots_deltas, positions, side.embed_positions)
            )
            key = name + ".layernorm_embedding."
            if any(key + "weight" in d for _, d in slots_deltas):
                ln = layernorm_of(side.layernorm_embedding, key)
                side.layernorm_embedding = Grouped(
                    *self.variants(slots_deltas, ln, side.layernorm_embedding)
                )
        bias = self.base.final_logits_bias.clone()

        def head(d):
            return Head(d["model.shared.weight"], d.get("final_logits_bias", bias))

        base_head = Head(m.shared.weight, bias)
        self.base.lm_head = Grouped(*self.variants(slots_deltas, head, base_head))
        # each Head adds its own run's bias
        self.base.final_logits_bias.zero_()

    @torch.inference_mode()
    def generate(self, names, input_ids, attention_mask, **kw):
        """model.generate for a batch whose row i is for run names[i]; the rows must be of one
        family (Server.batches groups them so)."""
        families = {self.family.get(n, n) for n in names}
        if len(families) != 1:
            raise ValueError(f"one batch serves one family of runs, got {sorted(families)}")
        if names[0] in self.solo:
            return self.solo[names[0]].generate(input_ids, attention_mask, **kw)
        if families == {"prefix"}:
            prefix = self.prefix_for(names, input_ids.device)
            return self.base.generate(input_ids, attention_mask, prefix=prefix, **kw)
        route = torch.tensor([self.slot[n] for n in names], device=input_ids.device)
        return self.base.generate(input_ids, attention_mask, route=route, **kw)

    def prefix_for(self, names, device):
        """The prefix of a batch of banked prefix runs: one run's prefix, shared by the batch (no
        per-row gather of the bank), or the bank with each row's entry."""
        if len(set(names)) == 1:
            i = self.prefix_index[names[0]]
            return {s: t[i] for s, t in self.prefix_bank.items()}
        index = torch.tensor([self.prefix_index[n] for n in names], device=device)
        return (self.prefix_bank, index)

    def batches(self, names, src, size):
        """Yields (request indices, their run names) in batches of one family, sources of similar
        length together."""
        for fam in sorted({self.family.get(n, n) for n in names}):
            idx = [i for i, n in enumerate(names) if self.family.get(n, n) == fam]
            idx = sorted(idx, key=lambda i: len(src[i]))
            for j in range(0, len(idx), size):
                batch = idx[j : j + size]
                yield batch, [names[i] for i in batch]

    def serve(
        self, names, src, k=5, beams=5, max_new_tokens=128, batch_size=16, device="cpu", log=None
    ):
        """[(k id lists, k scores)] per request (names[i], the source ids src[i]), every family
        batched."""
        out = {}
        t0 = time.time()
        for idx, batch in self.batches(names, src, batch_size):
            ids, mask = pad([src[i] for i in idx])
            seqs, scores = self.generate(
                batch,
                ids.to(device),
                mask.to(device),
                num_beams=beams,
                num_return_sequences=k,
                max_new_tokens=max_new_tokens,
            )
            seqs = seqs.view(len(idx), k, -1).tolist()
            scores = scores.view(len(idx), k).tolist()
            for i, s, sc in zip(idx, seqs, scores):
                out[i] = (s, sc)
            if log:
                rate = len(out) / (time.time() - t0)
                log(f"served {len(out)}/{len(src)} requests, {rate:.2f} per second")
        return [out[i] for i in range(len(src))]


def layernorm_of(base, key):
    """A function delta -> a copy of the LayerNorm `base` with the delta's tensors under `key`
    (the base's where the delta has none)."""

    def make(d):
        out = copy.deepcopy(base)
        out.load_state_dict({k: d.get(key + k, v) for k, v in base.state_dict().items()})
        return out

    return make


def refusal(run, cfg, first, first_dir, checksum):
    """Why a run cannot be served beside the first run (None: it can): another tokenizer, focal
    context or lengths, or another base. A run from before train.py stored its base's checksum
    is taken to be on the base now at its path."""
    differs = [k for k in runs.CARRIED if cfg[k] != first[k]]
    base_sum = cfg.get("base_checksum") or checksum(cfg["base"])
    if base_sum != checksum(first["base"]):
        differs.append("base")
    if not differs:
        return None
    return (
        f"{run} was trained with another {', '.join(differs)} than the base {first['base']} as "
        f"it is now (and {first_dir}'s settings): serve it in a command of its own, or retrain it"
    )


def load(run_dirs, device="cpu"):
    """(server, the runs' shared config, tokenizer, {run: error}) from run folders: the first
    run's base is loaded once; a run on another base (checksum) or with another tokenizer or
    focal context is refused by name."""
    cfgs = {r: runs.run_config(r) for r in run_dirs}
    first = cfgs[run_dirs[0]]
    tok = load_tokenizer(first["tokenizer"])
    # the bases as they are on disk now
    sums = {}

    def checksum(path):
        if path not in sums:
            sums[path] = runs.checksum(path)
        return sums[path]

    errors = {}
    for r, c in cfgs.items():
        why = refusal(r, c, first, run_dirs[0], checksum)
        if why:
            errors[r] = why
    vocab = tok.get_vocab_size()
    base = BART.from_pretrained(first["base"], "sdpa", expect_vocab_size=vocab).to(device)
    deltas = {}
    for r in run_dirs:
        if r in errors:
            continue
        # a delta cut short or corrupt: that run's requests are refused with the reason
        try:
            deltas[r] = runs.read_delta(Path(r) / "best.safetensors", device)
        except ValueError as e:
            errors[r] = str(e)
    return Server(base, deltas), first, tok, errors


def source_of(req, cfg):
    """The focal context of a request: its "src", or the method "method" of the file "java" as
    data/ mines it."""
    if isinstance(req.get("src"), str):
        return req["src"]
    if not (isinstance(req.get("java"), str) and isinstance(req.get("method"), str)):
        raise ValueError('a request needs "src", or "java" and "method"')
    from data.java import parse_java
    from data.mine import corpus_strings

    java = Path(req["java"])
    if not java.is_file():
        raise ValueError(f"{req['java']}: no such Java file")
    # data/ decodes UTF-8, else Latin-1
    classes, _ = parse_java(java.read_bytes())
    hits = [(c, m) for c in classes for m in c["methods"] if m["identifier"] == req["method"]]
    if not hits:
        names = sorted({m["identifier"] for c in classes for m in c["methods"]})
        listed = ", ".join(names) or "none"
        raise ValueError(
            f"{req['java']}: no method {req['method']!r} in a top-level class (its methods: "
            f"{listed})"
        )
    return corpus_strings(*hits[0])[f"src_{cfg['focal_context']}"]


def generate_tests(run, java, method, k=5, beams=5, max_new_tokens=None, device="cpu"):
    """[(score, test code)]: the k best tests the run's customized model writes for `method` in
    the file `java`."""
    # a bad request fails before loading
    src = source_of({"java": str(java), "method": method}, runs.run_config(run))
    server, cfg, tok, refused = load([str(run)], device)
    if refused:
        raise ValueError(refused[str(run)])
    ids = encode_pairs(tok, [{"src": src, "tgt": ""}], cfg["max_src_len"])[0]
    max_new_tokens = max_new_tokens or cfg["max_tgt_len"]
    results = server.serve([str(run)], ids, min(k, beams), beams, max_new_tokens, 1, device)
    seqs, scores = results[0]
    return list(zip(scores, tok.decode_batch(seqs)))


def run_folders(text):
    """--runs as a list: the comma-separated folders (an empty item, as after a trailing comma, is
    dropped)."""
    return [r for r in text.split(",") if r]


def check_runs(run_dirs):
    """--runs names at least one run, and each folder name once: a request names its run by the
    folder as given or by its name, so two runs of one name would be served as the last one."""
    if not run_dirs:
        raise ValueError(
            "--runs names no run folder: give one or more run folders, comma-separated "
            "(--runs runs/a-lora-f0,runs/b-lldb-f0)"
        )
    by_name = {}
    for r in run_dirs:
        name = Path(r).name
        first = by_name.get(name)
        if first is None:
            by_name[name] = r
            continue
        if Path(first).resolve() == Path(r).resolve():
            raise ValueError(f"--runs names {first} twice: give each run once")
        raise ValueError(
            f"--runs: {first} and {r} have the same folder name {name}, by which a request names "
            "its run: serve them in separate commands, or give one a folder of another name"
        )


def check_out(out):
    """--out names a file in a folder that exists and can be written (data.atomic_write makes
    the file there, through a temporary file beside it; nothing makes the folder). The checks of
    data.output_file, and the folder must exist."""
    text = str(out)
    path = Path(out)
    if text.endswith("/") or path.is_dir():
        raise ValueError(
            f"--out {text} is a folder: give the path of a file, such as {path / 'tests.jsonl'}"
        )
    # the nearest folder on the path that exists ("." or "/" at the latest)
    parent = path.parent
    for parent in path.parents:
        if parent.exists():
            break
    if not parent.is_dir():
        raise ValueError(f"--out {text}: {parent} is a file, not a folder: give a path in a folder")
    if parent != path.parent:
        raise ValueError(
            f"--out {text}: there is no folder {path.parent}: create it, or give a path in a "
            "folder that exists"
        )
    if not os.access(parent, os.W_OK):
        raise ValueError(
            f"--out {text}: the folder {parent} is not writable: give a path in a folder you can "
            "write to"
        )


def head(req, line):
    """The first fields of a request's output line: its id and run. A request without an id (or
    a line that is not a JSON object: req is then {}) gets "id": null and its line number in the
    requests file."""
    if req.get("id") is None:
        return {"id": None, "line": line, "run": req.get("run")}
    return {"id": req["id"], "run": req.get("run")}


def command(a):
    """evaluate.py generate: --runs/--requests/--out serves a file of requests;
    --run/--java/--method prints tests."""
    if a.runs:
        return main(
            run_folders(a.runs),
            a.requests,
            a.out,
            a.k,
            a.beams,
            a.max_new_tokens,
            a.batch_size,
            a.device,
        )
    tests = generate_tests(
        a.generate_run, a.java, a.method, a.k, a.beams, a.max_new_tokens, a.device
    )
    shown = [f"// {i + 1}: score {score:.3f}\n{code}" for i, (score, code) in enumerate(tests)]
    print("\n\n".join(shown))


def log(msg):
    print(msg, file=sys.stderr)


def main(run_dirs, requests, out, k=5, beams=5, max_new_tokens=None, batch_size=16, device="cpu"):
    """python serve.py (or evaluate.py generate) --runs A,B --requests FILE --out FILE: the
    arguments checked before any model loads, then every request served, or its error written."""
    # bad arguments and files fail before the models load
    check_runs(run_dirs)
    check_out(out)
    if not Path(requests).is_file():
        raise ValueError(
            f"--requests {requests}: no such file: give a JSON-lines file of requests, one "
            '{"id": ..., "run": ..., "src": ...} a line'
        )
    reqs = data.read_jsonl(requests)
    # each request's line number in the file (data.read_jsonl skips blank lines)
    raw_lines = Path(requests).read_bytes().splitlines()
    line_of = [n for n, raw in enumerate(raw_lines, 1) if raw.strip()]
    server, cfg, tok, refused = load(run_dirs, device)
    alias = {Path(r).name: r for r in run_dirs}
    alias.update({r: r for r in run_dirs})
    lines = {}
    todo = []
    for i, req in enumerate(reqs):
        obj = req if isinstance(req, dict) else {}
        try:
            if not isinstance(req, dict):
                raise ValueError(
                    f'{requests}:{line_of[i]}: not a JSON object: a request is {{"id": ..., '
                    '"run": ..., and "src", or "java" and "method"}'
                )
            run = alias.get(str(req.get("run")))
            if run is None or run in refused:
                served = ", ".join(run_dirs)
                why = refused.get(run) or f"unknown run {req.get('run')!r}; served: {served}"
                raise ValueError(why)
            todo.append((i, run, source_of(req, cfg)))
        except ValueError as e:
            lines[i] = {**head(obj, line_of[i]), "error": str(e)}
    records = [{"src": s, "tgt": ""} for _, _, s in todo]
    src = encode_pairs(tok, records, cfg["max_src_len"])[0]
    names = [r for _, r, _ in todo]
    max_new_tokens = max_new_tokens or cfg["max_tgt_len"]
    results = server.serve(
        names, src, min(k, beams), beams, max_new_tokens, batch_size, device, log
    )
    for (i, _, _), (seqs, scores) in zip(todo, results):
        tests = [{"score": s, "code": c} for s, c in zip(scores, tok.decode_batch(seqs))]
        lines[i] = {**head(reqs[i], line_of[i]), "tests": tests}
    text = "".join(json.dumps(lines[i]) + "\n" for i in range(len(reqs)))
    data.atomic_write(out, text)
    refused_count = len(reqs) - len(todo)
    print(f'{out}: {len(todo)} requests served, {refused_count} refused (see their "error")')
    return [lines[i] for i in range(len(reqs))]


def cli(argv=None):
    """python serve.py --runs A,B --requests FILE --out FILE [--k --beams --max-new-tokens
    --batch-size --device]: what evaluate.py generate --runs does."""
    ap = argparse.ArgumentParser(
        description="Serve many runs' customized models from one base: a file of requests in, "
        "the tests out (as evaluate.py generate --runs)"
    )
    ap.add_argument("--runs", required=True, help="run folders, comma-separated")
    ap.add_argument("--requests", required=True, help="JSON lines: id, run, src or java+method")
    ap.add_argument("--out", required=True, help="JSON lines: id, run, tests or error")
    ap.add_argument("--k", type=data.positive_int, default=5, help="tests per request")
    ap.add_argument("--beams", type=data.positive_int, default=5)
    ap.add_argument("--max-new-tokens", type=data.positive_int, help="default: max_tgt_len")
    ap.add_argument("--batch-size", type=data.positive_int, default=16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=device)
    a = ap.parse_args(argv)
    run_dirs = run_folders(a.runs)
    main(run_dirs, a.requests, a.out, a.k, a.beams, a.max_new_tokens, a.batch_size, a.device)


if __name__ == "__main__":
    data.cli(cli)
