"""Many projects' customized models served from one process: one frozen base, each run's delta, and
batches that mix runs row by row. The paper's case for the lightweight strategies is this deployment
(§1 and §5: a frozen base shared by every project and a small per-project delta, instead of "tens or
hundreds of thousands of custom models"); it argues it and does not build it. Each row of a batch is
computed with its own run's delta:

  prefix  the runs' prefixes stacked in a bank and a per-row index into it (model.py's prefix_index, which the
          attention implementations and the Triton kernel read)
  lora    a bank of (A, B) per run applied per row: a gather and two batched matmuls (Punica's segmented matmul,
          unfused); a run without a LoRA at a site holds zeros there, so its rows get the base's output exactly
  lldb    the frozen trunk runs once for the whole batch; the last decoder block once per group of rows of one run
          (a bank of blocks), each group on its own rows of the KV cache
  leo     per group of rows of one run: its token embedding, position tables (and layernorm_embedding, if it
          trained them) and output layer
  custom  shares nothing with the base: served as its own model in the same command, as is a prefix run whose
          shape (length, sites) differs from the first prefix run's

lora, lldb and leo rows share batches; prefix rows are batched apart (a prefix is never neutral: a
row without one cannot sit in an attention call that has one). A row generates what its customized
model alone generates, the same sequences and scores up to float rounding (tests/test_serve.py:
greedy and beam 5, three runs per strategy); throughput and memory against serving the models one by
one: bench/bench_serve.py.

    python evaluate.py generate --runs runs/a-lora-f0,runs/b-lldb-f0 --requests requests.jsonl --out tests.jsonl
    python evaluate.py generate --run runs/commons-io-lldb-f0 --java Foo.java --method bar     # one request

A request is one JSON object per line: {"id": ..., "run": one of --runs (the folder as given, or
its name), and either "java" (a file) with "method" (a method name), or "src" (the focal context
as the base reads it)}. Each output line: {"id", "run", "tests": [{"score", "code"}, ... the k
best first]}, or {"id", "run", "error"} for a request that cannot be served (unknown run, a run
on another base than the first run's, a missing method): the others are served. This file is not
in the design card's top level: evaluate.py (320-line cap) would not hold it, and serving is its
own job (README, Layout)."""

import contextlib
import copy
import inspect
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
from data.batch import pad
import strategies
from data.tokenizer import encode_pairs, load_tokenizer
from model import BART

# strategies whose rows share one batch over the base's own modules
SHARED = ("lora", "lldb", "leo")


class Rows:
    """The run slot of every row of the model call in progress. Hooks on the encoder and the
    decoder read it from inputs: `rows` are the call's own rows (the decoder's B*beams), `inputs`
    one per input (the encoder output's), `tokens` one per real token of the encoder's input (its
    layers take the real tokens packed, model.py)."""

    def __init__(self, model):
        self.rows = self.inputs = self.tokens = None
        for m in (model.model.encoder, model.model.decoder):
            m.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        index, beams = bound.get("prefix_index"), bound.get("beams", 1)
        self.rows, self.inputs = index, None if index is None else index[::beams]
        # the encoder's (B, S): its packed tensors are (N, ...), N = mask.sum()
        mask = bound.get("mask")
        self.tokens = (
            None
            if index is None or mask is None
            else index[:, None].expand(mask.shape)[mask.bool()]
        )

    @contextlib.contextmanager
    def subset(self, r, i):
        """While a group of rows r (their inputs i) is computed apart, its slots are the rows'."""
        saved = self.rows, self.inputs
        self.rows, self.inputs = self.rows[r], self.inputs[i]
        try:
            yield
        finally:
            self.rows, self.inputs = saved

    def of(self, n):
        """The slots of a tensor with n rows: the call's rows, or its inputs' (cross-attention: B
        rows)."""
        if self.rows is None:
            return None
        # N >= 2B (<s> </s>): never a count of rows
        if self.tokens is not None and n == len(self.tokens):
            return self.tokens
        if n in (len(self.rows), len(self.inputs)):
            return self.rows if n == len(self.rows) else self.inputs
        raise ValueError(
            f"a tensor of {n} rows in a call of {len(self.rows)} rows: serving runs whole batches only"
        )


class Grouped(nn.Module):
    """One module per variant (variant 0 is the base's own); each row is computed by its run's
    variant, one call per group of rows. A batch of one variant is one plain call, at the base's
    speed."""

    def __init__(self, rows, variants, variant_of):
        super().__init__()
        self.rows, self.variants = rows, nn.ModuleList(variants)
        self.register_buffer("variant_of", variant_of, persistent=False)  # (slots,) long

    # what model.py reads of the module (embed_positions.num_embeddings): variant 0's
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "variants":
                raise
            return getattr(self.variants[0], name)

    def groups(self, n):
        slots = self.rows.of(n)
        if slots is None:
            return [(0, None)]
        v = self.variant_of[slots]
        return [(int(u), (v == u).nonzero()[:, 0]) for u in v.unique()]

    def forward(self, x):
        n = len(self.rows.rows) if x.shape[0] == 1 and self.rows.rows is not None else x.shape[0]
        groups = self.groups(n)
        if len(groups) == 1:
            return self.variants[groups[0][0]](x)
        x = x.expand(n, *x.shape[1:])  # positions of a cached step come as (1, T), for every row
        parts = [(r, self.variants[u](x[r])) for u, r in groups]
        out = parts[0][1].new_empty((n, *parts[0][1].shape[1:]))
        for r, y in parts:
            out[r] = y
        return out


class GroupedBlock(Grouped):
    """lldb's bank of last decoder blocks: each group of rows (whole inputs, all their beams:
    they are consecutive rows) runs its run's block on its rows of the KV cache (gathered through
    the beams' parents as the block appends its new keys), which are then put back together."""

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
    ):
        groups = self.groups(x.shape[0])
        if len(groups) == 1:
            return self.variants[groups[0][0]](
                x, enc, enc_mask, dec_mask, prefix, prefix_index, cache, beams
            )
        # the cross-attention K/V: one per input, computed at the first step only
        per_input = ("ck", "cv")
        keys = ("k", "v") + (per_input if cache is not None and "ck" not in cache else ())
        # the beams' parents (model.generate)
        order = cache.pop("order", None) if cache is not None else None
        # variant -> its inputs' cross K/V, kept in the cache while the batch's inputs stay the same
        slices = {}
        if cache is not None and "ck" in cache:
            # first use, or generate sliced "ck" (inputs left)
            if cache.get("groups", (None,))[0] is not cache["ck"]:
                cache["groups"] = (cache["ck"], {})
            slices = cache["groups"][1]
        out, parts = torch.empty_like(x), []
        for u, r in groups:
            i = r[::beams] // beams  # the group's inputs
            sub = None
            if cache is not None:
                # the past self-attention K/V stay whole: the block's append_kv gathers the group's
                # rows (through their parents) straight into its new cache, one copy; the cross K/V
                # slices are kept while the batch's inputs do not change
                sub = (
                    {"k": cache["k"], "v": cache["v"], "order": r if order is None else order[r]}
                    if "k" in cache
                    else {}
                )
                if "ck" in cache:
                    if u not in slices:
                        slices[u] = (cache["ck"][i], cache["cv"][i])
                    sub["ck"], sub["cv"] = slices[u]
            # the base's block may hold LoRA banks: they see the group's slots
            with self.rows.subset(r, i):
                out[r] = self.variants[u](
                    x[r],
                    enc[i],
                    enc_mask[i],
                    None if dec_mask is None else dec_mask[r],
                    prefix,
                    None if prefix_index is None else prefix_index[r],
                    sub,
                    beams,
                )
            parts.append((r, i, sub))
        for key in keys if cache is not None else ():
            first = parts[0][2][key]
            cache[key] = full = first.new_empty(
                (enc.shape[0] if key in per_input else x.shape[0], *first.shape[1:])
            )
            for r, i, sub in parts:
                full[i if key in per_input else r] = sub[key]
        return out


class BankLoRA(nn.Module):
    """LoRA per row: y = base(x) + s_j (x A_j^T) B_j^T for a row of slot j, as
    strategies.LoRALinear computes it. A (N, r, in), B (N, out, r), s (N,); a slot with no LoRA
    here holds zeros (a smaller rank: zero rows)."""

    def __init__(self, rows, base, A, B, scaling):
        super().__init__()
        self.rows, self.base = rows, base
        for name, t in (("A", A), ("B", B), ("scaling", scaling), ("has", B.flatten(1).any(1))):
            self.register_buffer(name, t, persistent=False)

    def forward(self, x):
        y, slots = self.base(x), self.rows.of(x.shape[0])
        # no row of a LoRA run: the base's output, bit for bit
        if slots is None or not self.has[slots].any():
            return y
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, T, in)
        # (n, T, r): a gather, then a batched matmul
        a = torch.bmm(x3, self.A[slots].transpose(1, 2))
        return y + (
            torch.bmm(a, self.B[slots].transpose(1, 2)) * self.scaling[slots, None, None]
        ).view(y.shape)


class Head(nn.Module):
    """leo's output layer of one run: its (tied) embedding as the weight, plus its logits bias."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight) + self.bias


def prefix_of(config, strategy, delta):
    """{site: (L, 2, H, P, hd)} of a prefix run's delta (a reparametrization MLP is run once
    here)."""
    o = strategy["options"]
    pre = strategies.Prefix(config, o["prefix_len"], o["sites"], o.get("mlp_hidden", 0))
    pre.load_state_dict({k.removeprefix("prefix."): v for k, v in delta.items()})
    with torch.no_grad():
        return {s: t.detach().clone() for s, t in pre().items()}


class Server:
    """Serves every run given as {name: (strategy, delta)}: the strategy as model.strategy holds
    it, the delta as runs.trainable_state_dict (the run's best.safetensors). `base` is the shared
    model; it is changed in place (the modules some run changes become banks), so hand it a model
    of its own."""

    def __init__(self, base, deltas):
        self.base, cfg = base.eval().requires_grad_(False), base.config
        self.device, self.solo, self.family, self.prefix_bank = (
            base.model.shared.weight.device,
            {},
            {},
            {},
        )
        prefixes = {
            n: prefix_of(cfg, s, d) for n, (s, d) in deltas.items() if s["name"] == "prefix"
        }

        def shape(kv):
            return sorted((s, tuple(t.shape)) for s, t in kv.items())

        first = shape(next(iter(prefixes.values()))) if prefixes else None
        # prefix runs come first: slots 0..P-1
        banked = [n for n in prefixes if shape(prefixes[n]) == first]
        banked += [n for n, (s, _) in deltas.items() if s["name"] in SHARED]
        # copies of the base as it was loaded, before any bank replaces a module
        for n, (s, d) in deltas.items():
            if n not in banked:
                self.solo[n] = strategies.apply(copy.deepcopy(base), s["name"], **s["options"])
                runs.load_trainable(self.solo[n], d)
                self.solo[n].eval()
        self.rows = Rows(base)
        self.slot = {n: i for i, n in enumerate(banked)}
        self.family.update({n: "prefix" if n in prefixes else "shared" for n in banked})
        if prefixes:
            self.prefix_bank = BART.prefix_bank([prefixes[n] for n in banked if n in prefixes])

        def of(kind):
            return [
                (self.slot[n], d)
                for n, (s, d) in deltas.items()
                if n in self.slot and s["name"] == kind
            ]

        # copies of the last block before LoRA banks wrap the base's projections
        blocks = self._lldb(of("lldb"))
        self._lora(
            of("lora"),
            {
                self.slot[n]: s["options"]["alpha"] / s["options"]["r"]
                for n, (s, _) in deltas.items()
                if s["name"] == "lora"
            },
        )
        if blocks:
            self.base.model.decoder.layers[-1] = GroupedBlock(self.rows, *blocks)
        self._leo(of("leo"))

    def _variants(self, runs_deltas, make, base_module):
        """(variants, variant_of): variant 0 is the base's module, variant j + 1 the j-th run's."""
        variant_of = torch.zeros(len(self.slot), dtype=torch.long, device=self.device)
        for j, (slot, _) in enumerate(runs_deltas):
            variant_of[slot] = j + 1
        return [base_module] + [make(d) for _, d in runs_deltas], variant_of

    def _lora(self, slots_deltas, scale):
        sites = sorted(
            {k.removesuffix(".lora_A") for _, d in slots_deltas for k in d if k.endswith(".lora_A")}
        )
        for path in sites:
            parent, name = self.base.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2]
            lin = getattr(parent, name)
            r = max(d[path + ".lora_A"].shape[0] for _, d in slots_deltas if path + ".lora_A" in d)
            A = lin.weight.new_zeros(len(self.slot), r, lin.in_features)
            B = lin.weight.new_zeros(len(self.slot), lin.out_features, r)
            for slot, d in slots_deltas:
                if path + ".lora_A" in d:
                    a, b = d[path + ".lora_A"], d[path + ".lora_B"]
                    A[slot, : a.shape[0]], B[slot, :, : b.shape[1]] = a, b
            s = torch.tensor(
                [scale.get(i, 0.0) for i in range(len(self.slot))],
                dtype=lin.weight.dtype,
                device=lin.weight.device,
            )
            setattr(parent, name, BankLoRA(self.rows, lin, A, B, s))

    def _lldb(self, slots_deltas):
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

        return self._variants(slots_deltas, block, layers[-1])

    def _leo(self, slots_deltas):
        if not slots_deltas:
            return
        m, V = self.base.model, self._variants

        # the delta's tensor itself, not a copy
        def table(key):
            return lambda d: nn.Embedding.from_pretrained(d[key])

        emb = Grouped(self.rows, *V(slots_deltas, table("model.shared.weight"), m.shared))
        m.encoder.embed_tokens = m.decoder.embed_tokens = emb
        for side in (m.encoder, m.decoder):
            name = "model." + ("encoder" if side is m.encoder else "decoder")
            side.embed_positions = Grouped(
                self.rows,
                *V(slots_deltas, table(name + ".embed_positions.weight"), side.embed_positions),
            )
            if any(name + ".layernorm_embedding.weight" in d for _, d in slots_deltas):

                def ln(d, base=side.layernorm_embedding, key=name + ".layernorm_embedding."):
                    out = copy.deepcopy(base)
                    out.load_state_dict(
                        {k: d.get(key + k, v) for k, v in base.state_dict().items()}
                    )
                    return out

                side.layernorm_embedding = Grouped(
                    self.rows, *V(slots_deltas, ln, side.layernorm_embedding)
                )
        bias = self.base.final_logits_bias.clone()

        def head(d):
            return Head(d["model.shared.weight"], d.get("final_logits_bias", bias))

        self.base.lm_head = Grouped(self.rows, *V(slots_deltas, head, Head(m.shared.weight, bias)))
        self.base.final_logits_bias.zero_()  # each Head adds its own run's bias

    @torch.inference_mode()
    def generate(self, names, input_ids, attention_mask, **kw):
        """model.generate for a batch whose row i is for run names[i]; the rows must be of one
        family: all banked prefix runs, all lora/lldb/leo runs, or one solo run (Server.batches
        groups them so)."""
        families = {self.family.get(n, n) for n in names}
        if len(families) != 1:
            raise ValueError(f"one batch serves one family of runs, got {sorted(families)}")
        if names[0] in self.solo:
            return self.solo[names[0]].generate(input_ids, attention_mask, **kw)
        index = torch.tensor([self.slot[n] for n in names], device=input_ids.device)
        sites = self.prefix_bank if families == {"prefix"} else {}
        # one run: its prefix shared by the batch, no per-row gather of the bank
        if sites and len(set(names)) == 1:
            # (the gather was 30% of a CPU batch)
            sites = {s: t[self.slot[names[0]]] for s, t in sites.items()}
        return self.base.generate(input_ids, attention_mask, prefix=(sites, index), **kw)

    def batches(self, names, src, size):
        """Yields (request indices, their run names) in batches of one family, sources of similar
        length together."""
        for fam in sorted({self.family.get(n, n) for n in names}):
            idx = sorted(
                (i for i, n in enumerate(names) if self.family.get(n, n) == fam),
                key=lambda i: len(src[i]),
            )
            for j in range(0, len(idx), size):
                yield idx[j : j + size], [names[i] for i in idx[j : j + size]]

    def serve(
        self, names, src, k=5, beams=5, max_new_tokens=128, batch_size=16, device="cpu", log=None
    ):
        """[(k id lists, k scores)] per request (names[i], the source ids src[i]), every family
        batched."""

        out, t0 = {}, time.time()
        for idx, batch in self.batches(names, src, batch_size):
            ids, mask = (t.to(device) for t in pad([src[i] for i in idx]))
            seqs, scores = self.generate(
                batch,
                ids,
                mask,
                num_beams=beams,
                num_return_sequences=k,
                max_new_tokens=max_new_tokens,
            )
            out.update(
                zip(
                    idx, zip(seqs.view(len(idx), k, -1).tolist(), scores.view(len(idx), k).tolist())
                )
            )
            if log:
                log(
                    f"served {len(out)}/{len(src)} requests, {len(out) / (time.time() - t0):.2f} per second"
                )
        return [out[i] for i in range(len(src))]


def load(run_dirs, device="cpu"):
    """(server, the runs' shared config, {run: error}) from run folders: the first run's base is
    loaded once; a run on another base (checksum) or with another tokenizer or focal context is
    refused by name."""
    cfgs, errors, sums = {r: runs.run_config(r) for r in run_dirs}, {}, {}
    first, tok = cfgs[run_dirs[0]], load_tokenizer(cfgs[run_dirs[0]]["tokenizer"])

    def checksum(path):
        return sums.setdefault(path, runs.checksum(path))

    # the base as it is on disk now; a run from before train.py stored its base's checksum
    for r, c in cfgs.items():
        # is taken to be on the base now at its path
        differs = [k for k in runs.CARRIED if c[k] != first[k]]
        differs += ["base"] * (
            (c.get("base_checksum") or checksum(c["base"])) != checksum(first["base"])
        )
        if differs:
            errors[r] = (
                f"{r} was trained with another {', '.join(differs)} than the base {first['base']} as it is "
                f"now (and {run_dirs[0]}'s settings): serve it in a command of its own, or retrain it"
            )
    base = BART.from_pretrained(first["base"], "sdpa", expect_vocab_size=tok.get_vocab_size()).to(
        device
    )
    deltas = {}
    for r in (r for r in run_dirs if r not in errors):
        from safetensors import safe_open

        with safe_open(str(Path(r) / "best.safetensors"), framework="pt", device=str(device)) as f:
            deltas[r] = json.loads(f.metadata()["strategy"]), {k: f.get_tensor(k) for k in f.keys()}
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

    if not Path(req["java"]).is_file():
        raise ValueError(f"{req['java']}: no such Java file")
    classes, _ = parse_java(Path(req["java"]).read_bytes())  # data/ decodes UTF-8, else Latin-1
    hits = [(c, m) for c in classes for m in c["methods"] if m["identifier"] == req["method"]]
    if not hits:
        names = (
            ", ".join(sorted({m["identifier"] for c in classes for m in c["methods"]})) or "none"
        )
        raise ValueError(
            f"{req['java']}: no method {req['method']!r} in a top-level class (its methods: {names})"
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
    ((seqs, scores),) = server.serve(
        [str(run)], ids, min(k, beams), beams, max_new_tokens or cfg["max_tgt_len"], 1, device
    )
    return list(zip(scores, tok.decode_batch(seqs)))


def command(a):
    """evaluate.py generate: --runs/--requests/--out serves a file of requests;
    --run/--java/--method prints tests."""
    if a.runs:
        return main(
            [r for r in a.runs.split(",") if r],
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
    print(
        "\n\n".join(
            f"// {i + 1}: score {score:.3f}\n{code}" for i, (score, code) in enumerate(tests)
        )
    )


def main(run_dirs, requests, out, k=5, beams=5, max_new_tokens=None, batch_size=16, device="cpu"):
    """evaluate.py generate --runs A,B --requests FILE --out FILE: every request served, or its
    error written."""
    reqs, lines, todo = data.read_jsonl(requests), {}, []  # bad files fail before the models load
    if not (Path(out).parent.is_dir() and os.access(Path(out).parent, os.W_OK)):
        raise PermissionError(
            f"{out}: its folder {Path(out).parent} is missing or not writable: give --out another "
            "path"
        )
    server, cfg, tok, refused = load(run_dirs, device)
    alias = {**{Path(r).name: r for r in run_dirs}, **{r: r for r in run_dirs}}
    for i, req in enumerate(reqs):
        obj = req if isinstance(req, dict) else {}
        try:
            if not isinstance(req, dict):
                raise ValueError(f"{requests}: request {i + 1} is not a JSON object")
            run = alias.get(str(req.get("run")))
            if run is None or run in refused:
                raise ValueError(
                    refused.get(run)
                    or f"unknown run {req.get('run')!r}; served: {', '.join(run_dirs)}"
                )
            todo.append((i, run, source_of(req, cfg)))
        except ValueError as e:
            lines[i] = {"id": obj.get("id", i), "run": obj.get("run"), "error": str(e)}
    src = encode_pairs(tok, [{"src": s, "tgt": ""} for _, _, s in todo], cfg["max_src_len"])[0]

    def log(msg):
        return print(msg, file=sys.stderr)

    results = server.serve(
        [r for _, r, _ in todo],
        src,
        min(k, beams),
        beams,
        max_new_tokens or cfg["max_tgt_len"],
        batch_size,
        device,
        log,
    )
    for (i, _run, _), (seqs, scores) in zip(todo, results):
        tests = [{"score": s, "code": c} for s, c in zip(scores, tok.decode_batch(seqs))]
        lines[i] = {"id": reqs[i].get("id", i), "run": reqs[i]["run"], "tests": tests}
    data.atomic_write(out, "".join(json.dumps(lines[i]) + "\n" for i in range(len(reqs))))
    print(
        f'{out}: {len(todo)} requests served, {len(reqs) - len(todo)} refused (see their "error")'
    )
    return [lines[i] for i in range(len(reqs))]
