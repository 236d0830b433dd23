"""Scores a customized model against the base on its project's test fold, and builds the paper's
report (§3.2 RQ1 intrinsic metrics, §3.3 RQ2 task metrics; Tables 3-4, Figures 3-4).

    python evaluate.py runs/<name> [--limit N] [--beams 5] [--rescore]
        [--max-new-tokens N: default the run's max_tgt_len]
    python evaluate.py --report runs/       # runs/report.md (Tables 3-4), runs/fig3.png, fig4.png
    python evaluate.py generate --run runs/<name> --java Foo.java --method bar [--k 5]
        # tests for your own code
    python evaluate.py generate --runs runs/a,runs/b --requests requests.jsonl --out tests.jsonl
        # many runs served from one base (serve.py)

metrics.json = {"base": M, "customized": M, "decoding": {...}}, written only here (atomically); M
holds
- bleu4: sacrebleu's corpus BLEU (0-100) of the top-1 beam; both sides cut into Java tokens by
  `abstract_java.java_tokens`, space-joined, tokenize="none" (a string literal with spaces counts
  as several tokens);
- perplexity: exp(total NLL / total target tokens) over the fold, teacher-forced, pads excluded;
  the targets are laid out as data/batch.py says (the labels t1..tn </s>): </s> counts, the
  encoding's leading <s> does not. The tables use this per-token figure (§3.2);
  `perplexity_mean_per_example` is stored beside it;
- exact@j, abstracted@j (j = 1..k, the beams returned): share of examples with one of the first j
  beams equal to the reference, all whitespace deleted (§3.3), or after src2abs of each side ON
  ITS OWN (`abstract_java.abstract`, compat=False; pair mode's shared ids would keep `x` and `y`
  apart: abstracted = exact, against Figure 3a);
- style_cosine: mean cosine of (top-1, reference) in a tf-idf space fit per project on identifier
  documents (`abstract_java.identifiers`) of the reference and generated tests; syntax_valid:
  share of non-empty top-1 tests that tree-sitter-java parses in `class _ { ... }` without ERROR
  or MISSING nodes; n: examples scored;
- source_gain = perplexity_other_source / perplexity: the targets scored against the source of an
  example of ANOTHER focal class (data.other_class_partners) over their own; 1.0 exactly for a
  model that ignores its input (docs/source-gain.md); perplexity_empty_source: against the empty
  source <s></s>.
The base's scores on a (fold, decoding, base, tokenizer) are computed once for every strategy's run
(runs/.cache/).
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import abstract_java
import data
import runs
import strategies
from data.batch import labels, sorted_batches
from data.tokenizer import EOS, encode_pairs, load_tokenizer
from losses import source_nll

K = 5  # top-k of Figure 3a
# execute.py's figures in metrics.json (after `make execute`), reported where every run has them
EXECUTION = ("compile@5", "pass@5", "focal_covered@5")
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

    hyp_lines = [lex(h) for h in hyps]
    ref_lines = [lex(r) for r in refs]
    return sacrebleu.corpus_bleu(hyp_lines, [ref_lines], tokenize="none").score


def perplexity(nll, ntok):
    """nll[i]: summed NLL of example i's target tokens, ntok[i]: their number -> (per token, mean
    per example)."""
    per_token = math.exp(sum(nll) / sum(ntok))
    per_example = float(np.mean([math.exp(a / b) for a, b in zip(nll, ntok)]))
    return per_token, per_example


def topk_matches(preds, refs, k=K, abstract=lambda code: abstract_java.abstract(code)[0].split()):
    """preds[i]: the beams of example i, best first -> {"exact@1": share, ..., "abstracted@k":
    share}. Nothing matches an empty side: an empty beam is no test, and a reference that
    abstracts to nothing has nothing to match."""

    def squeeze(s):
        return "".join(s.split())

    # (exact | abstracted, example, beam)
    hits = np.zeros((2, len(refs), k), dtype=bool)
    for i, (beams, ref) in enumerate(zip(preds, refs)):
        ref_abs = abstract(ref)
        for j, p in enumerate(beams[:k]):
            hits[0, i, j] = squeeze(p) == squeeze(ref) != ""
            hits[1, i, j] = abstract(p) == ref_abs != []
    # (2, n, k): any of the first j beams
    cum = hits.cumsum(axis=2) > 0
    shares = {}
    for m, kind in enumerate(("exact", "abstracted")):
        for j in range(k):
            shares[f"{kind}@{j + 1}"] = float(cum[m, :, j].mean())
    return shares


def style_cosines(generated, references):
    """Cosine between each generated test and its reference in the tf-idf space of identifier
    documents."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def documents(codes):
        return [" ".join(abstract_java.identifiers(c)) for c in codes]

    g = documents(generated)
    r = documents(references)
    if not any(d.strip() for d in g + r):
        # no identifier anywhere (sklearn refuses an empty vocabulary)
        return [0.0] * len(g)
    # callable analyzer: identifiers whole, case kept
    vec = TfidfVectorizer(analyzer=str.split).fit(r + g)
    # rows L2-normed
    products = vec.transform(g).multiply(vec.transform(r))
    return np.asarray(products.sum(axis=1)).ravel().tolist()


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

    table = {}
    for a in groups:
        table[a] = {}
        for b in groups:
            if a == b:
                table[a][b] = None
            elif flat(a, b):
                table[a][b] = float("nan")
            else:
                table[a][b] = float(kruskal(groups[a], groups[b]).pvalue)
    return table


def model_metrics(rows, name, k=K):
    """M for model `name` from predictions.jsonl rows; also stores each row's style cosine
    (Figure 3b)."""
    refs = [r["reference"] for r in rows]
    preds = [r[name]["predictions"] for r in rows]
    top1 = [p[0] for p in preds]
    cos = style_cosines(top1, refs)
    for r, c in zip(rows, cos):
        r[name]["style_cosine"] = c
    ntok = [r[name]["tokens"] for r in rows]
    ppl, ppl_mean = perplexity([r[name]["nll"] for r in rows], ntok)
    other = perplexity([r[name]["nll_other_source"] for r in rows], ntok)[0]
    empty = perplexity([r[name]["nll_empty_source"] for r in rows], ntok)[0]
    # unfinished@1: the share of top-1 outputs that ran to the length limit without </s> before it
    # (a looping or cut test; score_model); None for predictions written before it was recorded
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


# --- the model side: beam search, batched by source length (the teacher-forced NLL: losses.py)
# ----------------------------
@torch.no_grad()
def beam_search(model, src, k=K, beams=5, max_new_tokens=256, batch_size=16, device="cpu"):
    """[(k id lists best first, k scores)] per example, from model.generate (length-normalised
    log-probs)."""
    out = {}
    for idx, ids, mask in sorted_batches(src, batch_size, device):
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
        seqs = seqs.view(len(idx), k, -1).tolist()
        scores = scores.view(len(idx), k).tolist()
        out.update(zip(idx, zip(seqs, scores)))
    return [out[i] for i in range(len(src))]


# --- a run on one fold: both models scored, the base once per fold and decoding (runs.cached)
# ---------------
def score_model(
    model, tok, src, tgt, partner, k, beams, max_new_tokens, max_tgt_len, batch_size, device
):
    """One model on one fold: per example its k beams with scores, and its target NLL with its
    own source, with another focal class's source (partner) and with an empty source <s></s>.
    A beam is finished when it writes </s> before the training targets' length limit
    (max_tgt_len)."""
    t0 = time.time()
    other_src = [src[j] for j in partner]
    own, other, empty = source_nll(model, src, tgt, other_src, batch_size, device)
    beam = beam_search(model, src, k, beams, max_new_tokens, batch_size, device)
    out = []
    for (s, n), (so, _), (se, _), (seqs, scores) in zip(own, other, empty, beam):
        # unfinished: a beam that wrote no </s> before index max_tgt_len - 1 (seq[0] is the start
        # token, </s>; seq[i] the i-th label). A training target has at most max_tgt_len - 1
        # labels, so a </s> at that index is where a cut target ended in training, not where the
        # test closed (a base trained on targets cut with </s> learned to write one there), and a
        # beam with no </s> ran to max_new_tokens
        finished = [EOS in seq[1 : max_tgt_len - 1] for seq in seqs]
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


def held_out_fold(run, cfg, limit):
    """The run's test fold (the first `limit` records), from its corpus as it was trained on."""
    records = data.load_project(cfg["corpus"])
    if cfg.get("corpus_checksum") and data.records_checksum(records) != cfg["corpus_checksum"]:
        raise SystemExit(
            f"{cfg['corpus']} has changed since {run} was trained on it (corpus_checksum in "
            f"{run / 'config.json'}): its test fold may hold training examples now; train a new "
            f"run (another --name) on the corpus as it is"
        )
    return data.folds(records, cfg["fold"], cfg["k_folds"], cfg["seed"])[2][:limit]


def score_both(run, cfg, test, decoding, batch_size, device):
    """predictions.jsonl's rows: both models' beams and NLLs on the test records; the base's side
    from runs/.cache/ when this fold was scored with the same base, tokenizer and decoding
    before."""
    k = decoding["num_return_sequences"]
    beams = decoding["num_beams"]
    max_new_tokens = decoding["max_new_tokens"]
    tok = load_tokenizer(cfg["tokenizer"])
    key = f"src_{cfg['focal_context']}"
    src, tgt, _ = encode_pairs(tok, test, cfg["max_src_len"], cfg["max_tgt_len"], src_key=key)
    # <s> t1..tn </s> -> t1..tn </s>: what train.py's decoder learns to predict
    tgt = [labels(t) for t in tgt]
    partner = data.other_class_partners(test)
    rows = [{"id": r["id"], "reference": r["tgt"]} for r in test]

    def score(m):
        return score_model(
            m,
            tok,
            src,
            tgt,
            partner,
            k,
            beams,
            max_new_tokens,
            cfg["max_tgt_len"],
            batch_size,
            device,
        )

    base, cust = runs.load_models(run, cfg, tok.get_vocab_size(), device)
    cache_key = [
        # how `finished` is judged (score_model): a base scored under the earlier rule is scored again
        f"finished: </s> before index {cfg['max_tgt_len'] - 1}",
        runs.checksum(cfg["base"]),
        runs.checksum(cfg["tokenizer"]),
        decoding,
        src,
        tgt,
        partner,
        [r["id"] for r in rows],
    ]
    # all it depends on is in cache_key
    base_rows = runs.cached(run.parent / ".cache", "base", cache_key, lambda: score(base))
    print("customized: scoring")
    for r, b, c in zip(rows, base_rows, score(cust)):
        r.update(base=b, customized=c)
    return rows


def score_run(
    run, limit=None, beams=5, max_new_tokens=None, batch_size=16, device="cpu", rescore=False
):
    """Both models on the run's test fold -> predictions.jsonl, metrics.json; returns the
    metrics. The base's side comes from runs/.cache/ when this fold was scored with the same
    base, tokenizer and decoding before; --rescore: the metrics again from predictions.jsonl."""
    # the folder as given (an error names it so)
    cfg = runs.run_config(run)
    run = Path(run)
    k = min(K, beams)
    # not while train.py (or another evaluate.py) writes it
    runs.lock_run(run)
    test = held_out_fold(run, cfg, limit)
    decoding = dict(
        num_beams=beams,
        num_return_sequences=k,
        # the lengths are train.py's
        max_new_tokens=max_new_tokens or cfg["max_tgt_len"],
        length_penalty=1.0,
        early_stopping=True,
        limit=limit,
        abstraction="single",
    )
    if rescore:
        rows = data.read_jsonl(run / "predictions.jsonl")
        runs.check_predictions(rows, run / "predictions.jsonl", [r["id"] for r in test])
        # as generated
        generated = json.loads((run / "metrics.json").read_text())["decoding"]
        decoding = {**generated, "rescored": True}
    else:
        rows = score_both(run, cfg, test, decoding, batch_size, device)
    metrics = {name: model_metrics(rows, name, k) for name in MODELS}
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    keep_execution(run, lines, metrics)
    data.atomic_write(run / "predictions.jsonl", lines)
    data.atomic_write(run / "metrics.json", json.dumps({**metrics, "decoding": decoding}, indent=1))
    print_summary(run, cfg, metrics, k)
    return metrics


def keep_execution(run, lines, metrics):
    """The execution figures of run/execution.json (execute.py) added to `metrics` when they were
    measured on these very predictions; when the predictions changed, the file is stale and is
    removed (run `make execute` again)."""
    path = run / "execution.json"
    if not path.is_file():
        return
    old = run / "predictions.jsonl"
    if old.is_file() and old.read_text(encoding="utf-8") == lines:
        import execute

        execute.add_figures(metrics, json.loads(path.read_text())["summary"])
        return
    path.unlink()
    print(f"{path} removed: it was measured on other predictions; run make execute RUN={run}")


def md_row(cells):
    """A markdown table row."""
    return "| " + " | ".join(cells) + " |"


def kept_pf_s(run):
    """The compute (PF-s, exact) up to the kept checkpoint: the supervised evaluation with the
    lowest validation loss in the run's log.jsonl; 0 without one."""
    # a line cut by a kill: dropped
    log = runs.read_log(run / "log.jsonl") if (run / "log.jsonl").is_file() else []
    supervised = [line for line in log if line.get("stage", "supervised") == "supervised"]
    if not supervised:
        return 0.0
    return min(supervised, key=lambda line: line["val_loss"])["pf_s_exact"]


def print_summary(run, cfg, metrics, k):
    """The run's results table: a row per model, and whether the base reads its input."""
    pf = kept_pf_s(run)
    cols = ("exact@1", f"exact@{k}", "abstracted@1", f"abstracted@{k}")
    header = [run.name, "BLEU-4", "perplexity", *cols, "unfinished@1", "source_gain"]
    header += ["ppl other / empty source", "trainable", "PF-s"]
    # execute.py's figures, where `make execute` merged them: compile@1, compile@k, pass@1, ...
    measured = [
        c for c in metrics["base"] if c.split("@")[0] in ("compile", "pass", "focal_covered")
    ]
    executed = bool(measured) and all(c in m for m in metrics.values() for c in measured)
    if executed:
        header += measured
    print("\n" + md_row(header) + "\n" + "|---" * len(header) + "|")
    for name, m in metrics.items():
        if name == "customized":
            cost = [f"{cfg.get('trainable_parameters', 0):,}", f"{pf:.4f}"]
        else:
            cost = ["-", "-"]
        if m["unfinished@1"] is None:
            unfinished = "-"
        else:
            unfinished = f"{100 * m['unfinished@1']:.1f}%"
        sides = f"{m['perplexity_other_source']:.2f} / {m['perplexity_empty_source']:.2f}"
        cells = [name, f"{m['bleu4']:.1f}", f"{m['perplexity']:.3f}"]
        cells += [f"{100 * m[c]:.1f}%" for c in cols]
        cells += [unfinished, f"{m['source_gain']:.3f}", sides, *cost]
        if executed:
            cells += [percent(m[c]) for c in header[len(cells) :]]
        print(md_row(cells))
    note = (
        "source_gain: perplexity with another focal class's source / with the example's own; "
        "1.000 = the model ignores its input"
    )
    if metrics["base"]["source_gain"] < 1.05:
        note += "  <-- THE BASE DOES NOT READ ITS INPUT"
    print(note)
    if executed:
        base = metrics["base"]
        print(
            f"compile / pass / focal_covered: over the {base['valid_pairs']} pairs whose reference "
            "test compiles and passes in the harness "
            f"(harness_valid {percent(base['harness_valid'])})"
        )


def percent(share):
    """A share as a percentage; "not run" where the harness did not run (no JDK or sandbox)."""
    if share is None:
        return "not run"
    return f"{100 * share:.1f}%"


# --- the report over a folder of runs: Tables 3-4 (markdown), Figures 3-4 (PNG)
# -----------------------------
class Scored(NamedTuple):
    """One model's scores on one fold: its metrics.json entry, the run folder, the model's key."""

    metrics: dict
    run: Path
    model: str


def collect_runs(root):
    """Every scored run under root -> (scores: {(project, fold, column, run name): Scored}, the
    base once a fold under column "base" and run name ""; logs: {strategy: [log.jsonl paths]})."""
    scores = {}
    logs = {}
    for d in sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()):
        cfg = json.loads((d / "config.json").read_text())
        m = json.loads((d / "metrics.json").read_text())
        fold = (cfg["project"], cfg["fold"])
        scores[(*fold, "base", "")] = Scored(m["base"], d, "base")
        scores[(*fold, cfg["strategy"], d.name)] = Scored(m["customized"], d, "customized")
        logs.setdefault(cfg["strategy"], []).append(d / "log.jsonl")
    if not scores:
        raise FileNotFoundError(
            f"{root}: no run folder with metrics.json (score runs with `python evaluate.py RUN`)"
        )
    return scores, logs


class Means:
    """The report's averages of one metric: per project the mean over its folds, and over the
    projects that have the column the mean of those (the paper's)."""

    def __init__(self, scores, columns):
        self.scores = scores
        projects = sorted({key[0] for key in scores})
        # column -> the projects with a score in it
        self.have = {}
        for c in columns:
            self.have[c] = [p for p in projects if any(k[0] == p and k[2] == c for k in scores)]

    def project(self, metric, column, project):
        values = [
            s.metrics[metric]
            for key, s in self.scores.items()
            if key[2] == column and key[0] == project
        ]
        return float(np.mean(values))

    def average(self, metric, column):
        return float(np.mean([self.project(metric, column, p) for p in self.have[column]]))


def table3(means, metric, fmt, cols, projects):
    """Table 3's analogue for one metric, markdown lines."""
    head = [md_row(["", *cols]), "|---" * (len(cols) + 1) + "|"]
    md = [f"## Table 3: {metric} (per project: mean over folds; average: over projects)", ""]
    md += head
    for p in projects:
        cells = [fmt(means.project(metric, c, p)) if p in means.have[c] else "-" for c in cols]
        md.append(md_row([p, *cells]))
    md.append(md_row(["**average**", *[fmt(means.average(metric, c)) for c in cols]]))
    paper = PAPER_T3.get(metric, {})
    md.append(md_row(["paper average", *[fmt(paper[c]) if c in paper else "-" for c in cols]]))
    md.append("")
    return md


def table4(means, metric, cols):
    """Table 4's analogue for one metric: Kruskal-Wallis p-values over projects, markdown lines."""
    head = [md_row(["", *cols]), "|---" * (len(cols) + 1) + "|"]
    groups = {c: [means.project(metric, c, p) for p in means.have[c]] for c in cols}
    kw = kruskal_table(groups)
    md = [
        f"## Table 4: Kruskal-Wallis p-values over projects, {metric} (paper: base vs each "
        "strategy 3e-08, between strategies 0.4-0.9)",
        "",
    ]
    md += head
    untested = False
    for a in cols:
        cells = []
        for v in kw[a].values():
            if v is None:
                cells.append("-")
            elif math.isnan(v):
                cells.append("n/a")
                untested = True
            else:
                cells.append(f"{v:.2g}")
        md.append(md_row([a, *cells]))
    md.append("")
    if untested:
        md.append(
            "n/a: a side with one project or one repeated value (run more PROJECTS for a test "
            "over projects)."
        )
        md.append("")
    return md


def figure3(plt, scores, means, cols, path):
    """Figure 3's analogue: (a) the top-k curves, (b) the style cosines."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    # the beams every run returned
    k = min(sum(m.startswith("exact@") for m in s.metrics) for s in scores.values())
    ks = range(1, k + 1)
    for i, c in enumerate(cols):
        for kind, ls in (("exact", "-"), ("abstracted", ":")):
            shares = [100 * means.average(f"{kind}@{j}", c) for j in ks]
            ax.plot(ks, shares, ls, color=f"C{i}", label=f"{c} {kind}")
        cos = []
        for key, s in scores.items():
            predictions = s.run / "predictions.jsonl"
            if key[2] == c and predictions.is_file():
                cos += [row[s.model]["style_cosine"] for row in data.read_jsonl(predictions)]
        bx.hist(cos, bins=20, range=(0, 1), histtype="step", density=True, color=f"C{i}", label=c)
    for who, (ex, ab) in PAPER_F3.items():
        color = "k" if who == "base" else "grey"
        ax.plot([1, 1], [ex, ab], "x", color=color, label=f"paper {who} top-1")
    ax.set(
        xlabel="k",
        xticks=ks,
        ylabel="in the top k (%)",
        title="(a) exact (solid), abstracted (dots)",
    )
    bx.set(
        xlabel="tf-idf cosine of identifiers, generated vs developer",
        ylabel="density",
        title="(b) coding style",
    )
    ax.legend(fontsize=6)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def loss_curve(log, key):
    """(compute `key`, validation loss) of a run's log.jsonl as a (2, n) array; None if no line
    has a validation loss."""
    points = [(l[key], l["val_loss"]) for l in runs.read_log(log) if l.get("val_loss") is not None]
    if not points:
        return None
    return np.array(points).T


def figure4(plt, logs, cols, path):
    """Figure 4's analogue: validation loss against PF-s, under both FLOP conventions; a light
    curve per project and fold, a bold one for the mean over the compute range every run
    covers."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("pf_s_paper", "pf_s_exact")):
        for c in cols[1:]:
            color = f"C{cols.index(c)}"
            curves = [loss_curve(f, key) for f in logs[c] if f.is_file()]
            curves = [xy for xy in curves if xy is not None]
            for x, y in curves:
                ax.plot(x, y, color=color, alpha=0.3, lw=0.8)
            if curves:
                grid = np.linspace(max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves), 50)
                mean = np.mean([np.interp(grid, x, y) for x, y in curves], 0)
                ax.plot(grid, mean, color=color, lw=2, label=c)
        ax.set(xlabel=f"compute (PF-s, {key[5:]} FLOP convention)", ylabel="validation loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(root):
    """Tables 3-4 (root/report.md, also printed) and Figures 3-4 (root/fig3.png, fig4.png) over
    every scored run under root."""
    import matplotlib.pyplot as plt

    # files only, no display
    plt.switch_backend("Agg")
    root = Path(root)
    scores, logs = collect_runs(root)
    cols = ["base"] + [s for s in strategies.STRATEGIES if s in logs]
    projects = sorted({key[0] for key in scores})
    means = Means(scores, cols)
    fmt = {"bleu4": "{:.1f}", "perplexity": "{:.3f}", "source_gain": "{:.3f}"}
    md = ["# Results: Table 3 and Table 4 analogues", ""]
    # the execution figures (execute.py), where every run has them
    executed = all(
        s.metrics.get(metric) is not None for s in scores.values() for metric in EXECUTION
    )
    if executed:
        for metric in EXECUTION:
            fmt[metric] = "{:.1%}"
    else:
        md += ["Execution figures: not in every run (`make execute RUN=...` on each run).", ""]
    for metric in fmt:
        md += table3(means, metric, fmt[metric].format, cols, projects)
        md += table4(means, metric, cols)
    # the figures are drawn to temporary files and renamed only after report.md is written:
    # a failure leaves the previous report and its figures as they were
    drawn = {name: root / f".tmp-{name}" for name in ("fig3.png", "fig4.png")}
    try:
        figure3(plt, scores, means, cols, drawn["fig3.png"])
        figure4(plt, logs, cols, drawn["fig4.png"])
        figures = ["![Figure 3](fig3.png)", "", "![Figure 4](fig4.png)", ""]
        data.atomic_write(root / "report.md", "\n".join(md + figures))
        for name, tmp in drawn.items():
            tmp.replace(root / name)
    finally:
        for tmp in drawn.values():
            tmp.unlink(missing_ok=True)
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
            "give a run folder, --report DIR, or generate with --run RUN --java FILE --method "
            "NAME, or with --runs A,B --requests FILE --out FILE"
        )


if __name__ == "__main__":
    data.cli(main)
