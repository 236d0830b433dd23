"""BART's text infilling on Java code: the denoising stage of the base model (paper §2.1;
AthenaTest's recipe).

# prints a few noised examples and the masked share
python -m data.denoise --projects grpc-java truth

AthenaTest was not trained from scratch on pairs: BART, pretrained by denoising English, was
pretrained again by denoising Java, then fine-tuned on methods2test (Tufano et al. 2020, arXiv
2009.05617, §3: the Java pretraining lowered the validation loss by 25%). `train.py --mode=base`
does the same in two stages; this file gives the first stage its data. Text infilling (Lewis et al.
2020, BART §2.2): span lengths are drawn from Poisson(lambda = 3); each span is replaced by ONE
<mask> token (a span of length 0 inserts a <mask>); spans are drawn until 30% of the tokens are
masked. The decoder reconstructs the original, so it must find how many tokens each <mask> hides and
copy every other token from the encoder: the skill a base that reads its focal method needs, learned
before the decoder has a language model of tests to fall back on.

Our choices, where the BART paper leaves them open: the last span is cut so exactly round(0.3 n)
tokens are masked; spans never touch (each sits in its own gap between unmasked tokens), so every
<mask> is one span; no random-token replacement and no sentence permutation (fairseq's bart.large
used both; code has no sentences). The text is Java of the BASE projects only (never a target
project's), cut into windows that fit the model:
  - "pairs": their focal methods in the base's focal context and their test methods, each distinct
    string once;
  - "all": every .java file of their source trees (data/cache/src/<project>/, as data.fetch unpacked
    them), the licence header before `package` dropped and whitespace collapsed as the records' is,
    except the files of the test classes held out for the base's validation; in a seeded hash order
    of the files, up to `max_chars` characters (far more Java than a base's budget reads: the cap
    keeps the token lists in memory small).
"""

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import PAD


def span_lengths(n_mask, rng, poisson_lambda=3.0):
    """Poisson(lambda) span lengths, in draw order, until they cover n_mask tokens; the last one
    is cut to fit."""
    lengths = []
    while sum(lengths) < n_mask:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - n_mask
    return lengths


def infill(ids, rng, mask_id, ratio=0.3, poisson_lambda=3.0):
    """ids: a list of token ids (no <s>/</s>) -> (noised ids, spans). spans: [(position in the
    noised list of the <mask>, the original ids it replaced)], in order; replacing each <mask> by
    its ids gives `ids` back."""
    n = len(ids)
    n_mask = int(round(ratio * n))
    lengths = span_lengths(n_mask, rng, poisson_lambda)
    n_keep = n - n_mask
    # more spans than gaps (very short inputs): drop an empty one, else merge two
    while len(lengths) > n_keep + 1:
        lengths.remove(0) if 0 in lengths else lengths.append(lengths.pop() + lengths.pop())
    # the n_keep unmasked tokens leave n_keep + 1 gaps; each span takes a distinct gap, in random
    # order
    gaps = sorted(rng.choice(n_keep + 1, size=len(lengths), replace=False).tolist())
    order = rng.permutation(len(lengths)).tolist()
    span_at = {g: lengths[o] for g, o in zip(gaps, order)}
    out, spans, i = [], [], 0
    for gap in range(n_keep + 1):
        if gap in span_at:
            spans.append((len(out), ids[i : i + span_at[gap]]))
            out.append(mask_id)
            i += span_at[gap]
        if gap < n_keep:
            out.append(ids[i])
            i += 1
    assert i == n, "every token is either kept or inside one span"
    return out, spans


def word_dropout(dec, p, mask_id, generator=None):
    """Target-side word dropout (Sennrich and Zhang 2019, §3): each token the decoder READS, but
    its first (</s>) and the pads, becomes <mask> with probability p; the labels are not touched.
    With its own previous tokens hidden, the decoder must take more from the source. dec: (B, T)
    decoder input ids -> a new tensor."""
    drop = torch.rand(dec.shape, generator=generator, device=dec.device) < p
    drop[:, 0] = False
    return torch.where(drop & (dec != PAD), torch.full_like(dec, mask_id), dec)


def texts(records, focal_context):
    """The denoising corpus of the base projects' records: each distinct focal method (in
    `focal_context`) and each distinct test method, in record order."""
    seen = {}
    for r in records:
        for t in (r[f"src_{focal_context}"], r["tgt"]):
            seen.setdefault(t, None)
    return list(seen)


def java_files(projects, exclude, max_chars, seed=0, src_root=None):
    """The "all" corpus: whitespace-collapsed text of the projects' .java files, in a seeded hash
    order, up to max_chars characters in all. exclude: {(project, path relative to the project's
    folder)} left out (the validation test classes). A project without a source tree is an error
    naming it and the command that makes it."""
    if src_root is None:
        from data import CACHE

        src_root = CACHE / "src"
    files = []
    for project in projects:
        root = Path(src_root) / project
        if not root.is_dir():
            raise FileNotFoundError(
                f"project {project!r} has no source tree at {root}; run `python -m data.fetch "
                f"{project}` (or --denoise_text=pairs, which needs only the mined pairs)"
            )
        for path in sorted(root.rglob("*.java")):
            rel = path.relative_to(root).as_posix()
            if (project, rel) not in exclude:
                files.append((project, rel, path))

    def key(f):
        return hashlib.sha256(f"{seed}:{f[0]}:{f[1]}".encode()).hexdigest()

    out, total = [], 0
    for _, _, path in sorted(files, key=key):
        text = path.read_text(encoding="utf-8", errors="replace")
        # drop the licence header above the code
        start = re.search(r"^\s*(package|import)\s", text, re.M)
        text = " ".join(text[start.start() if start else 0 :].split())
        if total + len(text) > max_chars:
            continue
        out.append(text)
        total += len(text)
    return out


def windows(tok, strings, length):
    """Token windows of at most `length` ids (no specials): a long string gives several, in
    order."""
    out = []
    for e in tok.encode_batch(strings, add_special_tokens=False):
        out += [e.ids[i : i + length] for i in range(0, len(e.ids), length)]
    return [w for w in out if len(w) >= 4]


def noised_pairs(tok, windows_, seed, epoch, ratio=0.3, poisson_lambda=3.0):
    """(sources, targets) as encode_pairs gives them (<s> ... </s>): this epoch's noising of
    every window, seeded by (seed, epoch) so a resumed run sees the same noise. The sources are
    never longer than the targets."""
    from data.tokenizer import BOS, EOS

    # epoch -1: validation
    rng, mask_id = np.random.default_rng([seed, epoch + 1]), tok.token_to_id("<mask>")
    src = [[BOS] + infill(w, rng, mask_id, ratio, poisson_lambda)[0] + [EOS] for w in windows_]
    return src, [[BOS] + w + [EOS] for w in windows_]


def stage(
    tok,
    train_records,
    val_records,
    focal_context,
    width,
    seed,
    n_val=256,
    text="pairs",
    max_chars=0,
    **noise,
):
    """The denoising stage's data: the training windows (noised afresh every epoch with
    noised_pairs) and a fixed validation set, one noising of (at most) n_val windows of the
    validation records, as (sources, targets, partners) for train.source_check: each window's
    partner is the one half-way round. text: "pairs" (the training records' focal methods and
    tests) or "all" (every .java file of the training records' projects but the validation test
    classes, up to max_chars characters; see the module's docstring)."""
    val_windows = windows(tok, texts(val_records, focal_context), width)[:n_val]
    src, tgt = noised_pairs(tok, val_windows, seed, -1, **noise)
    partners = [(i + len(src) // 2) % len(src) for i in range(len(src))]
    if text == "pairs":
        strings = texts(train_records, focal_context)
    elif text == "all":
        projects = sorted({r["project"] for r in train_records})
        exclude = {(r["project"], r["test_class"]["file"]) for r in val_records}
        strings = java_files(projects, exclude, max_chars, seed)
    else:
        raise ValueError(f"denoise_text must be 'pairs' or 'all', got {text!r}")
    return windows(tok, strings, width), (src, tgt, partners)


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
    n_mask = sum(len(t) - 2 for t in tgt) - sum(
        len(s) - 2 - s.count(tok.token_to_id("<mask>")) for s in src
    )
    print(
        f"{len(w)} windows, {sum(len(t) - 2 for t in tgt):,} tokens, "
        f"{n_mask / sum(len(t) - 2 for t in tgt):.1%} masked"
    )


if __name__ == "__main__":
    from data import cli

    cli(main)
