"""Byte-level BPE tokenizer: trained on the base projects, or AthenaTest/BART's own vocabulary
(§3.1, §2.1).

python -m data.tokenizer --out data/cache/tokenizer.json [--vocab-size 8192] [--projects
commons-lang3 ...]

AthenaTest used BART's byte-level BPE (RoBERTa's GPT-2 vocabulary, 50,265 entries). For a small
model trained from scratch we train the same kind of tokenizer, smaller, on the BASE projects' text
only (never a target's: the target's vocabulary must not leak into the base model). The four special
ids match BART's, because the model relies on them: <s>=0 (bos), <pad>=1, </s>=2 (eos and decoder
start), <unk>=3.

API (what train.py / evaluate.py call):
    # our tokenizer.json, or a folder with vocab.json + merges.txt (BART/RoBERTa)
    tok = load_tokenizer(path)
    src, tgt, n_trunc = encode_pairs(tok, records, max_src=512, max_tgt=512)   # lists of id lists
    text = tok.decode(ids)         # special tokens dropped
Every sequence is wrapped as <s> ... </s>. A longer source is cut to the maximum and still ends in
</s> (the encoder always reads a closed input); a longer target is cut to the maximum *without*
</s>: a test cut at the limit has not ended, and a `</s>` there would teach the decoder to stop at
that position whatever it is writing (the shipped base learned exactly that: docs/experiments.md).
`n_trunc` counts the pairs where either side was cut.
"""

import argparse
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ids 0-3 as in BART's vocab.json; <mask>: 4 here, 50264 there
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BOS, PAD, EOS, UNK = 0, 1, 2, 3
# <mask> (data/denoise.py) is looked up by name: its id depends on the vocabulary
SPECIAL_IDS = (BOS, PAD, EOS, UNK)


def _pipeline(tok):
    """The byte-level pieces shared by the trained and the loaded tokenizer (GPT-2/RoBERTa
    style)."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", EOS), ("<s>", BOS))  # <s> A </s>
    for name, i in zip(SPECIALS, SPECIAL_IDS):  # ids 0-3 fixed; <mask> depends on the vocabulary
        assert tok.token_to_id(name) == i, (
            f"special token {name} must have id {i}, has {tok.token_to_id(name)}"
        )
    return tok


def check_mask(tok, path):
    """The denoising stage needs <mask>; tokenizers built before it existed lack it: refuse them
    by name."""
    if tok.token_to_id("<mask>") is None:
        raise ValueError(
            f"{path}: this tokenizer has no <mask> token "
            "(it was built by an older version of data/); "
            f"delete it and rebuild it with `make data/cache/tokenizer.json`, then retrain the base"
        )
    return tok


def train_tokenizer(texts, vocab_size=8192, min_frequency=2):
    """Train a byte-level BPE on an iterable of strings. 256 byte symbols + 4 specials are always
    in."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _pipeline(tok)


def load_tokenizer(path):
    """tokenizer.json (ours), or a folder holding vocab.json + merges.txt (AthenaTest / BART /
    RoBERTa)."""
    p = Path(path)
    if p.is_dir() and (p / "vocab.json").exists() and (p / "merges.txt").exists():
        tok = Tokenizer(
            models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt"), unk_token="<unk>")
        )
        # as BART's tokenizer: the specials are whole tokens, dropped by decode (only those the
        # vocabulary has)
        tok.add_special_tokens([t for t in SPECIALS if tok.token_to_id(t) is not None])
        return check_mask(_pipeline(tok), path)
    if p.is_dir() and (p / "tokenizer.json").exists():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected tokenizer.json or a folder with vocab.json + "
            "merges.txt; build ours with `make data/cache/tokenizer.json`"
        )
    try:
        tok = Tokenizer.from_file(str(p))
    # the tokenizers library raises a bare Exception for a file of another kind
    except Exception as e:
        raise ValueError(
            f"{path}: not a tokenizer.json of the tokenizers library ({e}); build ours with "
            f"`make data/cache/tokenizer.json`"
        ) from None
    return check_mask(_pipeline(tok), path)


def _cut_source(ids, n):
    """A source longer than n: its first n - 1 ids and </s>."""
    return ids if len(ids) <= n else ids[: n - 1] + [EOS]


def encode_pairs(tok, records, max_src=1024, max_tgt=1024, src_key="src", tgt_key="tgt"):
    """(src id lists, tgt id lists, number of pairs with either side truncated). Order of
    `records` kept. A cut source ends in </s>; a cut target is its first max_tgt ids, no </s>."""
    src = [e.ids for e in tok.encode_batch([r[src_key] for r in records])]
    tgt = [e.ids for e in tok.encode_batch([r[tgt_key] for r in records])]
    n_trunc = sum(len(s) > max_src or len(t) > max_tgt for s, t in zip(src, tgt))
    return [_cut_source(s, max_src) for s in src], [t[:max_tgt] for t in tgt], n_trunc


def corpus_texts(records):
    """The strings the tokenizer learns from: each distinct src and tgt once (big classes repeat
    a lot)."""
    seen = set()
    for r in records:
        for text in (r["src"], r["tgt"]):
            if text not in seen:
                seen.add(text)
                yield text


def main():
    from data import (
        DEFAULT_BASE,
        atomic_write,
        load_projects,
        output_file,
        positive_int,
        read_projects,
    )

    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on base projects.")
    ap.add_argument("--out", type=output_file, default="data/cache/tokenizer.json")
    ap.add_argument("--vocab-size", type=positive_int, default=8192)
    ap.add_argument("--min-frequency", type=positive_int, default=2)
    ap.add_argument(
        "--projects", nargs="*", default=DEFAULT_BASE, help="base projects (default: all of them)"
    )
    ap.add_argument(
        "--all-base", action="store_true", help="every base project of data/projects.tsv"
    )
    args = ap.parse_args()
    names = (
        [r["name"] for r in read_projects() if r["role"] == "base"]
        if args.all_base
        else args.projects
    )
    targets = {r["name"] for r in read_projects() if r["role"] == "target"}
    if targets & set(names):
        raise SystemExit(
            f"refusing to train the tokenizer on target projects {sorted(targets & set(names))}"
        )
    t0 = time.time()
    records = load_projects(names)
    t1 = time.time()
    tok = train_tokenizer(corpus_texts(records), args.vocab_size, args.min_frequency)
    t2 = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tok.save(str(tmp)))
    src, tgt, n_trunc = encode_pairs(tok, records[:2000], 1024, 1024)

    def mean(xs):
        return sum(map(len, xs)) / max(len(xs), 1)

    print(
        f"{len(names)} projects, {len(records)} pairs (read in {t1 - t0:.1f}s); "
        f"trained vocab {tok.get_vocab_size()} "
        f"in {t2 - t1:.1f}s -> {out}\n"
        f"first {len(src)} pairs: mean {mean(src):.0f} src / {mean(tgt):.0f} tgt tokens, "
        f"{n_trunc} longer than 1024"
    )


if __name__ == "__main__":
    from data import cli

    cli(main)
