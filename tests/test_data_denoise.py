"""data/denoise.py against the definition of BART's text infilling (Lewis et al. 2020, §2.2): span
lengths drawn from Poisson(lambda = 3), each span replaced by ONE <mask> (length 0: a <mask>
inserted), about 30% of the tokens masked. The reference is the definition itself, checked on fixed
seeds: reinserting each span at its <mask> gives the original back; exactly round(0.3 n) tokens are
masked; the span lengths follow Poisson(3) (a chi-square test from scipy); masks never touch; the
noise is the same for the same (seed, epoch) and differs across epochs. Target-side word dropout:
Bernoulli(p) per real decoder input after the first (scipy's binomial test).

.venv/bin/python -m pytest tests/test_data_denoise.py -q"""

import numpy as np
import pytest
from scipy import stats

from data import denoise
from data.tokenizer import BOS, EOS, load_tokenizer, train_tokenizer

MASK = 4


def test_infill_reconstructs_masks_exactly_and_never_touches():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 17, 100, 513):
        ids = rng.integers(10, 1000, n).tolist()
        noised, spans = denoise.infill(ids, rng, MASK)
        assert [noised[p] for p, _ in spans] == [MASK] * len(spans) and noised.count(MASK) == len(
            spans
        )
        rebuilt, last = [], 0
        for p, span in spans:  # each <mask> stands for its span, in order
            rebuilt += noised[last:p] + span
            last = p + 1
        assert rebuilt + noised[last:] == ids
        assert sum(len(s) for _, s in spans) == round(0.3 * n)
        assert all(b - a > 1 for (a, _), (b, _) in zip(spans, spans[1:])), (
            "two masks side by side would be one span"
        )


def test_span_lengths_are_poisson_3():
    """Draws are Poisson(3) until they cover the budget, the last cut to fit. The first 10 draws
    of a budget of 90 are never cut nor selected by the stopping rule (10 draws reach 90 with
    probability ~1e-20), so they must be iid Poisson(3): a chi-square test against scipy's pmf
    over 10,000 of them."""
    rng = np.random.default_rng(1)
    draws = [denoise.span_lengths(90, rng, 3.0) for _ in range(1000)]
    assert all(sum(d) == 90 and min(d) >= 0 for d in draws)
    lengths = [x for d in draws for x in d[:10]]
    counts = np.bincount(lengths, minlength=12)
    observed = np.append(counts[:11], counts[11:].sum())
    expected = stats.poisson(3).pmf(np.arange(11)) * len(lengths)
    expected = np.append(expected, len(lengths) - expected.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.06)


def test_word_dropout_bernoulli_p_on_real_read_tokens_only():
    """Each real decoder input but the first is replaced by <mask> independently with probability
    p: pads and position 0 never; the masked share of the eligible tokens is Binomial(n, p) (a
    two-sided binomial test)."""
    import torch
    from data.tokenizer import PAD

    dec = torch.randint(10, 1000, (64, 200))
    lengths = torch.randint(1, 201, (64,))
    dec[torch.arange(200)[None, :] >= lengths[:, None]] = PAD
    for p in (0.1, 0.3):
        out = denoise.word_dropout(dec, p, MASK, torch.Generator().manual_seed(0))
        changed = out != dec
        assert (
            torch.equal(out[changed], torch.full_like(out[changed], MASK))
            and not changed[:, 0].any()
        )
        assert not changed[dec == PAD].any()
        eligible = int((dec != PAD).sum() - (dec[:, 0] != PAD).sum())
        assert stats.binomtest(int(changed.sum()), eligible, p).pvalue > 1e-3
    assert torch.equal(denoise.word_dropout(dec, 0.0, MASK), dec)
    assert torch.equal(denoise.word_dropout(dec, 1.0, MASK)[:, 1:] == MASK, dec[:, 1:] != PAD)


def test_noised_pairs_seeded_by_epoch(tmp_path):
    tok = train_tokenizer(
        ["class A { int f() { return 1; } }", "@Test void t() { assertEquals(1, new A().f()); }"],
        vocab_size=300,
        min_frequency=1,
    )
    tok.save(str(tmp_path / "tok.json"))
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.token_to_id("<mask>") == MASK  # ids 0-3 keep BART's meaning, <mask> comes next
    windows = denoise.windows(
        tok,
        denoise.texts(
            [{"src_fm": "int f() { return 1 + 2 + 3; }", "tgt": "@Test void t() {}"}] * 2, "fm"
        ),
        6,
    )
    # distinct strings once, cut into windows
    assert len(windows) >= 2 and all(4 <= len(w) <= 6 for w in windows)
    a, b, c = (denoise.noised_pairs(tok, windows, 0, e) for e in (0, 0, 1))
    assert a == b and a != c
    src, tgt = a
    assert all(
        s[0] == t[0] == BOS and s[-1] == t[-1] == EOS and MASK in s for s, t in zip(src, tgt)
    )
    assert [t[1:-1] for t in tgt] == windows


def test_old_tokenizer_without_mask_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["a b c"],
        trainers.BpeTrainer(
            vocab_size=270,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(tmp_path / "old.json"))
    with pytest.raises(
        ValueError, match=r"old.json: this tokenizer has no <mask> token .* rebuild it"
    ):
        load_tokenizer(tmp_path / "old.json")


def test_other_class_partners_same_project_other_class_and_stable():
    """The partner of every record is of another focal class, of the same project when that
    project has two focal classes (else of another project), never itself; the pairing is the
    same on every call (no salted hash); a set of one focal class pairs records of different
    focal methods, and one of a single focal method is refused."""
    from data import holdout, other_class_partners

    def rec(p, c, t):
        return {
            "project": p,
            "focal_class": {"file": f"{c}.java", "identifier": c},
            "test_class": {"file": f"{t}.java", "identifier": t},
        }

    # b: one class
    records = [rec("a", f"C{i % 3}", f"T{i % 4}") for i in range(12)] + [rec("b", "D", "U")] * 3
    partner = other_class_partners(records)

    def fc(i):
        return (records[i]["project"], records[i]["focal_class"]["identifier"])

    assert all(fc(i) != fc(j) for i, j in enumerate(partner))
    # b's only class pairs with a; a stays within a
    assert all(records[j]["project"] == "a" for j in partner)
    # stable, and spread out
    assert partner == other_class_partners(records) and len(set(partner[:12])) > 3
    # one class, one method: refused
    with pytest.raises(ValueError, match="at least two focal methods, got 1"):
        other_class_partners(records[12:])
    one_class = [dict(records[12], src_fm=f"int m{i}() {{ return {i}; }}") for i in range(4)]
    assert all(
        one_class[j]["src_fm"] != r["src_fm"]
        for r, j in zip(one_class, other_class_partners(one_class))
    )
    train, val = holdout(records[:12], fraction=0.25)
    assert {r["test_class"]["identifier"] for r in train}.isdisjoint(
        {r["test_class"]["identifier"] for r in val}
    )
    assert 3 <= len(val) <= 6 and len(train) + len(val) == 12
    # the cap wins over the fraction (whole classes)
    capped = holdout(records[:12], fraction=0.5, max_pairs=2)[1]
    assert 2 <= len(capped) < 6 and set(map(id, capped)) <= set(map(id, records[:12]))
