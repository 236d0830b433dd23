"""BART, the encoder-decoder behind AthenaTest, in one file (paper §2.1 and Figure 1; §2.5 for the
prefix hook).

Reads top-down: config and presets -> the reference attention -> encoder and decoder layers -> the
model (embeddings, encoder, decoder, tied output layer) -> generation (greedy search, the reference
loop, then beam search) -> loading and saving -> the CPU speed-ups, each beside the reference it
is tested against (tests/test_model_fast_paths.py): the encoder's self-attention on the real tokens
one row at a time, dropout drawing two elements' random bits from one 32-bit draw, and `sdpa`'s
short cuts. Module and tensor names follow the HF `BartForConditionalGeneration` checkpoint, so
loading is a key-for-key copy (docs/checkpoints.md; the file readers are in weights.py).

    from model import BART
    model = BART.from_pretrained("path/to/hf_dir_or_fairseq.pt")
    logits = model(input_ids, attention_mask, decoder_input_ids)            # (B, T_dec, V)
    seqs, scores = model.generate(input_ids, attention_mask, num_beams=5, num_return_sequences=5)

serve.py mixes several customized runs of one base in a batch: `route`, an argument of forward,
encode, decode and generate, holds each row's run slot, and the model hands it, row for row, to
the modules serve.py replaced with banks (`Routed`).

Tests: `make test` (tests/test_model.py compares logits, loss, greedy and beam search with HF
transformers). Benchmark: `make bench` (python bench/bench_model.py)."""

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import TIED, read_fairseq, read_hf_dir

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
    # residual dropout
    dropout: float = 0.1
    # on attention probabilities; `math` path only (the kernel has none)
    attention_dropout: float = 0.0
    # after the GELU
    activation_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # fairseq's `</s>`-first convention; HF's shift_tokens_right does the same
    decoder_start_token_id: int = 2
    # set only for checkpoints fine-tuned with `<s>` in the targets
    forced_bos_token_id: int | None = None
    # math (readable reference) | sdpa | triton (kernels/attention.py)
    attn_impl: str = "math"


PRESETS = {
    # 406,291,456 parameters; AthenaTest's architecture
    "bart-large": dict(),
    # 139,420,416 parameters
    "bart-base": dict(
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    ),
    # the CPU preset (docs/design.md, Defaults): head dim 64 as in BART, vocabulary of the
    # byte-level BPE that data/ trains on the base projects. 7,890,944 parameters.
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
    # the shipped base's preset (checkpoints/base/): 1.5x tiny's width, four layers a side;
    # 20,106,240 parameters, 40 MB in bf16. Chosen over tiny by training throughput only, not by
    # a comparison of validation loss at a fixed budget (docs/experiments.md, "The shipped base")
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


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return BARTConfig(**{**PRESETS[name], **overrides})


def config_from_values(values, attn_impl="math"):
    """A BARTConfig from the values a checkpoint reader found (weights.py): the names BARTConfig
    has, the others ignored."""
    names = {f.name for f in fields(BARTConfig)}
    config = BARTConfig(**{k: v for k, v in values.items() if k in names})
    config.attn_impl = attn_impl
    return config


# -----------------------------------------------------------------------------
# attention: the readable reference (sdpa and the Triton kernel are in the last section)


def gather_prefix(prefix_k, prefix_v, prefix_index, B):
    """(H, P, D) shared -> expanded (B, H, P, D) view; (N, H, P, D) bank + prefix_index (B,) ->
    per-row rows."""
    if prefix_k.dim() == 3:
        return prefix_k.expand(B, *prefix_k.shape), prefix_v.expand(B, *prefix_v.shape)
    assert prefix_index is not None and prefix_index.shape == (B,), (
        "a prefix bank needs prefix_index of shape (B,)"
    )
    return prefix_k[prefix_index], prefix_v[prefix_index]


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
        lower_right = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
        visible = visible & lower_right
    if prefix_k is not None:
        # (B, H, P, D) each
        pk, pv = gather_prefix(prefix_k, prefix_v, prefix_index, B)
        # (B, H, P + Lk, D)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        always = torch.ones(B, 1, Lq, pk.shape[2], dtype=torch.bool, device=q.device)
        # (B, 1, Lq, P + Lk)
        visible = torch.cat([always, visible], dim=-1)
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
    scale = softmax_scale
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k, v, visible = with_prefix_and_mask(
        q, k, v, key_padding_mask, causal, prefix_k, prefix_v, prefix_index
    )
    # (B, H, Lq, P + Lk)
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    # rows with nothing visible get 0, not softmax(-inf) = NaN
    row_ok = visible.any(dim=-1, keepdim=True)
    a = torch.softmax(s.masked_fill(~row_ok, 0.0), dim=-1) * row_ok
    if dropout_p > 0.0:
        a = F.dropout(a, p=dropout_p)
    # (B, H, Lq, D)
    return a @ v


# -----------------------------------------------------------------------------
# serving's row routing (serve.py): the model hands each Routed module its rows' run slots


class Routed(nn.Module):
    """The base class of the modules that compute each row with its own run's weights (serve.py's
    banks). The model calls them as module(x, route): route (n,) holds the run slot of each of x's
    n rows, or is None (every row the base's)."""


def rowwise(module, x, route):
    """module(x); a Routed module also gets the slots of x's rows."""
    if isinstance(module, Routed):
        return module(x, route)
    return module(x)


def per_token(route, mask):
    """The slot of each row (B,) repeated over its positions where mask (B, T) is True -> (N,), in
    the order of x[mask]. None stays None."""
    if route is None:
        return None
    return route[:, None].expand(mask.shape)[mask]


def repeat_rows(t, n):
    """Each row n times in a row (the beams of one input are consecutive); None stays None."""
    if t is None:
        return None
    return t.repeat_interleave(n)


class Attention(nn.Module):
    """Multi-head attention with HF's q/k/v/out projection names. The caller hands it keys and
    values already projected (self-attention: from x, grown by the KV cache; cross-attention:
    from the encoder, computed once)."""

    def __init__(self, config, n_heads):
        super().__init__()
        d = config.d_model
        assert d % n_heads == 0, f"d_model {d} is not divisible by {n_heads} heads"
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.config = config

    def split_heads(self, x):
        """(B, T, C) -> (B, H, T, hd)."""
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x, route=None):
        """(B, T, C) -> k, v (B, H, T, hd)."""
        k = self.split_heads(rowwise(self.k_proj, x, route))
        v = self.split_heads(rowwise(self.v_proj, x, route))
        return k, v

    def attend(self, q, k, v, key_padding_mask=None, causal=False, prefix=None, prefix_index=None):
        """The configured implementation on heads (B, H, L, hd). prefix: this site's (K, V) or
        None; a bank's prefix_index goes with a prefix only."""
        prefix_k = None
        prefix_v = None
        if prefix is None:
            prefix_index = None
        else:
            prefix_k, prefix_v = prefix
        p = self.config.attention_dropout if self.training else 0.0
        return ATTENTION[self.config.attn_impl](
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            prefix_k=prefix_k,
            prefix_v=prefix_v,
            prefix_index=prefix_index,
            dropout_p=p,
        )

    def forward(
        self,
        x,
        k,
        v,
        key_padding_mask=None,
        causal=False,
        prefix=None,
        prefix_index=None,
        route=None,
    ):
        B, T, C = x.shape
        q = self.split_heads(rowwise(self.q_proj, x, route))
        # lower-right causal: one query (a KV-cached step) sees every key, no mask needed
        causal = causal and T > 1
        y = self.attend(q, k, v, key_padding_mask, causal, prefix, prefix_index)
        # (B, H, T, hd) -> (B, T, C)
        y = y.transpose(1, 2).reshape(B, T, C)
        return rowwise(self.out_proj, y, route)


# -----------------------------------------------------------------------------
# layers: post-LN (residual add, then LayerNorm), exact erf GELU, as fairseq's bart_large


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(config, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.config = config

    def forward(self, x, mask, prefix=None, prefix_index=None, route=None):
        """x (N, C): the batch's real tokens only (padded[mask], mask (B, S)); all but attention
        is per token. route: the run slot of each of the N tokens."""
        p = self.config.dropout
        h = packed_attention(self.self_attn, x, mask, prefix, prefix_index, route)
        x = self.self_attn_layer_norm(x + dropout(h, p, self.training))
        h = F.gelu(rowwise(self.fc1, x, route))
        h = dropout(h, self.config.activation_dropout, self.training)
        h = rowwise(self.fc2, h, route)
        return self.final_layer_norm(x + dropout(h, p, self.training))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(config, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        # cross-attention
        self.encoder_attn = Attention(config, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
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
        route=None,
    ):
        """x (B*beams, T, C) decoder states; enc (B, S, C) encoder output, shared by the `beams`
        consecutive rows of x that belong to one input (beam search); prefix = (self-attention,
        cross) K/V pairs; prefix_index and route: one entry per row of x; cache: a dict this
        layer fills ("k", "v" grow by T each call, first gathered by a pending "order"; "ck",
        "cv" are computed once)."""
        BK, T, C = x.shape
        p = self.config.dropout
        # causal self-attention; with a cache the new keys are appended to the past ones
        k, v = self.self_attn.project_kv(x, route)
        if cache is not None and "k" in cache:
            # generate() leaves "order", each row's parent beam: gathered as the new keys append
            order = cache.pop("order", None)
            k = append_kv(cache["k"], k, order)
            v = append_kv(cache["v"], v, order)
        if cache is not None:
            cache["k"] = k
            cache["v"] = v
        h = self.self_attn(
            x,
            k,
            v,
            key_padding_mask=dec_mask,
            causal=True,
            prefix=prefix[0],
            prefix_index=prefix_index,
            route=route,
        )
        x = self.self_attn_layer_norm(x + dropout(h, p, self.training))
        # cross-attention is not causal, so the beams of one input query its encoder K/V
        # together, as beams * T queries of one row: the encoder side is stored and read once per
        # input, not once per beam
        input_index = prefix_index
        if prefix_index is not None:
            input_index = prefix_index[::beams]
        input_route = route
        if route is not None:
            input_route = route[::beams]
        if cache is not None and "ck" in cache:
            ck = cache["ck"]
            cv = cache["cv"]
        else:
            # (B, H, S, hd)
            ck, cv = self.encoder_attn.project_kv(enc, input_route)
        if cache is not None:
            cache["ck"] = ck
            cache["cv"] = cv
        queries = x.reshape(BK // beams, beams * T, C)
        h = self.encoder_attn(
            queries,
            ck,
            cv,
            key_padding_mask=enc_mask,
            prefix=prefix[1],
            prefix_index=input_index,
            route=input_route,
        )
        h = h.reshape(BK, T, C)
        x = self.encoder_attn_layer_norm(x + dropout(h, p, self.training))
        h = F.gelu(rowwise(self.fc1, x, route))
        h = dropout(h, self.config.activation_dropout, self.training)
        h = rowwise(self.fc2, h, route)
        return self.final_layer_norm(x + dropout(h, p, self.training))


def append_kv(past, new, order=None):
    """cat([past[order], new], dim=2) in one copy: the past rows are gathered straight into the
    result."""
    P = past.shape[2]
    out = new.new_empty(new.shape[0], new.shape[1], P + new.shape[2], new.shape[3])
    if order is None:
        out[:, :, :P].copy_(past)
    else:
        torch.index_select(past, 0, order, out=out[:, :, :P])
    out[:, :, P:] = new
    return out


# -----------------------------------------------------------------------------
# the model


def positions(mask, T, past, device):
    """Learned-position rows. Padding-aware (fairseq's make_positions): the i-th real token gets
    position i whatever the padding side, so right- and left-padded inputs agree; left pads get
    position 0, right pads repeat the last real position (neither is ever attended)."""
    if mask is None:
        # (1, T)
        return torch.arange(past, past + T, device=device)[None, :]
    # (B, T)
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0) + past


class Embeddings(nn.Module):
    """Token embedding (shared) + learned positions (offset by 2: rows 0-1 are fairseq's unused
    padding rows), then `layernorm_embedding`, as in both the encoder and the decoder of BART."""

    def __init__(self, config, shared):
        super().__init__()
        # tied: the same module as model.shared
        self.embed_tokens = shared
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.scale = 1.0
        if config.scale_embedding:
            self.scale = math.sqrt(config.d_model)
        self.config = config

    def embed(self, ids, mask, past=0, packed=False, route=None):
        """ids (B, T) -> (B, T, C); packed: (N, C), the rows of mask's real tokens only. route:
        one slot per row of ids."""
        B, T = ids.shape
        pos = positions(mask, T, past, ids.device)
        if int(pos.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}: truncate the input"
            )
        tokens = rowwise(self.embed_tokens, ids, route)
        # (B, T, C)
        x = tokens * self.scale + rowwise(self.embed_positions, pos + 2, route)
        if packed:
            x = x[mask]
            route = per_token(route, mask)
        x = rowwise(self.layernorm_embedding, x, route)
        return dropout(x, self.config.dropout, self.training)


class Encoder(Embeddings):
    def __init__(self, config, shared):
        super().__init__(config, shared)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, ids, mask, prefix=None, prefix_index=None, route=None):
        # packed: the layers see the N real tokens, not B * S
        x = self.embed(ids, mask, packed=True, route=route)
        token_route = per_token(route, mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, layer_prefix(prefix, i), prefix_index, token_route)
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
        route=None,
    ):
        past = 0
        if cache and "k" in cache[0]:
            past = cache[0]["k"].shape[2]
        x = self.embed(ids, dec_mask, past=past, route=route)
        for i, layer in enumerate(self.layers):
            layer_cache = None
            if cache is not None:
                layer_cache = cache[i]
            x = layer(
                x,
                enc,
                enc_mask,
                dec_mask,
                prefix=(layer_prefix(self_prefix, i), layer_prefix(cross_prefix, i)),
                prefix_index=prefix_index,
                cache=layer_cache,
                beams=beams,
                route=route,
            )
        # (B, T, C)
        return x


def layer_prefix(site, i):
    """One site kind's prefix, (L, 2, H, P, hd) shared or (N, L, 2, H, P, hd) bank -> layer i's
    (K, V)."""
    if site is None:
        return None
    if site.dim() == 5:
        return site[i, 0], site[i, 1]
    return site[:, i, 0], site[:, i, 1]


def scatter_rows(x, where):
    """(N, ...) rows of the real tokens -> (B, S, ...) with zeros at the pads; where (B, S) bool,
    N True entries."""
    out = x.new_zeros(*where.shape, *x.shape[1:])
    out[where] = x
    return out


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
        # tied output layer
        self.lm_head.weight = self.model.shared.weight
        # a buffer, as in HF
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        # strategies.prefix() sets a module whose call returns {site: (L, 2, H, P, hd)}
        self.prefix = None
        self.apply(self._init_weights)

    def _init_weights(self, m):
        """BART's init: N(0, 0.02), zero biases (only matters when training from scratch)."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_parameters(self):
        """Tied weights counted once (parameters() de-duplicates)."""
        return sum(p.numel() for p in self.parameters())

    def resolve_prefix(self, prefix):
        """prefix=None -> the registered model.prefix (if any); a dict {site: tensor} is shared
        by the batch; (bank dict, prefix_index) mixes projects row by row, prefix_index (B,)
        picking each row's entry of the bank. Sites: "encoder", "decoder", "cross". ->
        (sites, prefix_index or None)."""
        if prefix is None and self.prefix is not None:
            prefix = self.prefix()
        if prefix is None:
            return {}, None
        if isinstance(prefix, tuple):
            return prefix
        return prefix, None

    @staticmethod
    def prefix_bank(prefixes):
        """Per-project prefixes ({site: (L, 2, H, P, hd)}, e.g. each customized model's
        model.prefix()) -> a bank {site: (N, L, 2, H, P, hd)} for model(..., prefix=(bank,
        prefix_index)), which mixes projects row by row."""
        first = prefixes[0]
        for p in prefixes:
            same_sites = sorted(p) == sorted(first)
            if not same_sites or any(p[s].shape != first[s].shape for s in p):
                raise ValueError("a prefix bank needs prefixes with the same sites and shapes")
        return {s: torch.stack([p[s].detach() for p in prefixes]) for s in first}

    def encode(self, input_ids, attention_mask, prefix=None, route=None):
        """-> (B, S, C). route: the run slot of each input (serve.py), or None."""
        sites, index = self.resolve_prefix(prefix)
        mask = attention_mask.bool()
        return self.model.encoder(input_ids, mask, sites.get("encoder"), index, route)

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
        route=None,
    ):
        """Decoder + output layer. With beams > 1, decoder_input_ids has B*beams rows (beam-major
        within each input) while enc and attention_mask keep B rows; a prefix_index and route
        then have B*beams entries. logits_at: a boolean (B, T) mask: the output layer runs on
        those positions only -> (N, V) (training skips the pads)."""
        sites, index = self.resolve_prefix(prefix)
        dec_mask = None
        if decoder_attention_mask is not None:
            dec_mask = decoder_attention_mask.bool()
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
            route,
        )
        if logits_at is not None:
            # (B, T, C) -> (N, C)
            x = x[logits_at]
            route = per_token(route, logits_at)
        # (B, T, V) or (N, V)
        return rowwise(self.lm_head, x, route) + self.final_logits_bias

    def forward(
        self,
        input_ids,
        attention_mask,
        decoder_input_ids,
        prefix=None,
        decoder_attention_mask=None,
        logits_at=None,
        route=None,
    ):
        """input_ids (B, S), attention_mask (B, S) with 1 for real tokens, decoder_input_ids (B,
        T) starting with the decoder start token (labels shifted right) -> logits (B, T, V), or
        (N, V) at the N positions of the boolean mask logits_at (B, T). route (B,): each row's
        run slot (serve.py)."""
        # resolve once: the prefix module's MLP (if any) runs once
        prefix = self.resolve_prefix(prefix)
        enc = self.encode(input_ids, attention_mask, prefix, route)
        return self.decode(
            decoder_input_ids,
            enc,
            attention_mask,
            prefix,
            None,
            decoder_attention_mask,
            logits_at=logits_at,
            route=route,
        )

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
        route=None,
    ):
        """Returns (sequences (B*k, T) in HF order: batch-major, best first, starting with the
        decoder start token, padded with <pad>; scores (B*k,): sum of log-probs /
        generated_length ** length_penalty). num_beams=1 is greedy search. No forced EOS, no
        n-gram blocking; forced BOS only if the config has it. route (B,): each input's run slot
        (serve.py)."""
        assert 1 <= num_return_sequences <= num_beams, "need 1 <= num_return_sequences <= num_beams"
        # one beam is greedy search, except under HF's "never" with a positive length penalty:
        # its stopping test lets a single beam go on past its </s> in search of a better score
        one_beam_stops_at_eos = not (early_stopping == "never" and length_penalty > 0)
        if num_beams == 1 and one_beam_stops_at_eos:
            return greedy(
                self, input_ids, attention_mask, max_new_tokens, length_penalty, prefix, route
            )
        return beam_search(
            self,
            input_ids,
            attention_mask,
            num_beams,
            num_return_sequences,
            max_new_tokens,
            length_penalty,
            early_stopping,
            prefix,
            route,
        )

    # -------------------------------------------------------------------------
    # loading and saving

    @classmethod
    def from_pretrained(cls, path, attn_impl="math", expect_vocab_size=None, trusted=False):
        """An HF directory (config.json + model.safetensors | pytorch_model.bin) or a fairseq
        checkpoint (.pt with `args` or `cfg` and `model`). `expect_vocab_size`: the tokenizer's
        size, checked against the tensors. Pickles are loaded with weights_only=True, allowing
        only argparse.Namespace (unless `trusted`)."""
        path = str(path)
        # the file formats: weights.py, docs/checkpoints.md
        if os.path.isdir(path):
            values, sd = read_hf_dir(path)
        elif os.path.isfile(path):
            values, sd = read_fairseq(path, trusted)
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
        config = config_from_values(values, attn_impl)
        if expect_vocab_size is not None and config.vocab_size != expect_vocab_size:
            raise ValueError(
                f"{path}: the checkpoint's vocabulary has {config.vocab_size} entries but the "
                f"tokenizer has {expect_vocab_size}; use the tokenizer that was trained with it"
            )
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        check_tensors(path, sd, expected)
        tensors = {k: sd[k] for k in expected if k not in TIED}
        model.load_state_dict(tensors, strict=False, assign=True)
        # re-tie after assign
        model.lm_head.weight = model.model.shared.weight
        model.model.encoder.embed_tokens = model.model.shared
        model.model.decoder.embed_tokens = model.model.shared
        return model.float().eval()

    def save_pretrained(self, out_dir):
        """config.json + model.safetensors in HF's layout (tied copies dropped), loadable by
        transformers. Written into a temporary folder that is renamed into place: never
        half-written."""
        from safetensors.torch import save_file

        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        sd = {}
        for k, v in self.state_dict().items():
            if k in TIED or k.startswith("prefix."):
                continue
            sd[k] = v.detach().contiguous()
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
        if not os.path.isdir(out_dir):
            os.replace(tmp, out_dir)
            return
        # replace an existing folder atomically enough: old -> trash, new -> place
        trash = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(out_dir, os.path.join(trash, "x"))
        os.replace(tmp, out_dir)
        shutil.rmtree(trash)


def check_tensors(path, sd, expected):
    """The file's tensors against the model's: every one there (tied copies may be absent), of
    the same shape, and no other."""
    for k in expected:
        if k not in sd and k not in TIED:
            raise KeyError(f"{path}: missing tensor {k!r}")
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected "
                f"{tuple(expected[k].shape)} for the config read from the file"
            )
    extra = sorted(set(sd) - set(expected))
    if extra:
        more = ""
        if len(extra) > 5:
            more = " ..."
        raise ValueError(f"{path}: unexpected tensors {extra[:5]}{more}")


# -----------------------------------------------------------------------------
# generation: greedy search, then beam search with HF's semantics (transformers 5.x
# `_beam_search`), both KV-cached


@dataclass
class Encoded:
    """What every decoding step reads besides the new tokens, for the inputs still decoded: the
    encoder output (B, S, C) and mask, the prefix sites with the bank's index (B,), the run slot
    of each input (B,) and the decoder's KV cache (one dict per layer)."""

    enc: torch.Tensor
    mask: torch.Tensor
    sites: dict
    index: torch.Tensor | None
    route: torch.Tensor | None
    cache: list

    def keep(self, rows, beams=1):
        """Only the inputs at `rows` go on (each with its `beams` rows in the self-attention
        cache, whose pending "order" is then taken at those rows)."""
        offsets = torch.arange(beams, device=rows.device)
        beam_rows = (rows[:, None] * beams + offsets).view(-1)
        self.enc = self.enc[rows]
        self.mask = self.mask[rows]
        if self.index is not None:
            self.index = self.index[rows]
        if self.route is not None:
            self.route = self.route[rows]
        for c in self.cache:
            # the beams' parents of this step; greedy search leaves none
            order = c.get("order")
            if order is None:
                c["order"] = beam_rows
            else:
                c["order"] = order[beam_rows]
            c["ck"] = c["ck"][rows]
            c["cv"] = c["cv"][rows]


def encode_inputs(model, input_ids, attention_mask, prefix, route):
    """Runs the encoder once for a search: -> its Encoded, with an empty KV cache."""
    sites, index = model.resolve_prefix(prefix)
    enc = model.encode(input_ids, attention_mask, (sites, index), route)
    cache = [dict() for _ in range(model.config.decoder_layers)]
    return Encoded(enc, attention_mask, sites, index, route, cache)


def next_log_probs(model, encoded, tokens, cur, beams=1):
    """One KV-cached decoder step: log-probabilities (n, V) of the token after `tokens` (n, 1),
    n = inputs * beams; step `cur` (1 = the first generated token)."""
    index = repeat_rows(encoded.index, beams)
    route = repeat_rows(encoded.route, beams)
    logits = model.decode(
        tokens,
        encoded.enc,
        encoded.mask,
        (encoded.sites, index),
        encoded.cache,
        beams=beams,
        route=route,
    )
    logits = logits[:, -1].float()
    forced = model.config.forced_bos_token_id
    if forced is not None and cur == 1:
        # only <s> may come first
        logits = torch.full_like(logits, float("-inf"))
        logits[:, forced] = 0.0
    return torch.log_softmax(logits, dim=-1)


@torch.inference_mode()
def greedy(
    model,
    input_ids,
    attention_mask,
    max_new_tokens=128,
    length_penalty=1.0,
    prefix=None,
    route=None,
):
    """Greedy search, the reference loop: each step appends every running input's most likely
    token; an input stops at </s> or at the length limit and leaves the batch. -> (sequences
    (B, T): the decoder start token, the tokens, then pads; scores (B,): the summed
    log-probabilities / length ** length_penalty, -1e9 when nothing was generated)."""
    cfg = model.config
    B = input_ids.shape[0]
    dev = input_ids.device
    max_len = 1 + max_new_tokens
    encoded = encode_inputs(model, input_ids, attention_mask, prefix, route)
    seqs = torch.full((B, max_len), cfg.pad_token_id, dtype=torch.long, device=dev)
    seqs[:, 0] = cfg.decoder_start_token_id
    scores = torch.full((B,), -1e9, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    # the inputs still running, by their row in the batch, and their summed log-probabilities
    alive = torch.arange(B, device=dev)
    total = torch.zeros(B, device=dev)
    for cur in range(1, max_len):
        logp = next_log_probs(model, encoded, seqs[alive, cur - 1 : cur], cur)
        best, token = logp.max(dim=-1)
        total = total + best
        seqs[alive, cur] = token
        ended = (token == cfg.eos_token_id) | (cur == max_len - 1)
        scores[alive[ended]] = total[ended] / cur**length_penalty
        lengths[alive[ended]] = cur
        if ended.all():
            break
        if ended.any():
            running = (~ended).nonzero()[:, 0]
            alive = alive[running]
            total = total[running]
            encoded.keep(running)
    return seqs[:, : 1 + int(lengths.max())], scores


def take(x, idx):
    """x (n, m) or (n, m, T) -> the entries idx (n, j) of each row: (n, j) or (n, j, T)."""
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))


@dataclass
class Candidates:
    """The 2K best continuations of each input at one step, best first (beam search)."""

    # (Ba, 2K, max_len) the sequences, the new token included
    seq: torch.Tensor
    # (Ba, 2K) summed log-probabilities
    score: torch.Tensor
    # (Ba, 2K) the new tokens
    token: torch.Tensor
    # (Ba, 2K) bool: ends here (</s>, or out of room)
    ends: torch.Tensor
    # (Ba, 2K) bool: ends and is among the best K, so may join the finished beams
    finishing: torch.Tensor


@dataclass
class BeamState:
    """Beam search's state of the inputs still searched, one row each: K running beams and the K
    best finished ones."""

    # (Ba,) each input's row in the batch
    alive: torch.Tensor
    # (Ba, K, max_len) the running beams
    seq: torch.Tensor
    # (Ba, K) their summed log-probabilities
    score: torch.Tensor
    # (Ba, K, max_len) the finished beams
    fin_seq: torch.Tensor
    # (Ba, K) their length-normalised scores (-1e9: an empty slot)
    fin_score: torch.Tensor
    # (Ba, K) their generated lengths
    fin_len: torch.Tensor
    # (Ba, K) bool: the slot holds a finished beam
    fin_done: torch.Tensor
    # (Ba, 1) bool: a running beam may still beat the worst finished one
    improvable: torch.Tensor

    @classmethod
    def start(cls, B, K, max_len, cfg, dev):
        seq = torch.full((B, K, max_len), cfg.pad_token_id, dtype=torch.long, device=dev)
        seq[:, :, 0] = cfg.decoder_start_token_id
        score = torch.zeros(B, K, device=dev)
        # all beams start identical: only the first may expand at step 1
        score[:, 1:] = -1e9
        return cls(
            alive=torch.arange(B, device=dev),
            seq=seq,
            score=score,
            fin_seq=seq.clone(),
            fin_score=torch.full((B, K), -1e9, device=dev),
            fin_len=torch.zeros(B, K, dtype=torch.long, device=dev),
            fin_done=torch.zeros(B, K, dtype=torch.bool, device=dev),
            improvable=torch.ones(B, 1, dtype=torch.bool, device=dev),
        )

    def keep(self, rows):
        """Only the inputs at `rows` go on."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[rows])

    def expand(self, logp, cur, eos, max_len):
        """Ranks the continuations of the running beams, logp (Ba*K, V), and keeps the K best
        that do not end as the running beams. -> (the 2K best candidates, each new running
        beam's parent row among the Ba*K)."""
        Ba, K = self.score.shape
        # HF ranks log_softmax(logits) + beam score over all K * V candidates of an input and
        # keeps the best 2K (2K, so that K can go on after EOS). A beam's score shifts its whole
        # row, so each of those 2K is among its own row's 2K best log-probabilities: one top-k
        # per row, then the ranking runs on the K * 2K survivors, not on K * V sums. A row has
        # fewer candidates only with a vocabulary under 2K.
        r = min(2 * K, logp.shape[-1])
        # (Ba*K, r)
        row_best, row_token = torch.topk(logp, r, dim=-1)
        # log-probs + beam scores
        cand = row_best.view(Ba, K, r) + self.score[:, :, None]
        # (Ba, 2K), best first
        cand_score, cand_idx = torch.topk(cand.view(Ba, K * r), 2 * K)
        parent = cand_idx // r
        token = torch.gather(row_token.view(Ba, K * r), 1, cand_idx)
        # (Ba, 2K, max_len), a new tensor (gather)
        cand_seq = take(self.seq, parent)
        cand_seq[:, :, cur] = token
        ends = (token == eos) | (cur == max_len - 1)
        # only EOS among the best K candidates may finish a beam
        top_k = torch.arange(2 * K, device=logp.device) < K
        # the K best candidates that do not end keep running
        live = cand_score - 1e9 * ends.float()
        keep = torch.topk(live, K)[1]
        self.seq = take(cand_seq, keep)
        self.score = take(live, keep)
        offsets = torch.arange(Ba, device=logp.device)[:, None] * K
        order = (take(parent, keep) + offsets).view(-1)
        return Candidates(cand_seq, cand_score, token, ends, ends & top_k), order

    def finish(self, cand, cur, length_penalty, early_stopping, max_len):
        """The candidates that end join the K finished beams if they beat them (length-normalised
        scores); then HF's stopping test. -> (Ba,) bool: the inputs whose search is over."""
        K = self.fin_score.shape[1]
        # early_stopping=True: an input with K finished beams takes no more
        full = self.fin_done.all(dim=1, keepdim=True) & (early_stopping is True)
        barred = full | ~self.improvable | ~cand.finishing
        new_score = cand.score / (cur**length_penalty) - 1e9 * barred.float()
        pool_score = torch.cat([self.fin_score, new_score], 1)
        best = torch.topk(pool_score, K)[1]
        self.fin_seq = take(torch.cat([self.fin_seq, cand.seq], 1), best)
        self.fin_score = take(pool_score, best)
        self.fin_done = take(torch.cat([self.fin_done, cand.finishing], 1), best)
        new_len = torch.full_like(cand.token, cur)
        self.fin_len = take(torch.cat([self.fin_len, new_len], 1), best)
        # HF's stopping heuristic: can the best running beam still beat the worst finished one?
        length = cur
        if early_stopping == "never" and length_penalty > 0:
            length = max_len - 1
        none_yet = torch.tensor(-1e9, device=self.fin_score.device)
        worst = torch.where(self.fin_done, self.fin_score.min(dim=1, keepdim=True)[0], none_yet)
        best_running = self.score[:, :1] / length**length_penalty
        can_beat = (best_running > worst).any(dim=-1, keepdim=True)
        self.improvable = self.improvable & can_beat
        all_finished = self.fin_done.all(dim=1) & (early_stopping is True)
        return ~self.improvable[:, 0] | all_finished | cand.ends.all(dim=1)


@torch.inference_mode()
def beam_search(
    model,
    input_ids,
    attention_mask,
    num_beams=5,
    num_return_sequences=5,
    max_new_tokens=128,
    length_penalty=1.0,
    early_stopping=True,
    prefix=None,
    route=None,
):
    """BART.generate's beam search (its docstring has the arguments and the output)."""
    cfg = model.config
    K = num_beams
    B = input_ids.shape[0]
    max_len = 1 + max_new_tokens
    encoded = encode_inputs(model, input_ids, attention_mask, prefix, route)
    state = BeamState.start(B, K, max_len, cfg, input_ids.device)
    # the results by the inputs' rows in the batch, written as each input's search ends
    out_seq = state.fin_seq.clone()
    out_score = state.fin_score.clone()
    out_len = state.fin_len.clone()
    for cur in range(1, max_len):
        Ba = state.alive.numel()
        # the last token of every running beam
        tokens = state.seq[:, :, cur - 1].reshape(Ba * K, 1)
        logp = next_log_probs(model, encoded, tokens, cur, K)
        cand, order = state.expand(logp, cur, cfg.eos_token_id, max_len)
        # the self-attention cache follows each beam's parent (gathered as the next step
        # appends its keys); the cross-attention K/V need none: the K beams share them
        for c in encoded.cache:
            c["order"] = order
        # most steps finish no beam: then the finished sets and the stopping test cannot change
        # (an input stops only once a candidate ends or its K finished slots are full)
        if not cand.finishing.any() and not state.fin_done.all(dim=1).any():
            continue
        done = state.finish(cand, cur, length_penalty, early_stopping, max_len)
        if not done.any():
            continue
        # an input whose search is over leaves the batch (HF would keep running it and ignore
        # the result)
        rows = state.alive[done]
        out_seq[rows] = state.fin_seq[done]
        out_score[rows] = state.fin_score[done]
        out_len[rows] = state.fin_len[done]
        if done.all():
            break
        running = (~done).nonzero()[:, 0]
        state.keep(running)
        encoded.keep(running, K)
    n = num_return_sequences
    seqs = out_seq[:, :n].reshape(B * n, max_len)
    scores = out_score[:, :n].reshape(B * n)
    length = 1 + int(out_len[:, :n].max())
    return seqs[:, :length], scores


# -----------------------------------------------------------------------------
# CPU speed-ups, each beside the reference it is tested against (tests/test_model_fast_paths.py)
#
# 1. The encoder's self-attention on packed tokens. The encoder's layers take the real tokens
#    only (N, C); the reference puts them back in padded rows for one masked call, which a GPU
#    runs; on a CPU one unmasked call per row (FlashAttention's varlen, as a loop) computes no
#    pad. Both against HF's padded encoder and against each other.

# where the encoder's self-attention runs one call per row
VARLEN_DEVICES = {"cpu"}


def packed_attention(attn, x, mask, prefix=None, prefix_index=None, route=None):
    """The encoder's self-attention (attn: its Attention) on the real tokens only: x (N, C) =
    padded[mask], mask (B, S) -> (N, C). route: the run slot of each of the N tokens."""
    q = rowwise(attn.q_proj, x, route)
    k = rowwise(attn.k_proj, x, route)
    v = rowwise(attn.v_proj, x, route)
    if x.device.type in VARLEN_DEVICES:
        y = attention_row_by_row(attn, q, k, v, mask, prefix, prefix_index)
    else:
        y = attention_padded(attn, q, k, v, mask, prefix, prefix_index)
    return rowwise(attn.out_proj, y, route)


def attention_padded(attn, q, k, v, mask, prefix, prefix_index):
    """The reference: q, k, v (N, C) back to (B, H, S, hd), one masked call -> (N, C)."""
    q = attn.split_heads(scatter_rows(q, mask))
    k = attn.split_heads(scatter_rows(k, mask))
    v = attn.split_heads(scatter_rows(v, mask))
    y = attn.attend(q, k, v, key_padding_mask=mask, prefix=prefix, prefix_index=prefix_index)
    # (B, S, H, hd)[mask] -> (N, H, hd) -> (N, C)
    return y.transpose(1, 2)[mask].flatten(1)


def attention_row_by_row(attn, q, k, v, mask, prefix, prefix_index):
    """The fast path: one unmasked call per row on its own tokens -> (N, C)."""
    lengths = mask.sum(1).tolist()

    def heads(t):
        # (N, C) -> (H, n_i, hd) for each row i
        t = t.view(-1, attn.n_heads, attn.head_dim).transpose(0, 1)
        return t.split(lengths, dim=1)

    rows = zip(heads(q), heads(k), heads(v))
    y = []
    for i, (q_i, k_i, v_i) in enumerate(rows):
        index_i = None
        if prefix_index is not None:
            index_i = prefix_index[i : i + 1]
        y_i = attn.attend(q_i[None], k_i[None], v_i[None], prefix=prefix, prefix_index=index_i)
        y.append(y_i[0])
    # (H, N, hd) -> (N, C)
    return torch.cat(y, dim=1).transpose(0, 1).flatten(1)


# 2. Dropout. The reference is F.dropout (used in eval mode, at p = 0 and off the CPU). On a CPU
#    torch's generator is a serial Mersenne twister and F.dropout's Bernoulli mask draws one
#    number an element; here one 32-bit draw makes two 15-bit fields, and an element is dropped
#    when its field < round(p * 32768) (p to 1/32768: 0.1 -> 0.100006), the rest scaled by
#    1 / (1 - that p).


def dropout(x, p, training):
    if not training or not 0.0 < p < 1.0 or x.device.type != "cpu":
        return F.dropout(x, p=p, training=training)
    cut = round(p * 32768)
    n = x.numel()
    # random_() fills 31 bits of each int32: two int16 halves, 15 random low bits each
    draws = torch.empty((n + 1) // 2, dtype=torch.int32).random_()
    bits = draws.view(torch.int16)[:n].view(x.shape)
    keep = (bits & 0x7FFF) >= cut
    return x * (keep.to(x.dtype) * (32768 / (32768 - cut)))


# 3. PyTorch's fused attention, against attention_math (above) in float64. Without a prefix,
#    padding alone goes in as a (B, 1, 1, Lk) mask and causal alone (Lq = Lk) as is_causal, so
#    the kernel skips the masked blocks; else the concatenated prefix + keys, full mask.


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
    kw = dict(dropout_p=dropout_p, scale=softmax_scale)
    if prefix_k is None and not causal:
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        # (B, 1, 1, 1): a row with no real key gives 0
        row_ok = key_padding_mask.any(dim=-1)[:, None, None, None]
        attn_mask = key_padding_mask[:, None, None, :] | ~row_ok
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw) * row_ok
    # upper-left = lower-right here
    if prefix_k is None and key_padding_mask is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    k, v, visible = with_prefix_and_mask(
        q, k, v, key_padding_mask, causal, prefix_k, prefix_v, prefix_index
    )
    # fully masked rows: unmask them, then zero the output
    row_ok = visible.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~row_ok, **kw) * row_ok


# The Triton kernel (kernels/attention.py, tested against attention_math in tests/test_kernels.py)
# and the table Attention reads its implementation from.


def attention_triton(q, k, v, dropout_p=0.0, **kw):
    assert dropout_p == 0.0, "attn_impl='triton' has no attention dropout: set attention_dropout=0"
    # imported lazily: Triton is not needed for math/sdpa
    from kernels.attention import attention

    return attention(q, k, v, **kw)


ATTENTION = {"math": attention_math, "sdpa": attention_sdpa, "triton": attention_triton}
