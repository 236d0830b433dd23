"""BART's text infilling on Java code: the denoising stage of the base model (paper §2.1; AthenaTest's recipe).

    python -m data.denoise --projects grpc-java truth    # prints a few noised examples and the masked share

AthenaTest was not trained from scratch on pairs: BART, pretrained by denoising English, was pretrained again by
denoising Java, then fine-tuned on methods2test (Tufano et al. 2020, arXiv 2009.05617, §3: the Java pretraining
lowered the validation loss by 25%). `train.py --mode=base` does the same in two stages; this file gives the first
stage its data. Text infilling (Lewis et al. 2020, BART §2.2): span lengths are drawn from Poisson(lambda = 3);
each span is replaced by ONE <mask> token (a span of length 0 inserts a <mask>); spans are drawn until 30% of the
tokens are masked. The decoder reconstructs the original, so it must find how many tokens each <mask> hides and
copy every other token from the encoder: the skill a base that reads its focal method needs, learned before the
decoder has a language model of tests to fall back on.

Our choices, where the BART paper leaves them open: the last span is cut so exactly round(0.3 n) tokens are
masked; spans never touch (each sits in its own gap between unmasked tokens), so every <mask> is one span; no
random-token replacement and no sentence permutation (fairseq's bart.large used both; code has no sentences).
The text is Java of the BASE projects only (never a target project's): their focal methods in the base's focal
context and their test methods, each distinct string once, cut into windows that fit the model.
"""
import argparse

import numpy as np
import torch

from data.tokenizer import PAD


def span_lengths(n_mask, rng, poisson_lambda=3.0):
    """Poisson(lambda) span lengths, in draw order, until they cover n_mask tokens; the last one is cut to fit."""
    lengths = []
    while sum(lengths) < n_mask:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - n_mask
    return lengths


def infill(ids, rng, mask_id, ratio=0.3, poisson_lambda=3.0):
    """ids: a list of token ids (no <s>/</s>) -> (noised ids, spans). spans: [(position in the noised list of the
    <mask>, the original ids it replaced)], in order; replacing each <mask> by its ids gives `ids` back."""
    n = len(ids)
    n_mask = int(round(ratio * n))
    lengths = span_lengths(n_mask, rng, poisson_lambda)
    n_keep = n - n_mask
    while len(lengths) > n_keep + 1:  # more spans than gaps (very short inputs): drop an empty one, else merge two
        lengths.remove(0) if 0 in lengths else lengths.append(lengths.pop() + lengths.pop())
    # the n_keep unmasked tokens leave n_keep + 1 gaps; each span takes a distinct gap, in random order
    gaps = sorted(rng.choice(n_keep + 1, size=len(lengths), replace=False).tolist())
    order = rng.permutation(len(lengths)).tolist()
    span_at = {g: lengths[o] for g, o in zip(gaps, order)}
    out, spans, i = [], [], 0
    for gap in range(n_keep + 1):
        if gap in span_at:
            spans.append((len(out), ids[i:i + span_at[gap]]))
            out.append(mask_id)
            i += span_at[gap]
        if gap < n_keep:
            out.append(ids[i])
            i += 1
    assert i == n, "every token is either kept or inside one span"
    return out, spans


def word_dropout(dec, p, mask_id, generator=None):
    """Target-side word dropout (Sennrich and Zhang 2019, §3): each token the decoder READS, but its first
    (</s>) and the pads, becomes <mask> with probability p; the labels are not touched. With its own previous
    tokens hidden, the decoder must take more from the source. dec: (B, T) decoder input ids -> a new tensor."""
    drop = torch.rand(dec.shape, generator=generator, device=dec.device) < p
    drop[:, 0] = False
    return torch.where(drop & (dec != PAD), torch.full_like(dec, mask_id), dec)


def texts(records, focal_context):
    """The denoising corpus of the base projects' records: each distinct focal method (in `focal_context`) and
    each distinct test method, in record order."""
    seen = {}
    for r in records:
        for t in (r[f"src_{focal_context}"], r["tgt"]):
            seen.setdefault(t, None)
    return list(seen)


def windows(tok, strings, length):
    """Token windows of at most `length` ids (no specials): a long string gives several, in order."""
    out = []
    for e in tok.encode_batch(strings, add_special_tokens=False):
        out += [e.ids[i:i + length] for i in range(0, len(e.ids), length)]
    return [w for w in out if len(w) >= 4]


def noised_pairs(tok, windows_, seed, epoch, ratio=0.3, poisson_lambda=3.0):
    """(sources, targets) as encode_pairs gives them (<s> ... </s>): this epoch's noising of every window, seeded
    by (seed, epoch) so a resumed run sees the same noise. The sources are never longer than the targets."""
    from data.tokenizer import BOS, EOS
    rng, mask_id = np.random.default_rng([seed, epoch + 1]), tok.token_to_id("<mask>")  # epoch -1: validation
    src = [[BOS] + infill(w, rng, mask_id, ratio, poisson_lambda)[0] + [EOS] for w in windows_]
    return src, [[BOS] + w + [EOS] for w in windows_]


def stage(tok, train_records, val_records, focal_context, width, seed, n_val=256, **noise):
    """The denoising stage's data: the windows of the training records (noised afresh every epoch with
    noised_pairs) and a fixed validation set, one noising of (at most) n_val windows of the validation records, as
    (sources, targets, partners) for train.source_check: each window's partner is the one half-way round."""
    val_windows = windows(tok, texts(val_records, focal_context), width)[:n_val]
    src, tgt = noised_pairs(tok, val_windows, seed, -1, **noise)
    return windows(tok, texts(train_records, focal_context), width), (src, tgt, [(i + len(src) // 2) % len(src)
                                                                               for i in range(len(src))])


def main():
    import data
    from data.tokenizer import load_tokenizer
    ap = argparse.ArgumentParser(description="Show BART text infilling on the base projects' Java.")
    ap.add_argument("--projects", nargs="*", default=data.DEFAULT_BASE)
    ap.add_argument("--tokenizer", default="data/cache/tokenizer.json")
    ap.add_argument("--focal-context", default="fm_fc")
    ap.add_argument("--length", type=int, default=126)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    w = windows(tok, texts(data.load_projects(args.projects), args.focal_context), args.length)
    src, tgt = noised_pairs(tok, w, seed=0, epoch=0)
    for s, t in list(zip(src, tgt))[:3]:
        print(f"noised  : {tok.decode(s, skip_special_tokens=False)}\noriginal: {tok.decode(t)}\n")
    n_mask = sum(len(t) - 2 for t in tgt) - sum(len(s) - 2 - s.count(tok.token_to_id('<mask>')) for s in src)
    print(f"{len(w)} windows, {sum(len(t) - 2 for t in tgt):,} tokens, {n_mask / sum(len(t) - 2 for t in tgt):.1%} masked")


if __name__ == "__main__":
    from data import cli
    cli(main)
