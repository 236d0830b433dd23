"""Parameter counts (Table 1) and FLOPs per training step for each customization strategy (§3.4,
Figure 4: compute in PF-s, 1 PF-s = 1e15 FLOPs). The trainer calls step_flops(config, strategy,
src_lens, tgt_lens) once per step. What each strategy trains and its defaults: strategies.TABLE.

python flops.py --model bart-large [--src 512 --tgt 128 --batch 8 --steps 1000]     (make flops)

Convention, stated once: 1 FLOP = one multiply or one add, so a multiply-add is 2 (Kaplan et al.
2020, and what torch.utils.flop_counter.FlopCounterMode counts for mm/addmm/bmm). Counted: every
matmul: the linear layers (not their bias adds), the attention scores q.k^T and the weighted sum
a.v, the output layer. Not counted: layer norms, softmax, GELU, dropout, masking, residual adds,
embedding lookups and their backward (an index-add), the loss, the optimizer step. Two
conventions:
  exact: what autograd runs on the `math` attention path. The backward of a matmul computes the
    gradient of an input only if that input requires grad: activation gradients flow from the
    loss down to the lowest trainable tensor and no further, weight gradients only for trainable
    weights. Attention is dense: every query against P + L keys, the causally masked half
    included (math and sdpa compute it). Each example counts at the lengths given (pass the real
    lengths to count useful work, the padded ones to count what a padded batch computes). The
    part of dK, dV that lands in the prefix rows is the prefix's weight gradient; all else is
    activation grad.
  paper: Kaplan's C = 2N per token with "backward 2x, unnecessary for frozen layers", read at
    layer granularity. Units: each encoder layer (its parameters x source tokens), each decoder
    layer (x target tokens), the output layer (d*V x target tokens: the "embedding correction":
    lookups are free, the tied output matmul is not). A unit's N includes its biases, layer
    norms, LoRA factors and prefix K/V (2N per token for the prefix equals its real attention
    cost, 4*P*d per query). Forward = 2N per token over all units; backward = 2x the forward of
    the units holding something trainable, split evenly into act_grad and weight_grad; no
    attention term.
"""

import argparse
from collections import Counter

from data import positive_int
from strategies import PREFIX_LEN, TABLE, with_defaults

# each strategy's keyword options (prefix_len is an argument of its own here)
OPTIONS = {name: set(spec.defaults) - {"prefix_len"} for name, spec in TABLE.items()}


def _plan(c, strategy, prefix_len=None, **o):
    """What strategies.apply(model, strategy, **o) trains, as the flags the counters read."""
    if strategy not in OPTIONS:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(OPTIONS)}")
    unknown = sorted(set(o) - OPTIONS[strategy])
    if unknown or (prefix_len and strategy != "prefix"):
        raise TypeError(f"options {unknown or ['prefix_len']} do not apply to {strategy}")
    if strategy == "lldb" and c.decoder_layers == 0:
        raise ValueError("lldb trains the last decoder block, but this model has no decoder layers")
    E = c.encoder_layers
    D = c.decoder_layers
    full = strategy == "custom"
    embeddings = full or strategy == "leo"
    last_block = full or strategy == "lldb"
    opts = with_defaults(strategy, o)
    plan = dict(
        # the embedding tables (shared, positions) / the tied output layer train
        emb=embeddings,
        shared=embeddings,
        # each encoder / decoder layer trains
        enc=[full] * E,
        dec=[full] * (D - 1) + [last_block] * min(D, 1),
        # the prefix: its sites, length and MLP width (0: none)
        sites=set(),
        P=0,
        mlp=0,
        # LoRA: its rank and the linears it wraps
        r=0,
        lora=set(),
        # leo's options
        layernorm=False,
        logits_bias=False,
    )
    if strategy == "prefix":
        plan["sites"] = set(opts["sites"])
        plan["P"] = opts["prefix_len"]
        if prefix_len is not None:
            plan["P"] = prefix_len
        plan["mlp"] = opts["mlp_hidden"]
    if strategy == "lora":
        plan["r"] = opts["r"]
        plan["lora"] = set(opts["targets"])
    if strategy == "leo":
        plan["layernorm"] = opts["layernorm"]
        plan["logits_bias"] = opts["logits_bias"]
    return plan


def blocks(c):
    """Building blocks of Table 1 (docs/checkpoints.md §10): a linear layer has i*o weights + o
    biases, a LayerNorm 2d."""
    d = c.d_model

    def lin(i, o):
        return i * o + o

    attn = 4 * lin(d, d)
    enc_ffn = lin(d, c.encoder_ffn_dim) + lin(c.encoder_ffn_dim, d)
    dec_ffn = lin(d, c.decoder_ffn_dim) + lin(c.decoder_ffn_dim, d)
    return dict(
        shared=c.vocab_size * d,
        positions=(c.max_position_embeddings + 2) * d,
        layernorm=2 * d,
        logits_bias=c.vocab_size,
        enc_layer=attn + enc_ffn + 2 * 2 * d,
        dec_layer=2 * attn + dec_ffn + 3 * 2 * d,
    )


def _extras(c, t):
    """The LoRA and prefix parameters of one encoder layer and of one decoder layer, the prefix
    MLP's (once), and the MLP's output width n_out."""
    d = c.d_model
    r = t["r"]

    def size(F):
        return dict(
            q_proj=(d, d), k_proj=(d, d), v_proj=(d, d), out_proj=(d, d), fc1=(d, F), fc2=(F, d)
        )

    def lora(F, n_attn):
        """A layer's LoRA factors: r * (in + out) per wrapped linear, per attention for the
        projections."""
        total = 0
        for n in t["lora"]:
            per_linear = r * sum(size(F)[n])
            if "proj" in n:
                per_linear *= n_attn
            total += per_linear
        return total

    def pre(site):
        return 2 * t["P"] * d * (site in t["sites"])

    enc_sites = c.encoder_layers * ("encoder" in t["sites"])
    dec_sites = c.decoder_layers * len(t["sites"] - {"encoder"})
    n_out = 2 * d * (enc_sites + dec_sites)
    mlp = 0
    if t["mlp"]:
        mlp = t["P"] * d + (d * t["mlp"] + t["mlp"]) + (t["mlp"] * n_out + n_out)
    enc_x = lora(c.encoder_ffn_dim, 1) + pre("encoder")
    dec_x = lora(c.decoder_ffn_dim, 2) + pre("decoder") + pre("cross")
    return enc_x, dec_x, mlp, n_out


def param_counts(c, strategy="custom", prefix_len=None, **o):
    """(trainable, total) parameters of BART(c) after strategies.apply(model, strategy, **o):
    Table 1."""
    t = _plan(c, strategy, prefix_len, **o)
    b = blocks(c)
    E = c.encoder_layers
    D = c.decoder_layers
    embeddings = b["shared"] + 2 * b["positions"] + 2 * b["layernorm"]
    base = embeddings + E * b["enc_layer"] + D * b["dec_layer"]
    enc_x, dec_x, mlp, _ = _extras(c, t)
    # LoRA factors or prefix; the MLP replaces the table
    added = E * enc_x + D * dec_x
    if t["mlp"]:
        added = mlp
    # leo's option: the buffer becomes a parameter
    bias = b["logits_bias"] * t["logits_bias"]
    if strategy == "custom":
        trainable = base
    elif strategy == "leo":
        trainable = b["shared"] + 2 * b["positions"] + 2 * b["layernorm"] * t["layernorm"] + bias
    elif strategy == "lldb":
        trainable = b["dec_layer"]
    else:
        trainable = added
    return trainable, base + added + bias


def needs_grad(*inputs):
    """Autograd's rule: a result requires grad iff one of its inputs does (a trainable tensor
    does)."""
    return any(inputs)


def _lin(f, t, M, i, o, x, w, name):
    """Counts M tokens through an i -> o linear into f. x: its input requires grad; w: its
    weight trains. -> whether the output requires grad."""
    n = 2 * M * i * o
    # Y = X·Wᵀ: 2·M·i·o
    f["forward"] += n
    # dX = dY·W: 2·M·i·o, if X requires grad
    f["act_grad"] += n * x
    # dW = dYᵀ·X: 2·M·i·o, if W trains
    f["weight_grad"] += n * w
    if name not in t["lora"]:
        return needs_grad(x, w)
    a = 2 * M * i * t["r"]
    b = 2 * M * t["r"] * o
    # H = X·Aᵀ: 2·M·i·r, then Y += H·Bᵀ: 2·M·r·o (the scale is not a matmul)
    f["forward"] += a + b
    # dH = dY·B: 2·M·r·o (A trains, so H always needs its gradient)
    f["act_grad"] += b
    # dX += dH·A: 2·M·i·r, if X requires grad
    f["act_grad"] += a * x
    # dA = dHᵀ·X: 2·M·i·r; dB = dYᵀ·H: 2·M·r·o
    f["weight_grad"] += a + b
    return True


def _attn(f, d, Lq, Lk, P, q, k, v, p):
    """Counts Lq queries over [P prefix keys; Lk keys] into f, all heads together (H·hd = d). q,
    k, v: whether Q, K, V require grad; p: this site has a trainable prefix. -> whether the output
    requires grad."""
    # the concatenated [prefix; K] and [prefix; V]
    kk = needs_grad(k, p)
    vv = needs_grad(v, p)
    keys = 2 * Lq * (P + Lk) * d
    prefix_rows = 2 * Lq * P * d
    key_rows = 2 * Lq * Lk * d
    # S = Q·Kᵀ and O = A·V: 2·Lq·(P+Lk)·d each
    f["forward"] += keys
    f["forward"] += keys
    # dQ = dS·K: 2·Lq·(P+Lk)·d, if Q requires grad
    f["act_grad"] += keys * q
    # dA = dO·Vᵀ: 2·Lq·(P+Lk)·d, if the scores require grad
    f["act_grad"] += keys * needs_grad(q, kk)
    # dK = dSᵀ·Q and dV = Aᵀ·dO are computed whole (2·Lq·(P+Lk)·d each) when [prefix; K] /
    # [prefix; V] needs it: the P prefix rows (2·Lq·P·d) are the prefix's weight gradient, the
    # Lk key rows (2·Lq·Lk·d) an activation gradient
    f["weight_grad"] += prefix_rows * kk
    f["act_grad"] += key_rows * kk
    f["weight_grad"] += prefix_rows * vv
    f["act_grad"] += key_rows * vv
    return needs_grad(q, kk, vv)


def _exact_example(c, t, S, T):
    """Autograd-exact forward / act_grad / weight_grad FLOPs of one (source S, target T) example,
    walking the model as model.py runs it and tracking, like autograd, whether each activation
    requires grad."""
    d = c.d_model
    f = dict(forward=0, act_grad=0, weight_grad=0)

    def lin(M, i, o, x, w, name):
        return _lin(f, t, M, i, o, x, w, name)

    def attn(Lq, Lk, P, q, k, v, p):
        return _attn(f, d, Lq, Lk, P, q, k, v, p)

    def ffn(M, F, h, w):
        """fc1, GELU, fc2, then the residual add and the layer's LayerNorm (trained with the
        layer)."""
        u = lin(M, d, F, h, w, "fc1")
        o = lin(M, F, d, u, w, "fc2")
        return needs_grad(o, h, w)

    def encoder_layer(x, w, p):
        """x: the layer's input requires grad; w: the layer trains; p: its prefix trains."""
        q = lin(S, d, d, x, w, "q_proj")
        k = lin(S, d, d, x, w, "k_proj")
        v = lin(S, d, d, x, w, "v_proj")
        o = lin(S, d, d, attn(S, S, t["P"] * p, q, k, v, p), w, "out_proj")
        # the residual add, then the LayerNorm
        h = needs_grad(o, x, w)
        return ffn(S, c.encoder_ffn_dim, h, w)

    def decoder_layer(y, enc, w, p, pc):
        """y: the layer's input requires grad; enc: the encoder output does; w: the layer trains;
        p, pc: its self-attention / cross-attention prefix trains."""
        q = lin(T, d, d, y, w, "q_proj")
        k = lin(T, d, d, y, w, "k_proj")
        v = lin(T, d, d, y, w, "v_proj")
        o = lin(T, d, d, attn(T, T, t["P"] * p, q, k, v, p), w, "out_proj")
        h = needs_grad(o, y, w)
        q = lin(T, d, d, h, w, "q_proj")
        k = lin(S, d, d, enc, w, "k_proj")
        v = lin(S, d, d, enc, w, "v_proj")
        o = lin(T, d, d, attn(T, S, t["P"] * pc, q, k, v, pc), w, "out_proj")
        h = needs_grad(o, h, w)
        return ffn(T, c.decoder_ffn_dim, h, w)

    has_prefix = t["P"] > 0
    # the embedding output requires grad iff an embedding table trains
    x = t["emb"]
    for l in range(c.encoder_layers):
        x = encoder_layer(x, t["enc"][l], "encoder" in t["sites"] and has_prefix)
    enc = x
    y = t["emb"]
    for l in range(c.decoder_layers):
        p = "decoder" in t["sites"] and has_prefix
        pc = "cross" in t["sites"] and has_prefix
        y = decoder_layer(y, enc, t["dec"][l], p, pc)
    # the tied output layer
    lin(T, d, c.vocab_size, y, t["shared"], "lm_head")
    return f


def _paper_example(c, t, S, T):
    b = blocks(c)
    enc_x, dec_x, _, _ = _extras(c, t)
    # (parameters, tokens, holds something trainable) per unit
    units = []
    for l in range(c.encoder_layers):
        units.append((b["enc_layer"] + enc_x, S, t["enc"][l] or enc_x > 0))
    for l in range(c.decoder_layers):
        units.append((b["dec_layer"] + dec_x, T, t["dec"][l] or dec_x > 0))
    units.append((c.d_model * c.vocab_size, T, t["shared"]))
    fwd = sum(2 * n * tok for n, tok, _ in units)
    bwd = sum(2 * n * tok for n, tok, trains in units if trains)
    return dict(forward=fwd, act_grad=bwd, weight_grad=bwd)


def step_flops(config, strategy, src_lens, tgt_lens, prefix_len=None, **strategy_options):
    """FLOPs of one training step (forward + backward, no optimizer) on examples of these source
    and target lengths (ints, or one per example) -> {"exact": {forward, act_grad, weight_grad,
    total}, "paper": {...}}. prefix_len=None: the table's default for the prefix strategy
    (strategies.prefix's), 0 for the others."""
    src = [src_lens] if isinstance(src_lens, int) else list(src_lens)
    tgt = [tgt_lens] if isinstance(tgt_lens, int) else list(tgt_lens)
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} source lengths but {len(tgt)} target lengths")
    t = _plan(config, strategy, prefix_len, **strategy_options)
    _, _, mlp, n_out = _extras(config, t)
    out = {}
    for name, per_example in (("exact", _exact_example), ("paper", _paper_example)):
        tot = dict(forward=0, act_grad=0, weight_grad=0)
        # equal lengths are counted once
        for (S, T), n in Counter(zip(src, tgt)).items():
            for k, v in per_example(config, t, S, T).items():
                tot[k] += n * v
        # the prefix MLP runs once a step on P virtual tokens: Linear(d, h) and Linear(h, n_out),
        # forward and backward
        if mlp and t["P"]:
            m = 2 * t["P"] * (config.d_model * t["mlp"] + t["mlp"] * n_out)
            for k in tot:
                tot[k] += m
        out[name] = {**tot, "total": sum(tot.values())}
    return out


# the rows of `python flops.py`: (strategy, options, the paper's Table 1 entry)
ROWS = [
    ("custom", {}, "406M (100%)"),
    ("leo", {}, "53M (13%)"),
    ("lldb", {}, "17M (4.2%)"),
    ("prefix", dict(sites=("encoder", "decoder")), "10M (2.4%), total 416M"),
    ("prefix", {}, "-"),
    ("prefix", dict(mlp_hidden=800), "- (training-time, Li & Liang MLP)"),
    ("lora", {}, "- (not in paper)"),
]


def label(s, o):
    """A row's name: the strategy, its prefix sites, its MLP width."""
    text = s
    if "sites" in o:
        text += f" {'+'.join(o['sites'])}"
    elif s == "prefix":
        text += " 36 sites"
    if "mlp_hidden" in o:
        text += f" mlp {o['mlp_hidden']}"
    return text


def print_table1(c, model):
    print(f"Table 1, {model}. Storage = the trainable delta a project keeps (MiB).")
    header = f"{'strategy':<26}{'trainable':>13}{'total':>14}{'%':>8}"
    print(header + f"{'fp32 MiB':>10}{'fp16 MiB':>10}   paper")
    for s, o, paper in ROWS:
        n, tot = param_counts(c, s, **o)
        counts = f"{label(s, o):<26}{n:>13,}{tot:>14,}{100 * n / tot:>7.2f}%"
        print(counts + f"{4 * n / 2**20:>10.1f}{2 * n / 2**20:>10.1f}   {paper}")
    # L-EO: which tensors make the paper's "53M (13%)"? (docs/checkpoints.md §10)
    b = blocks(c)
    emb = b["shared"]
    pos = b["positions"]
    ln = 2 * b["layernorm"]
    print(
        f"\nL-EO readings: shared embedding {emb:,} | + one position table {emb + pos:,} | "
        f"+ both (C, ours) {emb + 2 * pos:,} | C + layernorm_embedding {emb + 2 * pos + ln:,} | "
        f"C + final_logits_bias {emb + 2 * pos + b['logits_bias']:,}.\nOn bart-large C = 13.19% "
        f"of 406M: the paper's 53M (13%) if it truncated; rounded, only '+ one position table' "
        f"(12.93%) gives 53M. C is the module-level reading."
    )


def print_flops(c, a):
    print(
        f"\nGFLOP per target token (B = {a.batch}, S = {a.src}, T = {a.tgt}, P = {PREFIX_LEN}), "
        f"exact | paper; PF-s per step and per run of {a.steps} steps, exact / paper"
    )
    columns = f"{'fwd':>7}{'act':>7}{'wgt':>7}{'total':>7}"
    print(f"{'strategy':<26}{columns} |{columns}{'PF-s/step':>16}{'PF-s/run':>14}")
    for s, o, _ in ROWS:
        r = step_flops(c, s, [a.src] * a.batch, [a.tgt] * a.batch, **o)

        def g(cv):
            parts = ("forward", "act_grad", "weight_grad", "total")
            return "".join(f"{r[cv][k] / a.batch / a.tgt / 1e9:>7.2f}" for k in parts)

        exact = r["exact"]["total"] / 1e15
        paper = r["paper"]["total"] / 1e15
        per_step = f"{exact:>9.4f} /{paper:.4f}"
        per_run = f"{exact * a.steps:>7.1f} /{paper * a.steps:.1f}"
        print(f"{label(s, o):<26}{g('exact')} |{g('paper')}{per_step}{per_run}")


def main():
    # only the command line needs model.py
    from model import config_from_preset

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
    print_table1(c, a.model)
    print_flops(c, a)


if __name__ == "__main__":
    from data import cli

    cli(main)
