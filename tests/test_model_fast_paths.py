"""model.py's CPU fast paths against their references: the packed encoder (real tokens only, one
attention call per row) against HF's encoder and against the padded path; attention_sdpa's short
cuts against attention_math in float64; the CPU dropout against the definition of dropout
(Bernoulli keep mask, scaled by 1 / (1 - p)). Run: `make test` or `.venv/bin/python -m pytest
tests/test_model_fast_paths.py -q`."""

import pytest
import torch
from scipy import stats

import model
from model import BART, BARTConfig, attention_math, attention_sdpa

transformers = pytest.importorskip("transformers")
TINY = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
)


def ragged(B=4, S=13, V=99):
    g = torch.Generator().manual_seed(3)
    ids, mask = torch.randint(3, V, (B, S), generator=g), torch.ones(B, S, dtype=torch.bool)
    # right-padded rows and one left-padded row
    mask[1, 9:], mask[2, 4:], mask[3, :6] = False, False, False
    return ids.masked_fill(~mask, 1), mask


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_packed_encoder_equals_hf_at_real_tokens_and_zero_at_pads(tmp_path, impl, monkeypatch):
    torch.manual_seed(0)
    ours = BART(BARTConfig(**TINY, attn_impl=impl)).eval()
    ours.save_pretrained(tmp_path / "m")
    hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    ids, mask = ragged()
    right = mask.clone()
    right[3] = True  # HF's positions are not padding-aware: compare it on right-padded rows only
    with torch.no_grad():
        ref = hf.model.encoder(input_ids=ids, attention_mask=right.long()).last_hidden_state
        loop = ours.encode(ids, right)
        assert (loop[right] - ref[right]).abs().max() < 1e-5 and (loop[~right] == 0).all()
        # the padded path a GPU takes, here on the CPU
        monkeypatch.setattr(model, "VARLEN_DEVICES", set())
        assert (ours.encode(ids, right) - loop).abs().max() < 1e-5


def test_packed_encoder_loop_equals_padded_path_with_a_prefix_bank(monkeypatch):
    torch.manual_seed(0)
    m = BART(BARTConfig(**TINY, attn_impl="sdpa")).eval()
    ids, mask = ragged()
    L, H, hd = 2, 4, 8
    bank = {"encoder": torch.randn(3, L, 2, H, 5, hd)}  # 3 projects' prefixes of 5 K/V vectors
    index = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        loop = m.encode(ids, mask, prefix=(bank, index))
        monkeypatch.setattr(model, "VARLEN_DEVICES", set())
        padded = m.encode(ids, mask, prefix=(bank, index))
    assert (loop - padded).abs().max() < 1e-5 and (loop[~mask] == 0).all()


@pytest.mark.parametrize(
    "case",
    [
        "padding",
        "padding, one row without a key",
        "causal",
        "causal + padding",
        "prefix + padding",
        "causal, Lq < Lk",
    ],
)
def test_sdpa_short_cuts_equal_math_in_float64(case):
    g = torch.Generator().manual_seed(1)
    B, H, D, Lk = 3, 2, 8, 10
    Lq = 4 if "Lq < Lk" in case else Lk
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
    kw = dict(causal="causal" in case)
    if "padding" in case:
        kw["key_padding_mask"] = torch.arange(Lk)[None, :] < torch.tensor([[10], [6], [3]])
        if "without" in case:
            kw["key_padding_mask"][1] = False
    if "prefix" in case:
        kw["prefix_k"], kw["prefix_v"] = (
            torch.randn(H, 3, D, generator=g),
            torch.randn(H, 3, D, generator=g),
        )
    ref = attention_math(
        q.double(),
        k.double(),
        v.double(),
        **{n: t.double() if n.startswith("prefix") else t for n, t in kw.items()},
    )
    assert (attention_sdpa(q, k, v, **kw).double() - ref).abs().max() < 1e-5


def test_cpu_dropout_is_dropout():
    """Drop rate = round(p * 32768) / 32768 (a binomial test on 4M elements), independent
    neighbours (the two fields of one 32-bit draw: a chi-square test of independence), kept
    values scaled by 1 / (1 - that rate), gradients through the same mask, identity in eval mode
    and at p = 0."""
    torch.manual_seed(0)
    p, n = 0.1, 4_000_000
    x = torch.rand(n, dtype=torch.float64) + 1.0
    x.requires_grad_(True)
    y = model.dropout(x, p, training=True)
    dropped = y.detach() == 0
    rate = round(p * 32768) / 32768
    assert stats.binomtest(int(dropped.sum()), n, rate).pvalue > 1e-3
    pairs = dropped.view(-1, 2).long()
    table = torch.stack(
        [((pairs[:, 0] == a) & (pairs[:, 1] == b)).sum() for a in (0, 1) for b in (0, 1)]
    ).view(2, 2)
    assert stats.chi2_contingency(table.numpy()).pvalue > 1e-3
    # rounding
    assert torch.allclose(
        y.detach()[~dropped], x.detach()[~dropped] / (1 - rate), rtol=1e-14, atol=0
    )
    y.sum().backward()
    assert torch.allclose(x.grad, (~dropped).double() / (1 - rate), rtol=1e-14, atol=0)
    assert model.dropout(x, p, training=False) is x and model.dropout(x, 0.0, training=True) is x
