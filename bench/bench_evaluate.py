"""Benchmark of scoring one test fold as evaluate.py does (§3.2-3.3): where the time goes.

N real pairs (default 500, the target project commons-io), the `tiny` preset with random weights on
CPU, beam 5, top-5; each stage timed on its own with wall-clock time: encode (data/ tokenizer),
perplexity (teacher-forced forward), beam search (model.generate), decode, BLEU-4 (Java lexing +
sacrebleu), top-k matching (src2abs abstraction of every beam and reference), style (identifier
tf-idf), syntax (tree-sitter). evaluate.py runs the whole pipeline twice per run, once for the base
and once for the customized model.

Random weights rarely emit </s>, so every beam runs to --max-new-tokens: the beam search figure is a
worst case for that length (a trained model stops at its tests' length: commons-io's median test is
99 tokens, 35% exceed 128). On a 2-core machine shared with other jobs, --threads 1 gives steadier
(and here faster) figures than 2.

python bench/bench_evaluate.py [--n 500] [--max-src-len 256] [--max-new-tokens 128] [--batch-size
16] [--threads 2]"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch

import evaluate as ev
import losses
from data import load_project, load_projects, DEFAULT_BASE
from data.tokenizer import encode_pairs, load_tokenizer, train_tokenizer, corpus_texts
from model import BART, config_from_preset


def tokenizer():
    # the base tokenizer `make data` builds; else trained here on base projects
    path = "data/cache/tokenizer.json"
    if os.path.exists(path):
        return load_tokenizer(path), path
    return train_tokenizer(
        corpus_texts(load_projects(DEFAULT_BASE)), vocab_size=8192
    ), f"trained now on {DEFAULT_BASE}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default="commons-io")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)  # train.py's CPU max_tgt_len
    # train.py's CPU max_src_len (AthenaTest: 1024)
    ap.add_argument("--max-src-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="attn_impl; runs.load_models uses sdpa")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok, where = tokenizer()
    records = load_project(a.project)[: a.n]
    torch.manual_seed(0)
    model = BART(
        config_from_preset("tiny", vocab_size=tok.get_vocab_size(), dropout=0.0, attn_impl=a.attn)
    ).eval()
    print(
        f"{len(records)} pairs of {a.project}; tokenizer {where}; tiny preset, {model.num_parameters():,} params, "
        f"random weights, attn {a.attn}; beam {a.beams}, max_new_tokens {a.max_new_tokens}, batch {a.batch_size}; "
        f"{platform.machine()} CPU, {a.threads} threads, torch {torch.__version__}"
    )
    times, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name], t = now - t, now

    src, tgt, n_trunc = encode_pairs(tok, records, a.max_src_len, a.max_new_tokens)
    tgt = [t[1:] for t in tgt]  # the labels t1..tn </s>, as evaluate.score_run
    lap("encode (tokenizer)")
    nll = losses.target_nll(model, src, tgt, a.batch_size)
    lap("perplexity (teacher-forced forward)")
    beams = ev.beam_search(model, src, min(5, a.beams), a.beams, a.max_new_tokens, a.batch_size)
    lap("beam search (model.generate)")
    preds = [tok.decode_batch(seqs) for seqs, _ in beams]
    lap("decode (tokenizer)")
    refs, top1 = [r["tgt"] for r in records], [p[0] for p in preds]
    bleu = ev.bleu4(top1, refs)
    lap("BLEU-4 (java_tokens + sacrebleu)")
    topk = ev.topk_matches(preds, refs)
    lap("top-k exact + abstracted (src2abs)")
    cos = ev.style_cosines(top1, refs)
    lap("style (identifiers + tf-idf)")
    syn = ev.syntax_valid(top1)
    lap("syntax (tree-sitter)")
    ppl, _ = ev.perplexity(*zip(*nll))
    total = sum(times.values())
    # generated tokens, pads excluded
    gen = sum(sum(x != 1 for x in seq[1:]) for seqs, _ in beams for seq in seqs)
    print(f"\n{'stage':40} {'seconds':>8} {'share':>7}")
    for name, s in times.items():
        print(f"{name:40} {s:8.2f} {s / total:7.1%}")
    print(f"{'total for one model':40} {total:8.2f}\n")
    print(
        f"{n_trunc} pairs truncated to {a.max_src_len}/{a.max_new_tokens} tokens; "
        f"{sum(map(len, src)) / len(src):.0f} source tokens on average; "
        f"{gen / len(src) / min(5, a.beams):.0f} tokens per returned beam, "
        f"{gen / times['beam search (model.generate)']:.0f} returned-beam tokens/s"
    )
    print(
        f"sanity (random weights): bleu4 {bleu:.2f}, perplexity {ppl:.0f} (vocab {tok.get_vocab_size()}), "
        f"exact@5 {topk['exact@5']:.3f}, abstracted@5 {topk['abstracted@5']:.3f}, style {sum(cos) / len(cos):.3f}, "
        f"syntax {syn:.3f}"
    )


if __name__ == "__main__":
    main()
