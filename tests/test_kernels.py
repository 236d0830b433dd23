"""Tests for kernels/attention.py, the fused prefix attention, against the `math` attention the
model itself runs (model.attention_math) in float64. On CPU the kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes are tiny and odd: lengths 1, 15, 17, 33
against tiles of 16.

Tolerances (../docs/attention-kernel.md §10): fp32 (dot precision "ieee") max-abs 1e-5 on outputs
and 2e-5 on gradients; fp16 and bf16 by flash-attention's rule: the kernel's error is at most 2x
(outputs) / 3x (gradients) the error of PyTorch's own computation in that dtype, both against
float64.

PYTHONPATH=. python -m pytest tests/test_kernels.py -q      (~1 minute on 2 CPU cores)"""

import pytest
import torch

from kernels.attention import _interpreting, _launch_args, attention, pick_config
from model import BART, BARTConfig, attention_math

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def make_case(
    B=2,
    H=2,
    Lq=17,
    Lk=17,
    D=16,
    P=7,
    bank=None,
    mask="ragged",
    causal=False,
    dtype=torch.float32,
    seed=0,
):
    """Random inputs N(0, 1). bank=None: shared (H, P, D) prefix; bank=N: (N, H, P, D) and
    per-row ids that repeat an id and leave id 1 (and any id >= 3) unused. mask: None, "ragged"
    (right padding, one full row, one row of length 1) or "holes" (an arbitrary pattern)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = dict(q=rand(B, H, Lq, D), k=rand(B, H, Lk, D), v=rand(B, H, Lk, D))
    kw = dict(causal=causal)
    if P is not None:
        shape = (H, P, D) if bank is None else (bank, H, P, D)
        t["prefix_k"], t["prefix_v"] = rand(*shape), rand(*shape)
        if bank is not None:
            kw["prefix_index"] = torch.tensor([2, 0, 2, 0][:B])
    if mask == "ragged":
        lens = torch.tensor([Lk, 1, max(1, Lk - 3)][:B])
        kw["key_padding_mask"] = torch.arange(Lk)[None, :] < lens[:, None]
    elif mask == "holes":
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g) < 0.6
    do = rand(B, H, Lq, D)
    return t, kw, do


def run(fn, t, kw, do, dtype=None):
    """Output and the gradients of every tensor input of fn (attention or attention_math), in
    `dtype`."""
    leaves = {n: x.detach().to(dtype or x.dtype).requires_grad_() for n, x in t.items()}
    out = fn(**leaves, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), do.to(out.dtype))
    return out, dict(zip(leaves, grads))


def errors(out, grads, ref_out, ref_grads):
    """Max-abs error of the output ("o") and of each gradient (0 for an empty one, e.g. P = 0)."""

    def err(a, b):
        return (a.double() - b).abs().max().item() if a.numel() else 0.0

    return {"o": err(out, ref_out), **{n: err(grads[n], ref_grads[n]) for n in grads}}


# name: make_case arguments; together they cover lengths 1/15/17/33, P 0/1/7/33, Lq != Lk, causal
CASES = {
    "encoder": dict(Lq=17, Lk=17, P=7),
    "encoder-p0-d32": dict(Lq=33, Lk=33, D=32, P=0),
    "cross-bank-p33": dict(B=3, Lq=15, Lk=33, P=33, bank=4),
    "decoder-causal-bank": dict(B=3, Lq=17, Lk=17, P=7, bank=4, causal=True),
    "kv-cache-step-lq1": dict(Lq=1, Lk=15, P=1, causal=True),
    "causal-lq<lk-no-mask": dict(Lq=15, Lk=33, P=0, causal=True, mask=None),
    "causal-lq>lk": dict(Lq=33, Lk=15, P=1, causal=True),  # the first rows see only the prefix
    "causal-lq>lk-p0": dict(Lq=17, Lk=15, P=0, causal=True),  # ... or nothing at all: o = 0
    "holes-mask": dict(B=3, Lq=15, Lk=33, P=7, bank=4, mask="holes", causal=True),
    "lk1": dict(Lq=15, Lk=1, P=7, mask=None),
    "d64-p33": dict(B=1, Lq=17, Lk=33, D=64, P=33),
    "d128-no-prefix": dict(B=1, H=1, Lq=15, Lk=15, D=128, P=None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_math_fp64(name):
    """fp32 kernel output and gradients (q, k, v, prefix K/V) vs attention_math in float64: <=
    1e-5 / 2e-5."""
    t, kw, do = make_case(**CASES[name])
    out, grads = run(attention, t, kw, do)
    ref_out, ref_grads = run(attention_math, t, kw, do, torch.float64)
    e = errors(out, grads, ref_out, ref_grads)
    assert e["o"] <= 1e-5, e
    assert all(e[n] <= 2e-5 for n in grads), e
    if "prefix_index" in kw and t["prefix_k"].shape[2] > 0:  # ids [2, 0, 2]: entries 1 and 3 unused
        for n in ("prefix_k", "prefix_v"):
            assert (grads[n][1] == 0).all() and (grads[n][3] == 0).all(), (
                "an unused bank entry got a gradient"
            )
            assert grads[n][2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_within_pytorch_error(name, dtype):
    """fp16/bf16 kernel vs float64 math: error <= 2x (output) / 3x (gradients) that of math run
    in the dtype."""
    t, kw, do = make_case(**CASES[name], dtype=dtype)
    out, grads = run(attention, t, kw, do)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    ref = run(attention_math, t, kw, do, torch.float64)
    e = errors(out, grads, *ref)
    e_torch = errors(*run(attention_math, t, kw, do), *ref)
    assert e["o"] <= 2 * e_torch["o"], (e, e_torch)
    assert all(e[n] <= 3 * e_torch[n] for n in grads), (e, e_torch)


def test_model_views_and_expanded_prefix():
    """Model-layout views (transposed q/k/v, bank[:, i, 0], expanded prefix) vs contiguous copies
    / float64 math."""
    B, H, T, S, D, P = 3, 2, 15, 17, 16, 7
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # the model's split_heads layout
    kv = torch.randn(B, S, 2, H, D, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    packed = torch.randn(4, 2, 2, H, P, D, generator=g)  # (N, L, 2, H, P, D)
    ids = torch.tensor([3, 3, 1])
    mask = torch.arange(S)[None, :] < torch.tensor([17, 9, 1])[:, None]
    do = torch.randn(B, H, T, D, generator=g)
    views = dict(q=x, k=k, v=v, prefix_k=packed[:, 1, 0], prefix_v=packed[:, 1, 1])
    copies = {n: t.contiguous() for n, t in views.items()}
    kw = dict(key_padding_mask=mask, causal=True, prefix_index=ids)
    for a, b in zip(run(attention, views, kw, do), run(attention, copies, kw, do)):
        a, b = (
            (a, b)
            if isinstance(a, torch.Tensor)
            else (
                torch.cat([x.flatten() for x in a.values()]),
                torch.cat([x.flatten() for x in b.values()]),
            )
        )
        assert (a - b).abs().max() <= 1e-6
    # stride 0 over heads
    shared = dict(
        q=x,
        k=k,
        v=v,
        prefix_k=torch.randn(1, P, D).expand(H, P, D),
        prefix_v=torch.randn(H, 1, D).expand(H, P, D),
    )  # stride 0 over prefix positions
    out, grads = run(attention, shared, dict(key_padding_mask=mask), do)
    ref_out, ref_grads = run(attention_math, shared, dict(key_padding_mask=mask), do, torch.float64)
    e = errors(out, grads, ref_out, ref_grads)
    assert max(e.values()) <= 2e-5, e


def test_fully_padded_row_is_zero_not_nan():
    """A fully padded row vs float64 math: 0 and zero gradients, no NaN, at P = 0; the prefix
    only at P = 7."""
    for P in (None, 7):
        t, kw, do = make_case(B=2, Lq=15, Lk=17, P=P)
        kw["key_padding_mask"][1] = False
        out, grads = run(attention, t, kw, do)
        assert not out.isnan().any() and not any(g.isnan().any() for g in grads.values())
        if P is None:
            assert (out[1] == 0).all() and (grads["q"][1] == 0).all() and (grads["k"][1] == 0).all()
        e = errors(out, grads, *run(attention_math, t, kw, do, torch.float64))
        assert max(e.values()) <= 2e-5, e


def test_nan_in_padded_keys_does_not_leak():
    """NaN/inf planted in padded K/V vs clean inputs: bitwise equal outputs and gradients; padded
    dK, dV exactly 0."""
    for causal in (False, True):
        t, kw, do = make_case(B=3, Lq=15, Lk=33, P=7, bank=4, causal=causal)
        padded = ~kw["key_padding_mask"][:, None, :, None].expand_as(t["k"])
        dirty = dict(
            t,
            k=t["k"].masked_fill(padded, float("nan")),
            v=t["v"].masked_fill(padded, float("inf")),
        )
        clean_out, clean_grads = run(attention, t, kw, do)
        out, grads = run(attention, dirty, kw, do)
        assert torch.equal(out, clean_out)
        assert all(torch.equal(grads[n], clean_grads[n]) for n in grads)
        assert (grads["k"][padded] == 0).all() and (grads["v"][padded] == 0).all()


def test_two_runs_bitwise_identical():
    """Two forward + backward runs (per-row ids with repeats) give bitwise identical outputs and
    gradients."""
    t, kw, do = make_case(B=3, Lq=17, Lk=33, P=33, bank=4, causal=True)
    (o1, g1), (o2, g2) = run(attention, t, kw, do), run(attention, t, kw, do)
    assert torch.equal(o1, o2) and all(torch.equal(g1[n], g2[n]) for n in g1)


def test_rejects_what_it_does_not_support():
    """Unsupported inputs raise an AssertionError with a message instead of falling back."""
    t, kw, _ = make_case(P=None, mask=None)
    with pytest.raises(AssertionError, match="head dim"):
        attention(torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24))
    with pytest.raises(AssertionError, match="fp32, fp16, bf16"):
        attention(*(x.double() for x in t.values()))
    with pytest.raises(AssertionError, match="prefix_index"):
        attention(*t.values(), prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16))


def test_interpreter_hygiene():
    """Without CUDA the conftest made Triton interpret; one config is chosen in Python; bf16 is
    upcast there."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels are compiled, not interpreted")
    assert _interpreting()
    q = torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16)
    assert _launch_args(q, q, None, None, None)["flags"]["UPCAST"]
    assert pick_config(64, torch.bfloat16)["fwd"][:2] == (16, 16)


@pytest.mark.parametrize("bank", [False, True])
def test_tiny_bart_triton_equals_math(bank):
    """Tiny BART with 3 prefix sites, attn_impl "triton" vs "math": logits, parameter and prefix
    gradients <= 1e-4."""
    torch.manual_seed(0)
    cfg = BARTConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
    )
    model = BART(cfg)
    shape = (3, 1, 2, 2, 5, 16) if bank else (1, 2, 2, 5, 16)  # ([N,] layers, K/V, H, P, head dim)
    sites = {s: torch.randn(*shape, requires_grad=True) for s in ("encoder", "decoder", "cross")}
    prefix = (sites, torch.tensor([2, 0])) if bank else sites
    ids = torch.randint(3, 64, (2, 15))
    mask = (torch.arange(15)[None, :] < torch.tensor([15, 9])[:, None]).long()
    dec_ids = torch.randint(3, 64, (2, 9))
    w = torch.randn(2, 9, 64)
    results = {}
    for impl in ("math", "triton"):
        model.config.attn_impl = impl
        model.zero_grad()
        for t in sites.values():
            t.grad = None
        logits = model(ids, mask, dec_ids, prefix=prefix)
        (logits * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads.update({f"prefix.{s}": t.grad.clone() for s, t in sites.items()})
        results[impl] = logits.detach(), grads
    (l_math, g_math), (l_tri, g_tri) = results["math"], results["triton"]
    assert (l_math - l_tri).abs().max() <= 1e-4
    for n in g_math:
        assert (g_math[n] - g_tri[n]).abs().max() <= 1e-4, n
    if bank:  # entry 1 is used by no row
        assert all((t.grad[1] == 0).all() for t in sites.values())


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the full GPU check is tools/gpu_check.py)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_compiles_and_matches(dtype):
    """GPU: the production tiles compile and match float64 math by the same rules (one
    cross-attention case)."""
    t, kw, do = make_case(B=3, Lq=100, Lk=203, D=64, P=33, bank=4, dtype=dtype)
    t, kw, do = (
        {n: x.cuda() for n, x in t.items()},
        {n: x.cuda() if torch.is_tensor(x) else x for n, x in kw.items()},
        do.cuda(),
    )
    out, grads = run(attention, t, kw, do)
    ref = run(attention_math, t, kw, do, torch.float64)
    e = errors(out, grads, *ref)
    if dtype == torch.float32:
        assert e["o"] <= 1e-5 and all(e[n] <= 2e-5 for n in grads), e
    else:
        e_torch = errors(*run(attention_math, t, kw, do), *ref)
        assert e["o"] <= 2 * e_torch["o"] and all(e[n] <= 3 * e_torch[n] for n in grads), (
            e,
            e_torch,
        )
