"""Scores a customized model against the base on its project's test fold, and builds the paper's
report (§3.2 RQ1 intrinsic metrics, §3.3 RQ2 task metrics; Tables 3-4, Figures 3-4).

    python evaluate.py runs/<name> [--limit N] [--beams 5] [--max-new-tokens N: default the run's max_tgt_len] [--rescore]
    python evaluate.py --report runs/       # runs/report.md (Tables 3-4), runs/fig3.png, runs/fig4.png
    python evaluate.py generate --run runs/<name> --java Foo.java --method bar [--k 5]   # tests for your own code
    python evaluate.py generate --runs runs/a,runs/b --requests requests.jsonl --out tests.jsonl  # serve.py

metrics.json = {"base": M, "customized": M, "decoding": {...}}, written only here (atomically); M holds
- bleu4: sacrebleu's corpus BLEU (0-100) of the top-1 beam; both sides cut into Java tokens by
  `abstract_java.java_tokens`, space-joined, tokenize="none" (a string literal with spaces counts as several tokens);
- perplexity: exp(total NLL / total target tokens) over the fold, teacher-forced, pads excluded. As train.py (and
  fairseq, AthenaTest) the decoder reads </s> t1..tn and predicts t1..tn </s>: </s> counts, data/'s leading <s> does
  not. The tables use this per-token figure (§3.2); `perplexity_mean_per_example` is stored beside it;
- exact@j, abstracted@j (j = 1..k, the beams returned): share of examples with one of the first j beams equal to the
  reference, all whitespace deleted (§3.3), or after src2abs of each side ON ITS OWN (`abstract_java.abstract`,
  compat=False; pair mode's shared ids would keep `x` and `y` apart: abstracted = exact, against Figure 3a);
- style_cosine: mean cosine of (top-1, reference) in a tf-idf space fit per project on identifier documents
  (`abstract_java.identifiers`) of the reference and generated tests; syntax_valid: share of non-empty top-1 tests
  that tree-sitter-java parses in `class _ { ... }` without ERROR or MISSING nodes; n: examples scored;
- source_gain = perplexity_other_source / perplexity: the targets scored against the source of an example of
  ANOTHER focal class (data.other_class_partners) over their own; 1.0 exactly for a model that ignores its input
  (docs/source-gain.md); perplexity_empty_source: against the empty source <s></s>.
The base's scores on a (fold, decoding, base, tokenizer) are computed once for every strategy's run (runs/.cache/).
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import abstract_java
import data
import runs
import strategies
from data.batch import pad
from data.tokenizer import BOS, EOS, encode_pairs, load_tokenizer

K = 5  # top-k of Figure 3a
MODELS = ("base", "customized")
# Table 3, "Average" row
PAPER_T3 = {
    "bleu4": dict(base=16.1, custom=38.4, leo=36.9, lldb=37.8, prefix=37.7),
    "perplexity": dict(base=1.262, custom=1.153, leo=1.158, lldb=1.153, prefix=1.154),
}
# Fig. 3a top-1 (exact, abstracted) %, from §4.2's text
PAPER_F3 = {"base": (0.5, 3.0), "customized": (5.0, 13.5)}


# --- the metrics: pure functions of strings and numbers
# -------------------------------------------------------
def bleu4(hyps, refs):
    import sacrebleu

    def lex(code):
        return " ".join(abstract_java.java_tokens(code))

    return sacrebleu.corpus_bleu(
        [lex(h) for h in hyps], [[lex(r) for r in refs]], tokenize="none"
    ).score


def perplexity(nll, ntok):
    """nll[i]: summed NLL of example i's target tokens, ntok[i]: their number -> (per token, mean
    per example)."""
    return math.exp(sum(nll) / sum(ntok)), float(
        np.mean([math.exp(a / b) for a, b in zip(nll, ntok)])
    )


def topk_matches(preds, refs, k=K, abstract=lambda code: abstract_java.abstract(code)[0].split()):
    """preds[i]: the beams of example i, best first -> {"exact@1": share, ..., "abstracted@k":
    share}. Nothing matches an empty side: an empty beam is no test, and a reference that
    abstracts to nothing has nothing to match."""

    def squeeze(s):
        return "".join(s.split())

    hits = np.zeros((2, len(refs), k), dtype=bool)  # (exact | abstracted, example, beam)
    for i, (beams, ref) in enumerate(zip(preds, refs)):
        ref_abs = abstract(ref)
        for j, p in enumerate(beams[:k]):
            hits[:, i, j] = squeeze(p) == squeeze(ref) != "", abstract(p) == ref_abs != []
    cum = hits.cumsum(axis=2) > 0  # (2, n, k): any of the first j beams
    return {
        f"{kind}@{j + 1}": float(cum[m, :, j].mean())
        for m, kind in enumerate(("exact", "abstracted"))
        for j in range(k)
    }


def style_cosines(generated, references):
    """Cosine between each generated test and its reference in the tf-idf space of identifier
    documents."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    g, r = (
        [" ".join(abstract_java.identifiers(c)) for c in codes] for codes in (generated, references)
    )
    if not any(d.strip() for d in g + r):
        return [0.0] * len(g)  # no identifier anywhere (sklearn refuses an empty vocabulary)
    # callable analyzer: identifiers whole, case kept
    vec = TfidfVectorizer(analyzer=str.split).fit(r + g)
    # rows L2-normed
    return np.asarray(vec.transform(g).multiply(vec.transform(r)).sum(axis=1)).ravel().tolist()


def syntax_valid(codes):
    """Share of codes that are non-empty and parse as class members with no ERROR/MISSING node."""

    # abstract_java's tree-sitter-java
    def tree(c):
        return abstract_java._PARSER.parse(f"class _ {{ {c} }}".encode())

    return float(np.mean([bool(c.strip()) and not tree(c).root_node.has_error for c in codes]))


def kruskal_table(groups):
    """{name: values} -> {a: {b: Kruskal-Wallis p-value of a vs b}} (Table 4); nan where all
    values are equal or a side has one value (one project: scipy gives H = 1, p = 0.32 for ANY
    two distinct values, which is no test)."""
    from scipy.stats import kruskal

    def flat(a, b):
        return len(set(groups[a]) | set(groups[b])) < 2 or min(len(groups[a]), len(groups[b])) < 2

    return {
        a: {
            b: None
            if a == b
            else float("nan")
            if flat(a, b)
            else float(kruskal(groups[a], groups[b]).pvalue)
            for b in groups
        }
        for a in groups
    }


def model_metrics(rows, name, k=K):
    """M for model `name` from predictions.jsonl rows; also stores each row's style cosine
    (Figure 3b)."""
    refs, preds = [r["reference"] for r in rows], [r[name]["predictions"] for r in rows]
    top1 = [p[0] for p in preds]
    cos = style_cosines(top1, refs)
    for r, c in zip(rows, cos):
        r[name]["style_cosine"] = c
    ntok = [r[name]["tokens"] for r in rows]
    ppl, ppl_mean = perplexity([r[name]["nll"] for r in rows], ntok)
    other, empty = (
        perplexity([r[name][f"nll_{s}"] for r in rows], ntok)[0]
        for s in ("other_source", "empty_source")
    )
    # unfinished@1: the share of top-1 outputs that ran to the length limit without </s> (a looping
    # or cut test); None for predictions written before it was recorded
    finished = [r[name].get("finished") for r in rows]
    unfinished = None if None in finished else float(np.mean([not f[0] for f in finished]))
    return {
        "bleu4": bleu4(top1, refs),
        "perplexity": ppl,
        **topk_matches(preds, refs, k),
        "unfinished@1": unfinished,
        "style_cosine": float(np.mean(cos)),
        "syntax_valid": syntax_valid(top1),
        "n": len(rows),
        "perplexity_mean_per_example": ppl_mean,
        "source_gain": other / ppl,
        "perplexity_other_source": other,
        "perplexity_empty_source": empty,
    }


# --- the model side: teacher-forced NLL and beam search, batched by source length
# ----------------------------
def batches(src, size, device):
    """Yields (indices, ids (B, S), mask (B, S)) on `device`, sources of similar length together
    (less padding)."""
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    for j in range(0, len(order), size):
        yield (
            order[j : j + size],
            *(t.to(device) for t in pad([src[i] for i in order[j : j + size]])),
        )


@torch.no_grad()
def target_nll(model, src, tgt, batch_size=16, device="cpu"):
    """[(summed NLL, tokens)] per example, teacher-forced: the decoder reads [start] + y[:-1],
    predicts y = tgt[i]. The output layer runs on the real target positions only (logits_at), not
    on the pads."""
    out = {}
    for idx, ids, mask in batches(src, batch_size, device):
        y, ymask = pad([tgt[i] for i in idx])  # (B, T) labels, (B, T) 1 = real token
        dec = torch.cat(
            [torch.full_like(y[:, :1], model.config.decoder_start_token_id), y[:, :-1]], 1
        )
        real = ymask.bool()
        # (N real positions, V)
        logits = model(ids, mask, dec.to(device), logits_at=real.to(device)).float()
        nll = torch.zeros(y.shape)
        nll[real] = F.cross_entropy(logits, y[real].to(device), reduction="none").cpu()
        out.update(zip(idx, zip(nll.sum(1).tolist(), ymask.sum(1).tolist())))
    return [out[i] for i in range(len(src))]


def source_nll(model, src, tgt, other_src, batch_size=16, device="cpu"):
    """target_nll with each example's own source, with other_src[i] (the source of an example of
    another focal class: data.other_class_partners) and with the empty source <s></s>: the three
    sides of source_gain."""
    return [
        target_nll(model, s, tgt, batch_size, device)
        for s in (src, other_src, [[BOS, EOS]] * len(src))
    ]


@torch.no_grad()
def beam_search(model, src, k=K, beams=5, max_new_tokens=256, batch_size=16, device="cpu"):
    """[(k id lists best first, k scores)] per example, from model.generate (length-normalised
    log-probs)."""
    out = {}
    for idx, ids, mask in batches(src, batch_size, device):
        seqs, scores = model.generate(
            ids,
            mask,
            num_beams=beams,
            num_return_sequences=k,
            max_new_tokens=max_new_tokens,
            length_penalty=1.0,
            early_stopping=True,
        )
        # (B*k, T) -> (B, k, T)
        seqs, scores = seqs.view(len(idx), k, -1).tolist(), scores.view(len(idx), k).tolist()
        out.update(zip(idx, zip(seqs, scores)))
    return [out[i] for i in range(len(src))]


# --- a run on one fold: both models scored, the base once per fold and decoding (runs.cached)
# ---------------
def score_model(model, tok, src, tgt, partner, k, beams, max_new_tokens, batch_size, device):
    """One model on one fold: per example its k beams with scores, and its target NLL with its
    own source, with another focal class's source (partner) and with an empty source <s></s>."""
    t0, (own, other, empty) = (
        time.time(),
        source_nll(model, src, tgt, [src[j] for j in partner], batch_size, device),
    )
    beam = beam_search(model, src, k, beams, max_new_tokens, batch_size, device)
    out = []
    for (s, n), (so, _), (se, _), (seqs, scores) in zip(own, other, empty, beam):
        # a beam that never wrote </s> ran to max_new_tokens: an unfinished test (seq[0] is the
        # start token, </s>)
        finished = [EOS in seq[1:] for seq in seqs]
        out.append(
            {
                "predictions": tok.decode_batch(seqs),
                "scores": scores,
                "finished": finished,
                "nll": s,
                "tokens": n,
                "nll_other_source": so,
                "nll_empty_source": se,
            }
        )
    print(f"{len(out)} examples scored in {time.time() - t0:.0f}s")
    return out


def score_run(
    run, limit=None, beams=5, max_new_tokens=None, batch_size=16, device="cpu", rescore=False
):
    """Both models on the run's test fold -> predictions.jsonl, metrics.json; returns the
    metrics. The base's side comes from runs/.cache/ when this fold was scored with the same
    base, tokenizer and decoding before."""
    run, cfg, k = Path(run), runs.run_config(run), min(K, beams)
    runs.lock_run(run)  # not while train.py (or another evaluate.py) writes it
    records = data.load_project(cfg["corpus"])
    if cfg.get("corpus_checksum") and data.records_checksum(records) != cfg["corpus_checksum"]:
        raise SystemExit(
            f"{cfg['corpus']} has changed since {run} was trained on it (corpus_checksum in "
            f"{run / 'config.json'}): its test fold may hold training examples now; train a new run "
            f"(another --name) on the corpus as it is"
        )
    test = data.folds(records, cfg["fold"], cfg["k_folds"], cfg["seed"])[2][:limit]
    # the test fold is train.py's, as are the lengths
    max_new_tokens = max_new_tokens or cfg["max_tgt_len"]
    decoding = dict(
        num_beams=beams,
        num_return_sequences=k,
        max_new_tokens=max_new_tokens,
        length_penalty=1.0,
        early_stopping=True,
        limit=limit,
        abstraction="single",
    )
    if rescore:
        rows = data.read_jsonl(run / "predictions.jsonl")
        runs.check_predictions(rows, run / "predictions.jsonl", [r["id"] for r in test])
        # as generated
        decoding = {**json.loads((run / "metrics.json").read_text())["decoding"], "rescored": True}
    else:
        tok = load_tokenizer(cfg["tokenizer"])
        src, tgt, _ = encode_pairs(
            tok, test, cfg["max_src_len"], cfg["max_tgt_len"], src_key=f"src_{cfg['focal_context']}"
        )
        # <s> t1..tn </s> -> t1..tn </s>: what train.py's decoder learns to predict
        tgt = [t[1:] for t in tgt]
        partner, rows = (
            data.other_class_partners(test),
            [{"id": r["id"], "reference": r["tgt"]} for r in test],
        )

        def score(m):
            return score_model(
                m, tok, src, tgt, partner, k, beams, max_new_tokens, batch_size, device
            )

        base, cust = runs.load_models(run, cfg, tok.get_vocab_size(), device)
        key = [
            runs.checksum(cfg["base"]),
            runs.checksum(cfg["tokenizer"]),
            decoding,
            src,
            tgt,
            partner,
            [r["id"] for r in rows],
        ]
        # all it depends on is in key
        base_rows = runs.cached(run.parent / ".cache", "base", key, lambda: score(base))
        print("customized: scoring")
        for r, b, c in zip(rows, base_rows, score(cust)):
            r.update(base=b, customized=c)
    metrics = {name: model_metrics(rows, name, k) for name in MODELS}
    data.atomic_write(
        run / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    data.atomic_write(run / "metrics.json", json.dumps({**metrics, "decoding": decoding}, indent=1))
    print_summary(run, cfg, metrics, k)
    return metrics


def print_summary(run, cfg, metrics, k):
    # a line cut by a kill: dropped
    log = runs.read_log(run / "log.jsonl") if (run / "log.jsonl").is_file() else []
    sup = [l for l in log if l.get("stage", "supervised") == "supervised"]
    # compute up to the kept checkpoint
    pf = min(sup, key=lambda l: l["val_loss"])["pf_s_exact"] if sup else 0.0
    cols = ("exact@1", f"exact@{k}", "abstracted@1", f"abstracted@{k}")
    print(
        f"\n| {run.name} | BLEU-4 | perplexity | "
        + " | ".join(cols)
        + " | unfinished@1 | source_gain | "
        "ppl other / empty source | trainable | PF-s |\n" + "|---" * 12 + "|"
    )
    for name, m in metrics.items():
        cost = (
            f"{cfg.get('trainable_parameters', 0):,} | {pf:.4f}"
            if name == "customized"
            else "- | -"
        )
        unfinished = "-" if m["unfinished@1"] is None else f"{100 * m['unfinished@1']:.1f}%"
        print(
            f"| {name} | {m['bleu4']:.1f} | {m['perplexity']:.3f} | "
            + " | ".join(f"{100 * m[c]:.1f}%" for c in cols)
            + f" | {unfinished} | {m['source_gain']:.3f} | {m['perplexity_other_source']:.2f} / {m['perplexity_empty_source']:.2f} | {cost} |"
        )
    print(
        "source_gain: perplexity with another focal class's source / with the example's own; 1.000 = the model "
        "ignores its input"
        + (
            "  <-- THE BASE DOES NOT READ ITS INPUT"
            if metrics["base"]["source_gain"] < 1.05
            else ""
        )
    )


# --- the report over a folder of runs: Tables 3-4 (markdown), Figures 3-4 (PNG)
# -----------------------------
def report(root):
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")  # files only, no display
    # E: (project, fold, column, run) -> (M, run dir, model); base once a fold
    root, E, logs = Path(root), {}, {}
    for d in sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()):
        cfg, m = (
            json.loads((d / "config.json").read_text()),
            json.loads((d / "metrics.json").read_text()),
        )
        E[cfg["project"], cfg["fold"], "base", ""] = (m["base"], d, "base")
        E[cfg["project"], cfg["fold"], cfg["strategy"], d.name] = (m["customized"], d, "customized")
        logs.setdefault(cfg["strategy"], []).append(d / "log.jsonl")
    if not E:
        raise FileNotFoundError(
            f"{root}: no run folder with metrics.json (score runs with `python evaluate.py RUN`)"
        )
    cols, projects = (
        ["base"] + [s for s in strategies.STRATEGIES if s in logs],
        sorted({key[0] for key in E}),
    )
    have = {c: [p for p in projects if any(key[0] == p and key[2] == c for key in E)] for c in cols}

    # one project: the mean over its folds; no project: the mean of those (the paper's)
    def mean(metric, c, p=None):
        if p is None:
            return float(np.mean([mean(metric, c, q) for q in have[c]]))
        return float(np.mean([v[0][metric] for key, v in E.items() if key[2] == c and key[0] == p]))

    md, fmt = (
        ["# Results: Table 3 and Table 4 analogues", ""],
        {"bleu4": "{:.1f}", "perplexity": "{:.3f}", "source_gain": "{:.3f}"},
    )

    def row(label, cells):
        return f"| {label} | " + " | ".join(cells) + " |"

    head = [row("", cols), "|---" * (len(cols) + 1) + "|"]
    for metric in fmt:
        f = fmt[metric].format
        md += [
            f"## Table 3: {metric} (per project: mean over folds; average: over projects)",
            "",
            *head,
        ]
        md += [
            row(p, [f(mean(metric, c, p)) if p in have[c] else "-" for c in cols]) for p in projects
        ]
        md += [
            row("**average**", [f(mean(metric, c)) for c in cols]),
            row(
                "paper average",
                [f(PAPER_T3[metric][c]) if c in PAPER_T3.get(metric, {}) else "-" for c in cols],
            ),
            "",
        ]
        kw = kruskal_table({c: [mean(metric, c, p) for p in have[c]] for c in cols})
        md += [
            f"## Table 4: Kruskal-Wallis p-values over projects, {metric} (paper: base vs each strategy 3e-08, "
            "between strategies 0.4-0.9)",
            "",
            *head,
        ]
        md += [
            row(
                a,
                [
                    "-" if v is None else "n/a" if math.isnan(v) else f"{v:.2g}"
                    for v in kw[a].values()
                ],
            )
            for a in cols
        ] + [""]
        md += (
            [
                "n/a: a side with one project or one repeated value (run more PROJECTS for a test over projects).",
                "",
            ]
            if any(v is not None and math.isnan(v) for a in cols for v in kw[a].values())
            else []
        )
    # Figure 3: (a) top-k curves, (b) style cosines
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    # the beams every run returned
    k = min(sum(m.startswith("exact@") for m in v[0]) for v in E.values())
    for i, c in enumerate(cols):
        for kind, ls in (("exact", "-"), ("abstracted", ":")):
            ax.plot(
                range(1, k + 1),
                [100 * mean(f"{kind}@{j}", c) for j in range(1, k + 1)],
                ls,
                color=f"C{i}",
                label=f"{c} {kind}",
            )
        cos = [
            row[who]["style_cosine"]
            for key, (_, d, who) in E.items()
            if key[2] == c and (d / "predictions.jsonl").is_file()
            for row in data.read_jsonl(d / "predictions.jsonl")
        ]
        bx.hist(cos, bins=20, range=(0, 1), histtype="step", density=True, color=f"C{i}", label=c)
    for who, (ex, ab) in PAPER_F3.items():
        ax.plot(
            [1, 1],
            [ex, ab],
            "x",
            color="k" if who == "base" else "grey",
            label=f"paper {who} top-1",
        )
    ax.set(
        xlabel="k",
        xticks=range(1, k + 1),
        ylabel="in the top k (%)",
        title="(a) exact (solid), abstracted (dots)",
    )
    bx.set(
        xlabel="tf-idf cosine of identifiers, generated vs developer",
        ylabel="density",
        title="(b) coding style",
    )
    (
        ax.legend(fontsize=6),
        bx.legend(fontsize=7),
        fig.tight_layout(),
        fig.savefig(root / "fig3.png", dpi=120),
    )
    # Figure 4: validation loss vs PF-s, both FLOP conventions
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("pf_s_paper", "pf_s_exact")):
        for c in cols[1:]:
            curves = [
                xy
                for f in logs[c]
                if f.is_file()
                for xy in [
                    np.array(
                        [
                            (l[key], l["val_loss"])
                            for l in runs.read_log(f)
                            if l.get("val_loss") is not None
                        ]
                    ).T
                ]
                if xy.size
            ]
            for x, y in curves:  # light: each project and fold
                ax.plot(x, y, color=f"C{cols.index(c)}", alpha=0.3, lw=0.8)
            if curves:  # bold: the mean over the compute range that every run covers
                grid = np.linspace(max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves), 50)
                ax.plot(
                    grid,
                    np.mean([np.interp(grid, x, y) for x, y in curves], 0),
                    color=f"C{cols.index(c)}",
                    lw=2,
                    label=c,
                )
        (
            ax.set(xlabel=f"compute (PF-s, {key[5:]} FLOP convention)", ylabel="validation loss"),
            ax.legend(),
        )
    fig.tight_layout(), fig.savefig(root / "fig4.png", dpi=120)
    data.atomic_write(
        root / "report.md",
        "\n".join(md + ["![Figure 3](fig3.png)", "", "![Figure 4](fig4.png)", ""]),
    )
    print("\n".join(md))


# --- the command line (evaluate.py generate: serve.py)
# -------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Score a run (evaluate.py RUN), build the report (--report DIR), or write "
        "tests (evaluate.py generate: --run RUN --java FILE --method NAME, or --runs A,B "
        "--requests FILE --out FILE to serve many runs from one base)"
    )
    for flag, kw in [
        ("run", dict(nargs="?", help="a run folder, or `generate`")),
        ("--report", {}),
        ("--java", {}),
        ("--limit", dict(type=data.positive_int)),
        ("--rescore", dict(action="store_true")),
        ("--method", {}),
        ("--beams", dict(type=data.positive_int, default=5)),
        ("--max-new-tokens", dict(type=data.positive_int)),
        ("--batch-size", dict(type=data.positive_int, default=16)),
        ("--run", dict(dest="generate_run")),
        ("--runs", {}),
        ("--requests", {}),
        ("--out", {}),
        ("--k", dict(type=data.positive_int, default=K)),
        ("--device", dict(default="cuda" if torch.cuda.is_available() else "cpu")),
    ]:
        ap.add_argument(flag, **kw)
    a = ap.parse_args(argv)
    if a.run == "generate" and (
        a.runs and a.requests and a.out or a.generate_run and a.java and a.method
    ):
        import serve  # many runs' deltas over one base, one batch

        serve.command(a)
    elif a.report:
        report(a.report)
    elif a.run and a.run != "generate":
        score_run(a.run, a.limit, a.beams, a.max_new_tokens, a.batch_size, a.device, a.rescore)
    else:
        ap.error(
            "give a run folder, --report DIR, or generate with --run RUN --java FILE --method NAME, or with "
            "--runs A,B --requests FILE --out FILE"
        )


if __name__ == "__main__":
    data.cli(main)
