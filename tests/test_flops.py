"""flops.py against outside references (paper §3.4, Table 1): parameter counts against the spec's
exact Table 1 numbers (../docs/checkpoints.md §10) and against sum(p.numel()) of every preset built
on the meta device with each strategy applied; the autograd-exact FLOP count against
torch.utils.flop_counter.FlopCounterMode measured on a real forward + backward step (math attention
path) for each strategy on two configs; both conventions against closed forms written out by hand.

PYTHONPATH=. .venv/bin/python -m pytest tests/test_flops.py -q     (about 20 s on 2 cores)"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import flops
import strategies
from model import BART, PRESETS, config_from_preset

CASES = [
    ("custom", {}),
    ("leo", {}),
    ("leo", dict(layernorm=True, logits_bias=True)),
    ("lldb", {}),
    ("prefix", {}),
    ("prefix", dict(sites=("encoder", "decoder"))),
    ("prefix", dict(sites=("cross",))),
    ("prefix", dict(mlp_hidden=800)),
    ("prefix", dict(prefix_len=0)),
    ("lora", {}),
    ("lora", dict(r=4, targets=("k_proj", "out_proj", "fc1", "fc2"))),
]


def test_table1_exact_counts_for_bart_large():
    c = config_from_preset("bart-large")
    # ../docs/checkpoints.md §10 (Table 1: 406M, 53M, 17M, 10M of 416M), §8 (LoRA), §10 (Li & Liang
    # MLP, mid 800)
    assert flops.param_counts(c, "custom") == (406_291_456, 406_291_456)
    assert flops.param_counts(c, "leo") == (53_572_608, 406_291_456)
    assert flops.param_counts(c, "leo", layernorm=True)[0] == 53_576_704
    assert flops.param_counts(c, "leo", logits_bias=True)[0] == 53_622_873
    assert flops.param_counts(c, "lldb") == (16_796_672, 406_291_456)
    assert flops.param_counts(c, "prefix", sites=("encoder", "decoder")) == (9_830_400, 416_121_856)
    assert flops.param_counts(c, "prefix")[0] == 14_745_600
    assert flops.param_counts(c, "prefix", mlp_hidden=800)[0] == 60_080_928
    assert flops.param_counts(c, "prefix", mlp_hidden=512)[0] == 38_552_064
    assert flops.param_counts(c, "lora")[0] == 1_179_648
    assert flops.param_counts(config_from_preset("bart-base"), "custom")[0] == 139_420_416


@pytest.mark.parametrize("preset", list(PRESETS))
def test_counts_equal_the_built_models(preset):
    c = config_from_preset(preset)
    for name, opts in CASES:
        with torch.device("meta"):  # no memory, no compute: bart-large in milliseconds
            m = BART(c)
        strategies.apply(m, name, **opts)
        want = (
            sum(p.numel() for p in m.parameters() if p.requires_grad),
            sum(p.numel() for p in m.parameters()),
        )
        assert flops.param_counts(c, name, **opts) == want, (preset, name, opts)


def measure(c, name, opts, B, S, T):
    """FlopCounterMode on one real step: forward, then backward of the loss (matmuls only,
    multiply-add = 2)."""
    torch.manual_seed(0)
    m = BART(c)
    strategies.apply(m, name, **opts)
    ids, dec = torch.randint(4, c.vocab_size, (B, S)), torch.randint(4, c.vocab_size, (B, T))
    with FlopCounterMode(display=False) as fwd:
        logits = m(ids, torch.ones_like(ids), dec)
    loss = F.cross_entropy(logits.flatten(0, 1), dec.flatten())
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


CONFIGS = {
    "tiny": (config_from_preset("tiny", vocab_size=1024), 2, 13, 9),
    # a larger one with short sequences: bart-base's widths (d 768, 12 heads, FFN 3072) at 2
    # + 2 layers and a smaller vocabulary, one case per strategy: skinny CPU matmuls are
    # slow, and the file must stay < 1 min
    "bart-base": (
        config_from_preset("bart-base", vocab_size=2048, encoder_layers=2, decoder_layers=2),
        2,
        8,
        5,
    ),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_exact_flops_match_flop_counter(cfg):
    c, B, S, T = CONFIGS[cfg]
    for i, (name, opts) in enumerate(CASES):
        if opts.get("prefix_len") == 0 or (cfg == "bart-base" and i not in (0, 1, 3, 7, 9)):
            continue  # P = 0: nothing trains, nothing to differentiate
        opts = {**opts, "prefix_len": 6} if name == "prefix" else opts
        # a narrow MLP: CPU time
        opts = {**opts, "mlp_hidden": 32} if "mlp_hidden" in opts else opts
        fwd, bwd = measure(c, name, opts, B, S, T)
        r = flops.step_flops(c, name, [S] * B, [T] * B, **opts)["exact"]
        err_f, err_b = r["forward"] / fwd - 1, (r["act_grad"] + r["weight_grad"]) / bwd - 1
        print(
            f"{cfg} {name} {opts}: forward {fwd:,} rel.err {err_f:+.2e}; backward {bwd:,} rel.err {err_b:+.2e}"
        )
        assert abs(err_f) <= 0.02 and abs(err_b) <= 0.02
        assert r["total"] == r["forward"] + r["act_grad"] + r["weight_grad"]


def closed_form_forward(c, S, T):
    """By hand, per example: encoder layers (q, k, v, out + FFN on S tokens), decoder layers
    (self q, k, v, out + cross q, out + FFN on T tokens; cross k, v on S tokens), output layer;
    dense attention q.k^T and a.v."""
    d, Fe, Fd, V, E, D = (
        c.d_model,
        c.encoder_ffn_dim,
        c.decoder_ffn_dim,
        c.vocab_size,
        c.encoder_layers,
        c.decoder_layers,
    )
    linears = (
        E * S * (4 * d * d + 2 * d * Fe)
        + D * (T * (6 * d * d + 2 * d * Fd) + S * 2 * d * d)
        + T * d * V
    )
    attention = E * 2 * S * S * d + D * (2 * T * T * d + 2 * T * S * d)
    return 2 * (linears + attention)


def test_both_conventions_against_closed_forms():
    c, S, T = config_from_preset("bart-large"), 512, 128
    fwd = closed_form_forward(c, S, T)
    custom = flops.step_flops(c, "custom", S, T)
    assert custom["exact"]["forward"] == fwd
    # everything requires grad: every matmul's backward is 2 matmuls
    assert custom["exact"]["total"] == 3 * fwd
    # lldb: the trunk runs forward only; the backward is one decoder layer and the output layer's
    # input gradient
    lldb = flops.step_flops(c, "lldb", S, T)["exact"]
    d, Fd, V = c.d_model, c.decoder_ffn_dim, c.vocab_size
    # weight grads: all 10 linears of the block (cross k, v on S tokens); act grads: the output
    # layer's input, the linears not reading a frozen input (self out, cross q, cross out, fc1, fc2)
    # and each attention's dq, dK, dA, dV
    assert lldb["weight_grad"] == 2 * (T * (6 * d * d + 2 * d * Fd) + S * 2 * d * d)
    assert lldb["act_grad"] == 2 * T * d * V + 2 * T * (3 * d * d + 2 * d * Fd) + 4 * (
        2 * T * T * d + 2 * T * S * d
    )
    assert lldb["forward"] == fwd
    # paper: 2N per token (encoder layers on source tokens, decoder layers and the output layer on
    # target tokens) ../docs/checkpoints.md §10 building blocks
    n_enc, n_dec, n_out = 12 * 12_596_224, 12 * 16_796_672, 51_471_360
    paper_fwd = 2 * (n_enc * S + (n_dec + n_out) * T)
    assert custom["paper"]["forward"] == paper_fwd and custom["paper"]["total"] == 3 * paper_fwd
    lldb_p = flops.step_flops(c, "lldb", S, T)["paper"]
    assert lldb_p["act_grad"] == lldb_p["weight_grad"] == 2 * 16_796_672 * T
    leo_p = flops.step_flops(c, "leo", S, T)["paper"]
    assert leo_p["act_grad"] == 2 * n_out * T  # lookups are free; the tied output layer trains
    # P defaults to 200 for prefix
    pre = flops.step_flops(c, "prefix", S, T, sites=("encoder", "decoder"))
    assert pre["paper"]["forward"] == paper_fwd + 2 * 12 * 2 * 200 * d * (S + T)
    # q.k^T and a.v over 200 more keys
    assert pre["exact"]["forward"] == fwd + 12 * 2 * 2 * 200 * d * (S + T)
    # per-example lengths: a batch is the sum of its examples
    two = flops.step_flops(c, "leo", [S, 100], [T, 30])["exact"]["total"]
    assert (
        two
        == flops.step_flops(c, "leo", S, T)["exact"]["total"]
        + flops.step_flops(c, "leo", 100, 30)["exact"]["total"]
    )


def test_bad_input():
    c = config_from_preset("tiny")
    with pytest.raises(ValueError, match="valid strategies: custom, leo, lldb, prefix, lora"):
        flops.step_flops(c, "bitfit", 10, 5)
    with pytest.raises(TypeError):
        flops.step_flops(c, "lldb", 10, 5, r=8)  # an option of another strategy
    with pytest.raises(TypeError):
        flops.step_flops(c, "custom", 10, 5, prefix_len=200)
    with pytest.raises(ValueError, match="no decoder layers"):
        flops.param_counts(config_from_preset("tiny", decoder_layers=0), "lldb")
    with pytest.raises(ValueError, match="target lengths"):
        flops.step_flops(c, "custom", [10, 12], [5])
