"""BART, the encoder-decoder behind AthenaTest, in one file (paper §2.1 and Figure 1; §2.5 for the
prefix hook).

Reads bottom-up: config and presets -> attention (the `math` reference beside `sdpa` and the Triton kernel)
-> encoder layer -> decoder layer -> the model (embeddings, encoder, decoder, tied output layer) -> beam
search -> loading and saving HF directories and fairseq checkpoints (the file readers are in weights.py).
Module and tensor names follow the HF `BartForConditionalGeneration` checkpoint, so loading is a key-for-key
copy (docs/checkpoints.md). Three CPU speed-ups keep their reference beside them (tests/test_model_fast_paths.py):
the encoder's layers run on the real tokens only (packed), `sdpa` takes padding-only and causal-only short cuts,
and dropout draws its random bits two elements to a 32-bit draw.

    from model import BART
    model = BART.from_pretrained("path/to/hf_dir_or_fairseq.pt")
    logits = model(input_ids, attention_mask, decoder_input_ids)            # (B, T_dec, V)
    seqs, scores = model.generate(input_ids, attention_mask, num_beams=5, num_return_sequences=5)

Tests: `make test` (tests/test_model.py compares logits, loss, greedy and beam search with HF
transformers). Benchmark: `make bench` (python bench/bench_model.py)."""

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class BARTConfig:
    # field names are HF's `BartConfig` names, so config.json round-trips with transformers
    # 50265 for bart-large; 50264 after fairseq translation fine-tuning (AthenaTest)
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    # the learned tables have 2 more rows (positions are offset by 2)
    max_position_embeddings: int = 1024
    # True multiplies token embeddings by sqrt(d_model) (PLBART); False for BART
    scale_embedding: bool = False
    dropout: float = 0.1  # residual dropout
    # on attention probabilities; `math` path only (the kernel has none)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # after the GELU
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # fairseq's `</s>`-first convention; HF's shift_tokens_right does the same
    decoder_start_token_id: int = 2
    # set only for checkpoints fine-tuned with `<s>` in the targets
    forced_bos_token_id: int | None = None
    attn_impl: str = "math"  # math (readable reference) | sdpa | triton (kernels/attention.py)


PRESETS = {
    "bart-large": dict(),  # 406,291,456 parameters; AthenaTest's architecture
    "bart-base": dict(
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        # 139,420,416
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    ),
    # CPU preset, sized so `make train STRATEGY=lldb` fits in 30 minutes on 2 cores: head dim 64 as
    # in BART, vocabulary of the byte-level BPE that data/ trains on the base projects. 7,890,944
    # parameters.
    "tiny": dict(
        vocab_size=8192,
        d_model=256,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        max_position_embeddings=512,
    ),
    # the shipped base's preset (checkpoints/base/): 2.5x tiny's width, four layers a side;
    # 20,105,216 parameters, 40 MB in bf16. Chosen over tiny by a comparison at a fixed budget
    # (docs/experiments.md, "The shipped base")
    "small": dict(
        vocab_size=8192,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_position_embeddings=512,
    ),
}


# the three names of the one shared embedding in an HF checkpoint (model.shared.weight is the tensor
# itself)
TIED = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return BARTConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# attention: one function per implementation, all with the kernel's signature


def with_prefix_and_mask(q, k, v, key_padding_mask, causal, prefix_k, prefix_v, prefix_index):
    """The reference's view of attention: each row's prefix K/V put in front of its keys, and the
    boolean visibility (B, 1, Lq, P + Lk): prefix always visible; real keys by padding and the
    lower-right causal rule."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(
            diagonal=Lk - Lq
        )
    if prefix_k is not None:
        pk, pv = gather_prefix(prefix_k, prefix_v, prefix_index, B)  # (B, H, P, D) each
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, P + Lk, D)
        always = torch.ones(B, 1, Lq, pk.shape[2], dtype=torch.bool, device=q.device)
        visible = torch.cat([always, visible], dim=-1)  # (B, 1, Lq, P + Lk)
    return k, v, visible


def attention_math(
    q,
    k,
    v,
    key_padding_mask=None,
    causal=False,
    prefix_k=None,
    prefix_v=None,
    prefix_index=None,
    softmax_scale=None,
    dropout_p=0.0,
):
    """The readable reference. q (B, H, Lq, D); k, v (B, H, Lk, D); key_padding_mask (B, Lk) True
    = real key; causal: query i sees key j iff j <= i + (Lk - Lq) (lower-right, so a KV-cached
    step with Lq = 1 sees all); prefix_k/v (H, P, D) shared, or a bank (N, H, P, D) with
    prefix_index (B,) picking each row's prefix. Prefix keys are always visible and have no
    positions. A row with no visible key returns 0 (no NaN)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    k, v, visible = with_prefix_and_mask(
        q, k, v, key_padding_mask, causal, prefix_k, prefix_v, prefix_index
    )
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Lq, P + Lk)
    s = s.masked_fill(~visible, float("-inf"))
    # rows with nothing visible get 0, not softmax(-inf) = NaN
    row_ok = visible.any(dim=-1, keepdim=True)
    a = torch.softmax(s.masked_fill(~row_ok, 0.0), dim=-1) * row_ok
    if dropout_p > 0.0:
        a = F.dropout(a, p=dropout_p)
    return a @ v  # (B, H, Lq, D)


def attention_sdpa(
    q,
    k,
    v,
    key_padding_mask=None,
    causal=False,
    prefix_k=None,
    prefix_v=None,
    prefix_index=None,
    softmax_scale=None,
    dropout_p=0.0,
):
    """PyTorch's fused attention. Without a prefix, padding alone goes in as a (B, 1, 1, Lk) mask
    and causal alone (Lq = Lk) as is_causal, so the kernel skips the masked blocks; else the
    concatenated prefix + keys, full mask."""
    kw = dict(dropout_p=dropout_p, scale=softmax_scale)
    if prefix_k is None and not causal:
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        # (B, 1, 1, 1): a row with no real key gives 0
        row_ok = key_padding_mask.any(dim=-1)[:, None, None, None]
        return (
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_padding_mask[:, None, None, :] | ~row_ok, **kw
            )
            * row_ok
        )
    # upper-left = lower-right here
    if prefix_k is None and key_padding_mask is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    k, v, visible = with_prefix_and_mask(
        q, k, v, key_padding_mask, causal, prefix_k, prefix_v, prefix_index
    )
    # fully masked rows: unmask them, then zero the output
    row_ok = visible.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~row_ok, **kw) * row_ok


def attention_triton(q, k, v, dropout_p=0.0, prefix_index=None, **kw):
    assert dropout_p == 0.0, "attn_impl='triton' has no attention dropout: set attention_dropout=0"
    from kernels.attention import attention  # imported lazily: Triton is not needed for math/sdpa

    # serve.py
    return attention(
        q, k, v, prefix_index=prefix_index if kw.get("prefix_k") is not None else None, **kw
    )
    # passes a row index with no prefix (it picks other banks); the kernel takes an index with a
    # prefix bank only


ATTENTION = {"math": attention_math, "sdpa": attention_sdpa, "triton": attention_triton}


def gather_prefix(prefix_k, prefix_v, prefix_index, B):
    """(H, P, D) shared -> expanded (B, H, P, D) view; (N, H, P, D) bank + prefix_index (B,) ->
    per-row rows."""
    if prefix_k.dim() == 3:
        return prefix_k.expand(B, *prefix_k.shape), prefix_v.expand(B, *prefix_v.shape)
    assert prefix_index is not None and prefix_index.shape == (B,), (
        "a prefix bank needs prefix_index of shape (B,)"
    )
    return prefix_k[prefix_index], prefix_v[prefix_index]


# where the encoder's self-attention runs one call per row (Attention.packed)
VARLEN_DEVICES = {"cpu"}


def scatter_rows(x, where):
    """(N, ...) rows of the real tokens -> (B, S, ...) with zeros at the pads; where (B, S) bool,
    N True entries."""
    out = x.new_zeros(*where.shape, *x.shape[1:])
    out[where] = x
    return out


class Attention(nn.Module):
    """Multi-head attention with HF's q/k/v/out projection names. The caller hands it keys and
    values already projected (self-attention: from x, grown by the KV cache; cross-attention:
    from the encoder, computed once)."""

    def __init__(self, config, n_heads):
        super().__init__()
        d = config.d_model
        assert d % n_heads == 0, f"d_model {d} is not divisible by {n_heads} heads"
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.config = config

    def split_heads(self, x):  # (B, T, C) -> (B, H, T, hd)
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x):  # (B, T, C) -> k, v (B, H, T, hd)
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def forward(self, x, k, v, key_padding_mask=None, causal=False, prefix=None, prefix_index=None):
        B, T, C = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, H, T, hd)
        pk, pv = prefix if prefix is not None else (None, None)
        p = self.config.attention_dropout if self.training else 0.0
        # lower-right causal: one query (a KV-cached step) sees every key, no mask needed
        causal = causal and T > 1
        y = ATTENTION[self.config.attn_impl](
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            prefix_k=pk,
            prefix_v=pv,
            prefix_index=prefix_index,
            dropout_p=p,
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, H, T, hd) -> (B, T, C)

    def packed(self, x, mask, prefix=None, prefix_index=None):
        """The encoder's self-attention on the real tokens only: x (N, C) = padded[mask], mask
        (B, S) -> (N, C). On a CPU one unmasked call per row, so no pad is computed
        (FlashAttention's varlen, as a loop); elsewhere the rows go back to (B, H, S, hd) for one
        masked call (a loop of small launches is slow on a GPU)."""
        pk, pv = prefix if prefix is not None else (None, None)
        kw = dict(
            prefix_k=pk,
            prefix_v=pv,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
        )
        attend, (q, k, v) = (
            ATTENTION[self.config.attn_impl],
            (f(x) for f in (self.q_proj, self.k_proj, self.v_proj)),
        )
        if x.device.type not in VARLEN_DEVICES:
            y = attend(
                *(self.split_heads(scatter_rows(t, mask)) for t in (q, k, v)),
                key_padding_mask=mask,
                prefix_index=prefix_index,
                **kw,
            )
            # (B, S, H, hd)[mask] -> (N, H, hd) -> (N, C)
            return self.out_proj(y.transpose(1, 2)[mask].flatten(1))

        def heads(t):
            return (
                t.view(-1, self.n_heads, self.head_dim)
                .transpose(0, 1)
                .split(mask.sum(1).tolist(), dim=1)
            )

        y = [
            attend(
                q_i[None],
                k_i[None],
                v_i[None],
                prefix_index=None if prefix_index is None else prefix_index[i : i + 1],
                # (H, n_i, hd) each
                **kw,
            )[0]
            for i, (q_i, k_i, v_i) in enumerate(zip(heads(q), heads(k), heads(v)))
        ]
        return self.out_proj(torch.cat(y, dim=1).transpose(0, 1).flatten(1))  # (H, N, hd) -> (N, C)


# -----------------------------------------------------------------------------
# layers: post-LN (residual add, then LayerNorm), exact erf GELU, as fairseq's bart_large


def dropout(x, p, training):
    """F.dropout with cheaper random bits on a CPU, where torch's generator is a serial Mersenne
    twister and F.dropout's Bernoulli mask costs ~10 ns an element (a tenth of a training step):
    one 32-bit draw makes two 15-bit fields, an element is dropped when its field < round(p *
    32768) (p to 1/32768: 0.1 -> 0.100006) and the rest scaled by 1 / (1 - that p). Elsewhere
    F.dropout (on a GPU: Philox, fused)."""
    if not training or not 0.0 < p < 1.0 or x.device.type != "cpu":
        return F.dropout(x, p=p, training=training)
    cut, n = round(p * 32768), x.numel()
    # 31 bits each
    bits = (
        torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16)[:n].view(x.shape)
    )
    return x * (((bits & 0x7FFF) >= cut).to(x.dtype) * (32768 / (32768 - cut)))


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(config, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = (
            nn.Linear(d, config.encoder_ffn_dim),
            nn.Linear(config.encoder_ffn_dim, d),
        )
        self.final_layer_norm = nn.LayerNorm(d)
        self.config = config

    def forward(self, x, mask, prefix=None, prefix_index=None):
        """x (N, C): the batch's real tokens only (padded[mask], mask (B, S)); all but attention
        is per token."""

        def drop(t, p):
            return dropout(t, p, self.training)

        h = self.self_attn.packed(x, mask, prefix, prefix_index)
        x = self.self_attn_layer_norm(x + drop(h, self.config.dropout))
        h = self.fc2(drop(F.gelu(self.fc1(x)), self.config.activation_dropout))
        return self.final_layer_norm(x + drop(h, self.config.dropout))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(config, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(config, config.decoder_attention_heads)  # cross-attention
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = (
            nn.Linear(d, config.decoder_ffn_dim),
            nn.Linear(config.decoder_ffn_dim, d),
        )
        self.final_layer_norm = nn.LayerNorm(d)
        self.config = config

    def forward(
        self,
        x,
        enc,
        enc_mask,
        dec_mask=None,
        prefix=(None, None),
        prefix_index=None,
        cache=None,
        beams=1,
    ):
        """x (B*beams, T, C) decoder states; enc (B, S, C) encoder output, shared by the `beams`
        consecutive rows of x that belong to one input (beam search); prefix = (self-attention,
        cross) K/V pairs; cache: a dict this layer fills ("k", "v" grow by T each call, first
        gathered by a pending "order"; "ck", "cv" are computed once)."""
        BK, T, C = x.shape

        def drop(t, p):
            return dropout(t, p, self.training)

        # causal self-attention; with a cache the new keys are appended to the past ones
        k, v = self.self_attn.project_kv(x)  # (B, H, T, hd)
        if cache is not None:
            # generate() leaves "order", each row's parent beam: gathered as the new keys append
            if "k" in cache:
                order = cache.pop("order", None)
                k, v = append_kv(cache["k"], k, order), append_kv(cache["v"], v, order)
            cache["k"], cache["v"] = k, v
        h = self.self_attn(
            x,
            k,
            v,
            key_padding_mask=dec_mask,
            causal=True,
            prefix=prefix[0],
            prefix_index=prefix_index,
        )
        x = self.self_attn_layer_norm(x + drop(h, self.config.dropout))
        # cross-attention: queries from the decoder, keys and values from the encoder output
        if cache is not None and "ck" in cache:
            ck, cv = cache["ck"], cache["cv"]
        else:
            ck, cv = self.encoder_attn.project_kv(enc)  # (B, H, S, hd)
            if cache is not None:
                cache["ck"], cache["cv"] = ck, cv
        # cross-attention is not causal, so the beams of one input can query its encoder K/V
        # together, as beams * T queries of one row: the encoder side is stored and read once per
        # input, not once per beam
        cross_index = prefix_index[::beams] if prefix_index is not None else None
        h = self.encoder_attn(
            x.reshape(BK // beams, beams * T, C),
            ck,
            cv,
            key_padding_mask=enc_mask,
            prefix=prefix[1],
            prefix_index=cross_index,
        ).reshape(BK, T, C)
        x = self.encoder_attn_layer_norm(x + drop(h, self.config.dropout))
        h = self.fc2(drop(F.gelu(self.fc1(x)), self.config.activation_dropout))
        return self.final_layer_norm(x + drop(h, self.config.dropout))


def append_kv(past, new, order=None):
    """cat([past[order], new], dim=2) in one copy: the past rows are gathered straight into the
    result."""
    P = past.shape[2]
    out = new.new_empty(new.shape[0], new.shape[1], P + new.shape[2], new.shape[3])
    torch.index_select(past, 0, order, out=out[:, :, :P]) if order is not None else out[
        :, :, :P
    ].copy_(past)
    out[:, :, P:] = new
    return out


# -----------------------------------------------------------------------------
# the model


def positions(mask, T, past, device):
    """Learned-position rows. Padding-aware (fairseq's make_positions): the i-th real token gets
    position i whatever the padding side, so right- and left-padded inputs agree; left pads get
    position 0, right pads repeat the last real position (neither is ever attended)."""
    if mask is None:
        return torch.arange(past, past + T, device=device)[None, :]  # (1, T)
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0) + past  # (B, T)


class Embeddings(nn.Module):
    """Token embedding (shared) + learned positions (offset by 2: rows 0-1 are fairseq's unused
    padding rows), then `layernorm_embedding`, as in both the encoder and the decoder of BART."""

    def __init__(self, config, shared):
        super().__init__()
        self.embed_tokens = shared  # tied: the same module as model.shared
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.config = config

    # packed: (N, C), the rows of mask's real tokens only
    def embed(self, ids, mask, past=0, packed=False):
        B, T = ids.shape
        pos = positions(mask, T, past, ids.device)
        if int(pos.max()) + 2 >= self.embed_positions.num_embeddings:
            raise ValueError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}: truncate the input"
            )
        x = self.embed_tokens(ids) * self.scale + self.embed_positions(pos + 2)  # (B, T, C)
        return dropout(
            self.layernorm_embedding(x[mask] if packed else x), self.config.dropout, self.training
        )


class Encoder(Embeddings):
    def __init__(self, config, shared):
        super().__init__(config, shared)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, ids, mask, prefix=None, prefix_index=None):
        # packed: the layers see the N real tokens, not B * S (a ragged batch is 20-40% pads; HF
        # computes them)
        x = self.embed(ids, mask, packed=True)  # (N, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, prefix=layer_prefix(prefix, i), prefix_index=prefix_index)
        # (B, S, C), zeros at the pads; BART has no final encoder LayerNorm (post-LN)
        return scatter_rows(x, mask)


class Decoder(Embeddings):
    def __init__(self, config, shared):
        super().__init__(config, shared)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))

    def forward(
        self,
        ids,
        enc,
        enc_mask,
        dec_mask=None,
        self_prefix=None,
        cross_prefix=None,
        prefix_index=None,
        cache=None,
        beams=1,
    ):
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        x = self.embed(ids, dec_mask, past=past)
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                enc,
                enc_mask,
                dec_mask,
                prefix=(layer_prefix(self_prefix, i), layer_prefix(cross_prefix, i)),
                prefix_index=prefix_index,
                cache=cache[i] if cache is not None else None,
                beams=beams,
            )
        return x  # (B, T, C)


def layer_prefix(site, i):
    """One site kind's prefix, (L, 2, H, P, hd) shared or (N, L, 2, H, P, hd) bank -> layer i's
    (K, V)."""
    if site is None:
        return None
    return (site[i, 0], site[i, 1]) if site.dim() == 5 else (site[:, i, 0], site[:, i, 1])


class BARTModel(nn.Module):
    """Holds what HF calls `model.`: the shared embedding, the encoder and the decoder."""

    def __init__(self, config):
        super().__init__()
        self.shared = nn.Embedding(
            config.vocab_size, config.d_model, padding_idx=config.pad_token_id
        )
        self.encoder = Encoder(config, self.shared)
        self.decoder = Decoder(config, self.shared)


class BART(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = BARTModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.shared.weight  # tied output layer
        # a buffer, as in HF
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        # strategies.prefix() sets a module whose call returns {site: (L, 2, H, P, hd)}
        self.prefix = None
        self.apply(self._init_weights)

    # BART's init: N(0, 0.02), zero biases (only matters when training from scratch)
    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_parameters(self):  # tied weights counted once (parameters() de-duplicates)
        return sum(p.numel() for p in self.parameters())

    def resolve_prefix(self, prefix):
        """prefix=None -> the registered model.prefix (if any); a dict {site: tensor} is shared
        by the batch; (bank dict, prefix_index) mixes projects row by row. Sites: "encoder",
        "decoder", "cross"."""
        if prefix is None and self.prefix is not None:
            prefix = self.prefix()
        if prefix is None:
            return {}, None
        return prefix if isinstance(prefix, tuple) else (prefix, None)

    @staticmethod
    def prefix_bank(prefixes):
        """Per-project prefixes ({site: (L, 2, H, P, hd)}, e.g. each customized model's
        model.prefix()) -> a bank {site: (N, L, 2, H, P, hd)} for model(..., prefix=(bank,
        prefix_index)), which mixes projects row by row."""
        if any(
            sorted(p) != sorted(prefixes[0]) or any(p[s].shape != prefixes[0][s].shape for s in p)
            for p in prefixes
        ):
            raise ValueError("a prefix bank needs prefixes with the same sites and shapes")
        return {s: torch.stack([p[s].detach() for p in prefixes]) for s in prefixes[0]}

    def encode(self, input_ids, attention_mask, prefix=None):
        sites, index = self.resolve_prefix(prefix)
        return self.model.encoder(input_ids, attention_mask.bool(), sites.get("encoder"), index)

    def decode(
        self,
        decoder_input_ids,
        enc,
        attention_mask,
        prefix=None,
        cache=None,
        decoder_attention_mask=None,
        beams=1,
        logits_at=None,
    ):
        """Decoder + output layer. With beams > 1, decoder_input_ids has B*beams rows (beam-major
        within each input) while enc and attention_mask keep B rows; a prefix_index then has
        B*beams entries. logits_at: a boolean (B, T) mask: the output layer runs on those
        positions only -> (N, V) (training skips the pads)."""
        sites, index = self.resolve_prefix(prefix)
        dec_mask = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        x = self.model.decoder(
            decoder_input_ids,
            enc,
            attention_mask.bool(),
            dec_mask,
            sites.get("decoder"),
            sites.get("cross"),
            index,
            cache,
            beams,
        )
        x = x[logits_at] if logits_at is not None else x  # (B, T, C) -> (N, C)
        return self.lm_head(x) + self.final_logits_bias  # (B, T, V) or (N, V)

    def forward(
        self,
        input_ids,
        attention_mask,
        decoder_input_ids,
        prefix=None,
        decoder_attention_mask=None,
        logits_at=None,
    ):
        """input_ids (B, S), attention_mask (B, S) with 1 for real tokens, decoder_input_ids (B,
        T) starting with the decoder start token (labels shifted right) -> logits (B, T, V), or
        (N, V) at the N positions of the boolean mask logits_at (B, T)."""
        # resolve once: the prefix module's MLP (if any) runs once
        prefix = self.resolve_prefix(prefix)
        enc = self.encode(input_ids, attention_mask, prefix)
        return self.decode(
            decoder_input_ids,
            enc,
            attention_mask,
            prefix,
            None,
            decoder_attention_mask,
            logits_at=logits_at,
        )

    # -------------------------------------------------------------------------
    # generation: beam search with HF's semantics (transformers 5.x `_beam_search`), KV-cached

    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        attention_mask,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=128,
        length_penalty=1.0,
        early_stopping=True,
        prefix=None,
    ):
        """Returns (sequences (B*k, T) in HF order: batch-major, best first, starting with the
        decoder start token, padded with <pad>; scores (B*k,): sum of log-probs /
        generated_length ** length_penalty). num_beams=1 is greedy search. No forced EOS, no
        n-gram blocking; forced BOS only if the config has it."""
        cfg = self.config
        assert 1 <= num_return_sequences <= num_beams, "need 1 <= num_return_sequences <= num_beams"
        B, K, dev = input_ids.shape[0], num_beams, input_ids.device
        sites, index = self.resolve_prefix(prefix)
        # (B, S, C): shared by the K beams
        enc = self.encode(input_ids, attention_mask, prefix=(sites, index))
        cache = [dict() for _ in range(cfg.decoder_layers)]
        max_len = 1 + max_new_tokens
        run_seq = torch.full((B, K, max_len), cfg.pad_token_id, dtype=torch.long, device=dev)
        run_seq[:, :, 0] = cfg.decoder_start_token_id
        run_score = torch.zeros(B, K, device=dev)
        run_score[:, 1:] = -1e9  # all beams start identical: only the first may expand at step 1
        fin_seq, fin_score = run_seq.clone(), torch.full((B, K), -1e9, device=dev)
        fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
        fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        # inputs that are done
        out_seq, out_score, out_len = fin_seq.clone(), fin_score.clone(), fin_len.clone()
        alive = torch.arange(B, device=dev)  # the inputs still searched, by their row in the batch
        # only EOS among the best K candidates may finish a beam
        top_k = torch.arange(2 * K, device=dev) < K

        def take(x, idx):
            return torch.gather(
                x, 1, idx if x.dim() == 2 else idx[:, :, None].expand(-1, -1, x.shape[2])
            )

        for cur in range(1, max_len):
            Ba = alive.numel()
            # the last token of every running beam
            step_ids = run_seq[:, :, cur - 1].reshape(Ba * K, 1)
            # beams share it
            beams_prefix = (sites, index.repeat_interleave(K)) if index is not None else sites
            # (Ba*K, V)
            logits = self.decode(step_ids, enc, attention_mask, beams_prefix, cache, beams=K)[
                :, -1
            ].float()
            if cfg.forced_bos_token_id is not None and cur == 1:  # only <s> may come first
                logits = torch.full_like(logits, float("-inf"))
                logits[:, cfg.forced_bos_token_id] = 0.0
            # HF ranks log_softmax(logits) + beam score over all K * V candidates of an input and
            # keeps the best 2K (2K, so that K can go on after EOS). A beam's score shifts its whole
            # row, so each of those 2K is among its own row's 2K best log-probabilities: the
            # vocabulary-wide work is one log_softmax (one fused kernel; a hand-written log-sum-exp
            # is four passes and measured slower) and one top-k per row, and the ranking runs on the
            # K * 2K survivors, not on K * V sums. a row's candidates (fewer only with a vocabulary
            # under 2K)
            r = min(2 * K, logits.shape[-1])
            # (Ba*K, r)
            row_best, row_token = torch.topk(torch.log_softmax(logits, dim=-1), r, dim=-1)
            cand = row_best.view(Ba, K, r) + run_score[:, :, None]  # log-probs + beam scores
            cand_score, cand_idx = torch.topk(cand.view(Ba, K * r), 2 * K)  # (Ba, 2K), best first
            parent, token = cand_idx // r, torch.gather(row_token.view(Ba, K * r), 1, cand_idx)
            cand_seq = take(run_seq, parent)  # (Ba, 2K, max_len), a new tensor (gather)
            cand_seq[:, :, cur] = token
            ends = (token == cfg.eos_token_id) | (cur == max_len - 1)  # EOS, or out of room
            # the K best candidates that do not end keep running
            live = cand_score - 1e9 * ends.float()
            keep = torch.topk(live, K)[1]
            run_seq, run_score = take(cand_seq, keep), take(live, keep)
            # (Ba*K,) parents
            beam_idx = (take(parent, keep) + torch.arange(Ba, device=dev)[:, None] * K).view(-1)
            # the self-attention cache follows each beam's parent (gathered at the next step,
            for c in cache:
                # append_kv); ("ck", "cv") needs none: the K beams share the encoder's K/V
                c["order"] = beam_idx
            # most steps finish no beam: then the finished sets, the stopping test and `done` below
            # cannot change (an input stops only once a candidate ends or its K finished slots are
            # full), so they are skipped
            if not (ends & top_k).any() and not fin_done.all(dim=1).any():
                continue
            # the candidates that end join the K finished ones if they beat them (length-normalized
            # scores)
            full = fin_done.all(dim=1, keepdim=True) & (early_stopping is True)
            new_score = (
                cand_score / (cur**length_penalty)
                - 1e9 * (full | ~improvable | ~(ends & top_k)).float()
            )
            best = torch.topk(torch.cat([fin_score, new_score], 1), K)[1]
            fin_seq, fin_score = (
                take(torch.cat([fin_seq, cand_seq], 1), best),
                take(torch.cat([fin_score, new_score], 1), best),
            )
            fin_done = take(torch.cat([fin_done, ends & top_k], 1), best)
            fin_len = take(torch.cat([fin_len, torch.full_like(token, cur)], 1), best)
            # HF's stopping heuristic: can the best running beam still beat the worst finished one?
            length = max_len - 1 if early_stopping == "never" and length_penalty > 0 else cur
            worst = torch.where(
                fin_done, fin_score.min(dim=1, keepdim=True)[0], torch.tensor(-1e9, device=dev)
            )
            improvable = improvable & (run_score[:, :1] / length**length_penalty > worst).any(
                dim=-1, keepdim=True
            )
            # an input whose search is over (HF would keep running it and ignore the result) leaves
            # the batch
            done = (
                ~improvable[:, 0]
                | (fin_done.all(dim=1) & (early_stopping is True))
                | ends.all(dim=1)
            )
            if done.any():
                out_seq[alive[done]], out_score[alive[done]], out_len[alive[done]] = (
                    fin_seq[done],
                    fin_score[done],
                    fin_len[done],
                )
                if done.all():
                    break
                rows, beam_rows = (
                    (~done).nonzero()[:, 0],
                    (~done).repeat_interleave(K).nonzero()[:, 0],
                )
                alive, enc, attention_mask = alive[rows], enc[rows], attention_mask[rows]
                run_seq, run_score, fin_seq, fin_score = (
                    run_seq[rows],
                    run_score[rows],
                    fin_seq[rows],
                    fin_score[rows],
                )
                fin_len, fin_done, improvable = fin_len[rows], fin_done[rows], improvable[rows]
                index = index[rows] if index is not None else None
                for c in cache:
                    c["order"], c["ck"], c["cv"] = (
                        c["order"][beam_rows],
                        c["ck"][rows],
                        c["cv"][rows],
                    )
        else:  # max_new_tokens = 0: nothing ran
            out_seq[alive], out_score[alive], out_len[alive] = fin_seq, fin_score, fin_len
        n = num_return_sequences
        seqs, scores = out_seq[:, :n].reshape(B * n, max_len), out_score[:, :n].reshape(B * n)
        return seqs[:, : 1 + int(out_len[:, :n].max())], scores

    # -------------------------------------------------------------------------
    # loading and saving

    @classmethod
    def from_pretrained(cls, path, attn_impl="math", expect_vocab_size=None, trusted=False):
        """An HF directory (config.json + model.safetensors | pytorch_model.bin) or a fairseq
        checkpoint (.pt with `args` or `cfg` and `model`). `expect_vocab_size`: the tokenizer's
        size, checked against the tensors. Pickles are loaded with weights_only=True, allowing
        only argparse.Namespace (unless `trusted`)."""
        # the file formats (weights.py, docs/checkpoints.md)
        from weights import read_fairseq, read_hf_dir

        path = str(path)
        if os.path.isdir(path):
            config, sd = read_hf_dir(path)
        elif os.path.isfile(path):
            config, sd = read_fairseq(path, trusted)
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
        config.attn_impl = attn_impl
        if expect_vocab_size is not None and config.vocab_size != expect_vocab_size:
            raise ValueError(
                f"{path}: the checkpoint's vocabulary has {config.vocab_size} entries but the "
                f"tokenizer has {expect_vocab_size}; use the tokenizer that was trained with it"
            )
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v for k, v in model.state_dict().items()}
        tied = set(TIED)
        for k in expected:
            if k not in sd and k not in tied:
                raise KeyError(f"{path}: missing tensor {k!r}")
            if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape):
                raise ValueError(
                    f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected "
                    f"{tuple(expected[k].shape)} for the config read from the file"
                )
        extra = sorted(set(sd) - set(expected))
        if extra:
            raise ValueError(
                f"{path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            )
        model.load_state_dict(
            {k: sd[k] for k in expected if k not in tied}, strict=False, assign=True
        )
        model.lm_head.weight = model.model.shared.weight  # re-tie after assign
        model.model.encoder.embed_tokens = model.model.decoder.embed_tokens = model.model.shared
        return model.float().eval()

    def save_pretrained(self, out_dir):
        """config.json + model.safetensors in HF's layout (tied copies dropped), loadable by
        transformers. Written into a temporary folder that is renamed into place: never
        half-written."""
        from safetensors.torch import save_file

        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        skip = set(TIED)
        sd = {
            k: v.detach().contiguous()
            for k, v in self.state_dict().items()
            if k not in skip and not k.startswith("prefix.")
        }
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        hf = {
            **asdict(self.config),
            "model_type": "bart",
            "architectures": ["BartForConditionalGeneration"],
            "activation_function": "gelu",
            "is_encoder_decoder": True,
            "tie_word_embeddings": True,
            "forced_eos_token_id": None,
            "no_repeat_ngram_size": 0,
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        # replace an existing folder atomically enough: old -> trash, new -> place
        if os.path.isdir(out_dir):
            trash = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(out_dir, os.path.join(trash, "x"))
            os.replace(tmp, out_dir)
            import shutil

            shutil.rmtree(trash)
        else:
            os.replace(tmp, out_dir)
