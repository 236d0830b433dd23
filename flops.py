"""Parameter counts (Table 1) and FLOPs per training step for each customization strategy (§3.4,
Figure 4: compute in PF-s, 1 PF-s = 1e15 FLOPs). The trainer calls step_flops(config, strategy,
src_lens, tgt_lens) once per step.

python flops.py --model bart-large [--src 512 --tgt 128 --batch 8 --steps 1000]     (make flops)

Convention, stated once: 1 FLOP = one multiply or one add, so a multiply-add is 2 (Kaplan et al. 2020, and what
torch.utils.flop_counter.FlopCounterMode counts for mm/addmm/bmm). Counted: every matmul: the linear layers (not
their bias adds), the attention scores q.k^T and the weighted sum a.v, the output layer. Not counted: layer norms,
softmax, GELU, dropout, masking, residual adds, embedding lookups and their backward (an index-add), the loss, the
optimizer step. Two conventions:
  exact: what autograd runs on the `math` attention path. The backward of a matmul computes the gradient of an
    input only if that input requires grad: activation gradients flow from the loss down to the lowest trainable
    tensor and no further, weight gradients only for trainable weights. Attention is dense: every query against
    P + L keys, the causally masked half included (math and sdpa compute it). Each example counts at the lengths
    given (pass the real lengths to count useful work, the padded ones to count what a padded batch computes).
    The part of dK, dV that lands in the prefix rows is the prefix's weight gradient; all else is activation grad.
  paper: Kaplan's C = 2N per token with "backward 2x, unnecessary for frozen layers", read at layer granularity.
    Units: each encoder layer (its parameters x source tokens), each decoder layer (x target tokens), the output
    layer (d*V x target tokens: the "embedding correction": lookups are free, the tied output matmul is not).
    A unit's N includes its biases, layer norms, LoRA factors and prefix K/V (2N per token for the prefix equals
    its real attention cost, 4*P*d per query). Forward = 2N per token over all units; backward = 2x the forward of
    the units holding something trainable, split evenly into act_grad and weight_grad; no attention term.
"""

import argparse
from collections import Counter

from data import positive_int

# The strategies' defaults, stated once here (flops.py needs no torch; strategies.py and train.py
# import them) encoder self-attention, decoder self-attention, decoder cross-attention
SITES = ("encoder", "decoder", "cross")
PREFIX_LEN = 200  # P, the paper's prefix length (§2.5)
# PEFT's defaults for BART (docs/checkpoints.md §8)
LORA_RANK, LORA_ALPHA, LORA_DEFAULT = 8, 16, ("q_proj", "v_proj")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # the linears counted below
OPTIONS = {
    "custom": set(),
    "leo": {"layernorm", "logits_bias"},
    "lldb": set(),
    "prefix": {"sites", "mlp_hidden", "init_ids"},
    "lora": {"r", "alpha", "targets"},
}


def _plan(c, strategy, prefix_len=None, **o):
    """What strategies.apply(model, strategy, **o) trains, as the flags the counters read."""
    if strategy not in OPTIONS:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(OPTIONS)}")
    if set(o) - OPTIONS[strategy] or (prefix_len and strategy != "prefix"):
        raise TypeError(
            f"options {sorted(set(o) - OPTIONS[strategy]) or ['prefix_len']} do not apply to {strategy}"
        )
    if strategy == "lldb" and c.decoder_layers == 0:
        raise ValueError("lldb trains the last decoder block, but this model has no decoder layers")
    E, D, full = c.encoder_layers, c.decoder_layers, strategy == "custom"
    P = (PREFIX_LEN if prefix_len is None else prefix_len) if strategy == "prefix" else 0
    return dict(
        emb=full or strategy == "leo",
        shared=full or strategy == "leo",
        enc=[full] * E,
        dec=[full] * (D - 1) + [full or strategy == "lldb"] * min(D, 1),
        sites=set(o.get("sites", SITES)) if strategy == "prefix" else set(),
        P=P,
        mlp=o.get("mlp_hidden", 0),
        r=o.get("r", LORA_RANK),
        lora=set(o.get("targets", LORA_DEFAULT)) if strategy == "lora" else set(),
        layernorm=o.get("layernorm", False),
        logits_bias=o.get("logits_bias", False),
    )


def blocks(c):
    """Building blocks of Table 1 (docs/checkpoints.md §10): a linear layer has i*o weights + o
    biases, a LayerNorm 2d."""
    d, V, lin = c.d_model, c.vocab_size, lambda i, o: i * o + o
    attn, enc_ffn, dec_ffn = (
        4 * lin(d, d),
        lin(d, c.encoder_ffn_dim) + lin(c.encoder_ffn_dim, d),
        lin(d, c.decoder_ffn_dim) + lin(c.decoder_ffn_dim, d),
    )
    return dict(
        shared=V * d,
        positions=(c.max_position_embeddings + 2) * d,
        layernorm=2 * d,
        logits_bias=V,
        enc_layer=attn + enc_ffn + 2 * 2 * d,
        dec_layer=2 * attn + dec_ffn + 3 * 2 * d,
    )


def _extras(c, t):
    """Per-layer LoRA and prefix parameters of one encoder / decoder layer, and the prefix MLP's
    (once)."""
    F_e, F_d, d, r = c.encoder_ffn_dim, c.decoder_ffn_dim, c.d_model, t["r"]

    def size(F):
        return dict(
            q_proj=(d, d), k_proj=(d, d), v_proj=(d, d), out_proj=(d, d), fc1=(d, F), fc2=(F, d)
        )

    def lora(F, n_attn):
        return sum(r * sum(size(F)[n]) * (n_attn if "proj" in n else 1) for n in t["lora"])

    def pre(site):
        return 2 * t["P"] * d * (site in t["sites"])

    n_out = (
        2
        * d
        * (
            c.encoder_layers * ("encoder" in t["sites"])
            + c.decoder_layers * len(t["sites"] - {"encoder"})
        )
    )
    mlp = t["P"] * d + (d * t["mlp"] + t["mlp"]) + (t["mlp"] * n_out + n_out) if t["mlp"] else 0
    return lora(F_e, 1) + pre("encoder"), lora(F_d, 2) + pre("decoder") + pre("cross"), mlp, n_out


def param_counts(c, strategy="custom", prefix_len=None, **o):
    """(trainable, total) parameters of BART(c) after strategies.apply(model, strategy, **o):
    Table 1."""
    t, b = _plan(c, strategy, prefix_len, **o), blocks(c)
    E, D = c.encoder_layers, c.decoder_layers
    base = (
        b["shared"]
        + 2 * b["positions"]
        + 2 * b["layernorm"]
        + E * b["enc_layer"]
        + D * b["dec_layer"]
    )
    enc_x, dec_x, mlp, _ = _extras(c, t)
    # LoRA factors or prefix (the MLP replaces the table)
    added = E * enc_x + D * dec_x if not t["mlp"] else mlp
    bias = b["logits_bias"] * t["logits_bias"]  # leo's option: the buffer becomes a parameter
    trainable = {
        "custom": base,
        "leo": b["shared"] + 2 * b["positions"] + 2 * b["layernorm"] * t["layernorm"] + bias,
        "lldb": b["dec_layer"],
    }.get(strategy, added)
    return trainable, base + added + bias


def _exact_example(c, t, S, T):
    """Autograd-exact forward / act_grad / weight_grad FLOPs of one (source S, target T) example,
    walking the model as model.py runs it and tracking, like autograd, whether each activation
    requires grad."""
    d, V, f = c.d_model, c.vocab_size, dict(forward=0, act_grad=0, weight_grad=0)

    def lin(M, i, o, x, w, name):
        """M tokens through an i -> o linear. x: its input requires grad; w: its weight trains.
        -> output needs grad."""
        n = 2 * M * i * o
        f["forward"] += n  # Y = X·Wᵀ: 2·M·i·o
        f["act_grad"] += n * x  # dX = dY·W: 2·M·i·o, if X requires grad
        f["weight_grad"] += n * w  # dW = dYᵀ·X: 2·M·i·o, if W trains
        if name not in t["lora"]:
            return x or w
        a, b = 2 * M * i * t["r"], 2 * M * t["r"] * o
        # H = X·Aᵀ: 2·M·i·r, then Y += H·Bᵀ: 2·M·r·o (the scale is not a matmul)
        f["forward"] += a + b
        f["act_grad"] += b  # dH = dY·B: 2·M·r·o (A trains, so H always needs its gradient)
        f["act_grad"] += a * x  # dX += dH·A: 2·M·i·r, if X requires grad
        f["weight_grad"] += a + b  # dA = dHᵀ·X: 2·M·i·r; dB = dYᵀ·H: 2·M·r·o
        return True

    def attn(Lq, Lk, P, q, k, v, p):
        """Lq queries over [P prefix keys; Lk keys], all heads together (H·hd = d). q, k, v:
        whether Q, K, V require grad; p: this site has a trainable prefix. -> the output requires
        grad."""
        kk, vv = k or p, v or p  # the concatenated [prefix; K] and [prefix; V] require grad
        keys, prefix_rows, key_rows = 2 * Lq * (P + Lk) * d, 2 * Lq * P * d, 2 * Lq * Lk * d
        f["forward"] += keys  # S = Q·Kᵀ: 2·Lq·(P+Lk)·d
        f["forward"] += keys  # O = A·V: 2·Lq·(P+Lk)·d
        f["act_grad"] += keys * q  # dQ = dS·K: 2·Lq·(P+Lk)·d, if Q requires grad
        f["act_grad"] += keys * (q or kk)  # dA = dO·Vᵀ: 2·Lq·(P+Lk)·d, if the scores require grad
        # dK = dSᵀ·Q and dV = Aᵀ·dO are computed whole (2·Lq·(P+Lk)·d each) when [prefix; K] /
        # [prefix; V] needs it: the P prefix rows are the prefix's weight gradient, the Lk key rows
        # an activation gradient
        f["weight_grad"] += prefix_rows * kk  # dK, prefix rows: 2·Lq·P·d
        f["act_grad"] += key_rows * kk  # dK, key rows: 2·Lq·Lk·d
        f["weight_grad"] += prefix_rows * vv  # dV, prefix rows: 2·Lq·P·d
        f["act_grad"] += key_rows * vv  # dV, key rows: 2·Lq·Lk·d
        return q or kk or vv

    x = t["emb"]  # the embedding output requires grad iff an embedding table trains
    for l in range(c.encoder_layers):
        w, p = t["enc"][l], "encoder" in t["sites"] and t["P"] > 0
        q, k, v = (lin(S, d, d, x, w, n) for n in ("q_proj", "k_proj", "v_proj"))
        # + residual, LayerNorm
        h = lin(S, d, d, attn(S, S, t["P"] * p, q, k, v, p), w, "out_proj") or x or w
        x = (
            lin(S, c.encoder_ffn_dim, d, lin(S, d, c.encoder_ffn_dim, h, w, "fc1"), w, "fc2")
            or h
            or w
        )
    enc, y = x, t["emb"]
    for l in range(c.decoder_layers):
        w, p, pc = (
            t["dec"][l],
            "decoder" in t["sites"] and t["P"] > 0,
            "cross" in t["sites"] and t["P"] > 0,
        )
        q, k, v = (lin(T, d, d, y, w, n) for n in ("q_proj", "k_proj", "v_proj"))
        h = lin(T, d, d, attn(T, T, t["P"] * p, q, k, v, p), w, "out_proj") or y or w
        q, k, v = (
            lin(T, d, d, h, w, "q_proj"),
            lin(S, d, d, enc, w, "k_proj"),
            lin(S, d, d, enc, w, "v_proj"),
        )
        h = lin(T, d, d, attn(T, S, t["P"] * pc, q, k, v, pc), w, "out_proj") or h or w
        y = (
            lin(T, c.decoder_ffn_dim, d, lin(T, d, c.decoder_ffn_dim, h, w, "fc1"), w, "fc2")
            or h
            or w
        )
    lin(T, d, V, y, t["shared"], "lm_head")  # the tied output layer
    return f


def _paper_example(c, t, S, T):
    b, (enc_x, dec_x, _, _) = blocks(c), _extras(c, t)
    units = [(b["enc_layer"] + enc_x, S, t["enc"][l] or enc_x > 0) for l in range(c.encoder_layers)]
    units += [
        (b["dec_layer"] + dec_x, T, t["dec"][l] or dec_x > 0) for l in range(c.decoder_layers)
    ]
    units += [(c.d_model * c.vocab_size, T, t["shared"])]
    fwd, bwd = (
        sum(2 * n * tok for n, tok, _ in units),
        sum(2 * n * tok for n, tok, tr in units if tr),
    )
    return dict(forward=fwd, act_grad=bwd, weight_grad=bwd)


def step_flops(config, strategy, src_lens, tgt_lens, prefix_len=None, **strategy_options):
    """FLOPs of one training step (forward + backward, no optimizer) on examples of these source
    and target lengths (ints, or one per example) -> {"exact": {forward, act_grad, weight_grad,
    total}, "paper": {...}}. prefix_len=None: PREFIX_LEN for the prefix strategy
    (strategies.prefix's default), 0 for the others."""
    src = [src_lens] if isinstance(src_lens, int) else list(src_lens)
    tgt = [tgt_lens] if isinstance(tgt_lens, int) else list(tgt_lens)
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} source lengths but {len(tgt)} target lengths")
    t, out = _plan(config, strategy, prefix_len, **strategy_options), {}
    _, _, mlp, n_out = _extras(config, t)
    for name, per_example in (("exact", _exact_example), ("paper", _paper_example)):
        tot = dict(forward=0, act_grad=0, weight_grad=0)
        for (S, T), n in Counter(zip(src, tgt)).items():  # equal lengths are counted once
            for k, v in per_example(config, t, S, T).items():
                tot[k] += n * v
        # the prefix MLP runs once a step on P virtual tokens: Linear(d, h) and Linear(h, n_out) (+
        # bwd)
        if mlp and t["P"]:
            m = 2 * t["P"] * (config.d_model * t["mlp"] + t["mlp"] * n_out)
            tot = dict(
                forward=tot["forward"] + m,
                act_grad=tot["act_grad"] + m,
                weight_grad=tot["weight_grad"] + m,
            )
        out[name] = {**tot, "total": sum(tot.values())}
    return out


def main():
    from model import config_from_preset  # only the CLI needs model.py

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default="bart-large")
    ap.add_argument("--src", type=positive_int, default=512, help="source tokens per example")
    ap.add_argument("--tgt", type=positive_int, default=128, help="target tokens per example")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument(
        "--steps", type=positive_int, default=1000, help="steps in one run, for PF-s per run"
    )
    a = ap.parse_args()
    c = config_from_preset(a.model)
    print(__doc__[__doc__.index("Convention") :])
    rows = [
        ("custom", {}, "406M (100%)"),
        ("leo", {}, "53M (13%)"),
        ("lldb", {}, "17M (4.2%)"),
        ("prefix", dict(sites=("encoder", "decoder")), "10M (2.4%), total 416M"),
        ("prefix", {}, "-"),
        ("prefix", dict(mlp_hidden=800), "- (training-time, Li & Liang MLP)"),
        ("lora", {}, "- (not in paper)"),
    ]

    def label(s, o):
        return (
            s
            + (f" {'+'.join(o['sites'])}" if "sites" in o else " 36 sites" if s == "prefix" else "")
            + (f" mlp {o['mlp_hidden']}" if "mlp_hidden" in o else "")
        )

    print(f"Table 1, {a.model}. Storage = the trainable delta a project keeps (MiB).")
    print(
        f"{'strategy':<26}{'trainable':>13}{'total':>14}{'%':>8}{'fp32 MiB':>10}{'fp16 MiB':>10}   paper"
    )
    for s, o, paper in rows:
        n, tot = param_counts(c, s, **o)
        print(
            f"{label(s, o):<26}{n:>13,}{tot:>14,}{100 * n / tot:>7.2f}%{4 * n / 2**20:>10.1f}{2 * n / 2**20:>10.1f}   {paper}"
        )
    b = blocks(c)  # L-EO: which tensors make the paper's "53M (13%)"? (docs/checkpoints.md §10)
    emb, pos, ln = b["shared"], b["positions"], 2 * b["layernorm"]
    print(
        f"\nL-EO readings: shared embedding {emb:,} | + one position table {emb + pos:,} | + both (C, ours) "
        f"{emb + 2 * pos:,} | C + layernorm_embedding {emb + 2 * pos + ln:,} | C + final_logits_bias "
        f"{emb + 2 * pos + b['logits_bias']:,}.\nOn bart-large C = 13.19% of 406M: the paper's 53M (13%) if it "
        f"truncated; rounded, only '+ one position table' (12.93%) gives 53M. C is the module-level reading."
    )
    print(
        f"\nGFLOP per target token (B = {a.batch}, S = {a.src}, T = {a.tgt}, P = {PREFIX_LEN}), exact | paper; PF-s per step "
        f"and per run of {a.steps} steps, exact / paper"
    )
    print(
        f"{'strategy':<26}{'fwd':>7}{'act':>7}{'wgt':>7}{'total':>7} |{'fwd':>7}{'act':>7}{'wgt':>7}{'total':>7}"
        f"{'PF-s/step':>16}{'PF-s/run':>14}"
    )
    for s, o, _ in rows:
        r = step_flops(c, s, [a.src] * a.batch, [a.tgt] * a.batch, **o)

        def g(cv):
            return "".join(
                f"{r[cv][k] / a.batch / a.tgt / 1e9:>7.2f}"
                for k in ("forward", "act_grad", "weight_grad", "total")
            )

        pf = [r[cv]["total"] / 1e15 for cv in ("exact", "paper")]
        print(
            f"{label(s, o):<26}{g('exact')} |{g('paper')}{pf[0]:>9.4f} /{pf[1]:.4f}{pf[0] * a.steps:>7.1f} /{pf[1] * a.steps:.1f}"
        )


if __name__ == "__main__":
    from data import cli

    cli(main)
