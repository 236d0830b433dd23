"""Fused attention with prefix keys/values for BART (Triton), forward and backward.

Prefix tuning (paper §2.5) gives every attention layer P trainable key/value vectors that every
query sees. The plain way is to gather each row's prefix, concatenate it with the keys, build a (B,
1, Lq, P + Lk) mask and call SDPA. This kernel reads the prefix where it lies instead: no
concatenation, no mask tensor, one prefix per batch row if asked (a batch that mixes projects), and
the prefix gradient comes back already summed per prefix.

    from kernels.attention import attention
    y = attention(q, k, v, key_padding_mask=m, causal=False, prefix_k=pk, prefix_v=pv, prefix_index=ids)

Semantics (the reference is `model.attention_math`): q (B, H, Lq, D); k, v (B, H, Lk, D);
key_padding_mask (B, Lk) bool, True = real key; causal is lower-right (query i sees key j iff j <= i
+ Lk - Lq, so a KV-cached decoding step with Lq = 1 sees every key); prefix (H, P, D) shared by the
batch, or a bank (N, H, P, D) with prefix_index (B,) picking each row's entry. Prefix keys are
always visible and have no positions. A query row that sees nothing returns 0 (no NaN). Returns (B,
H, Lq, D) in q's dtype.

Algorithm (FlashAttention-2, Dao 2023, arXiv 2307.08691; the structure of Triton's tutorial 06):
  forward, one program per (query tile, b·h): keep the Q tile on chip and stream key tiles -- first the prefix
    [0, P) from pk[prefix_index[b]], then the real keys up to the last visible one -- with an online softmax in
    base 2: s = q·kᵀ·scale·log2(e); m' = max(m, rowmax s); p = 2^(s - m'); l = l·2^(m - m') + rowsum p;
    acc = acc·2^(m - m') + p·V. At the end o = acc / l and lse = m + log2(l) is saved for the backward.
    Invisible keys get s = -inf; a row with nothing visible yet uses m' = 0 so that 2^(-inf - -inf) is never
    formed. Key tiles past the last real key (right padding) or past the causal edge are skipped; only tiles
    on the causal diagonal pay for the 2-D causal mask.
  backward (no atomics, the current tutorial's choice): p = 2^(s - lse) is recomputed from the saved lse.
    (1) delta = rowsum(dO * O); (2) one program per key tile (prefix tiles and real tiles) loops over query
    tiles: dV += pᵀ·dO, dS = p * (dO·Vᵀ - delta), dK += dSᵀ·Q·scale; (3) one program per query tile loops over
    key tiles: dQ += dS·K·scale.
  prefix gradient, deterministic: a prefix tile of row b writes its dK/dV to fp32 partials (2, B, H, P, D);
    _reduce_prefix_grad then sums, for each bank entry n, the partials of the rows with prefix_index == n in
    ascending row order (a fixed order, so runs are bitwise identical; no atomics across the batch). An entry
    no row uses gets an exact zero. No buffer of size B·Lq·Lk exists anywhere.

Supported: fp32 (dot precision "ieee" by default, "tf32" on request), fp16, bf16, always
accumulating in fp32; head dims 16, 32, 64, 128; any Lq, Lk >= 1 (not only block multiples), Lq
!= Lk; any key_padding_mask pattern (right padding is the fast case); arbitrary strides (the head
dim must be contiguous, else it is copied). NaN/inf in padded keys/values never leaks: K/V loads
are masked with other=0, not only the scores. Not supported (each an assertion): fp64, other head
dims, attention dropout, a query mask (every query row is computed like the reference; callers
mask padded positions in the loss), Lq or Lk = 0. Runs on Triton 3.6 (GPU) and 3.9 (CPU
interpreter, TRITON_INTERPRET=1): plain pointer arithmetic (block pointers are gone in 3.9), no
global read in @triton.jit code, tiles chosen in Python (pick_config; no autotune), and in the
interpreter bf16 tiles are upcast to fp32 (its bf16 dot and sum are wrong, triton#11584) with the
GPU's round-to-nearest of p, dS and the outputs emulated (its own fp32 -> bf16 cast truncates).
Spec: docs/attention-kernel.md. Tests: tests/test_kernels.py and test_kernels_compile.py. GPU:
tools/gpu_check.py"""

import math
import os

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# @triton.jit kernels. Names: b row, h head, start_m/start_n first query/key of a tile, kv_len(b)
# one past the last real key of row b (Lk without a padding mask), q_offset = Lk - Lq (the causal
# diagonal's shift).


# The @triton.jit functions below are kept out of `ruff format` (# fmt: off): the ahead-of-time
# compile records (tools/compile_report.json) key on their source text, and reformatting them
# would make all 804 records stale, a recompilation of about an hour on 2 cores.
# fmt: off
@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)  # other=0: padded memory may hold NaN, and 0·NaN = NaN in p·V
    if UPCAST:  # interpreter + bf16 only: compute in fp32 there
        x = x.to(tl.float32)
    return x
# fmt: on


# fmt: off
@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Interpreter only: its fp32 -> bf16 cast
    truncates (and its "rtne" mode does not round to nearest), while GPUs round to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
# fmt: on


# fmt: off
@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round an fp32 tile (p or dS) to the input dtype for a tensor-core dot, as FlashAttention does."""
    if UPCAST:  # keep the bf16 rounding, compute in fp32
        x = _round_bf16(x)
    else:
        x = x.to(DTYPE)
    return x
# fmt: on


# fmt: off
@triton.jit
def _output(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 accumulator -> the output dtype, rounding to nearest even in the interpreter too."""
    if UPCAST:
        x = _round_bf16(x)
    return x.to(DTYPE)
# fmt: on


# fmt: off
@triton.jit
def _key_bias(MASK, offs_n, n_keys, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) validity of keys and the score bias it implies: 0 for a visible key, -inf otherwise."""
    valid = offs_n < n_keys
    if HAS_MASK:
        valid = valid & (tl.load(MASK + offs_n, mask=valid, other=0) != 0)
    return valid, tl.where(valid, 0.0, float("-inf"))
# fmt: on


# fmt: off
@triton.jit
def _kv_len(MASK, Lk, HAS_MASK: tl.constexpr):
    """One past the last real key of a row (0 if none; Lk without a mask): key tiles beyond it are skipped, which
    is what makes right padding cheap. Reads the row's mask bytes once, from L2 after the first program."""
    if HAS_MASK:
        last = tl.zeros([1024], tl.int32)
        for start in range(0, Lk, 1024):
            offs = start + tl.arange(0, 1024)
            real = tl.load(MASK + offs, mask=offs < Lk, other=0) != 0
            last = tl.maximum(last, tl.where(real, offs + 1, 0))
        n = tl.max(last, 0)
    else:
        n = Lk
    return n
# fmt: on


# fmt: off
@triton.jit
def _causal_range(start_m, kv_len, q_offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Real-key range of a query tile: [0, full_hi) is visible to every row of the tile (no causal mask),
    [full_hi, hi) crosses the causal diagonal (masked); keys >= hi are invisible to the whole tile."""
    hi = kv_len
    full_hi = kv_len
    if CAUSAL:
        hi = tl.minimum(kv_len, q_offset + start_m + BLOCK_M)  # last row of the tile sees keys < this
        full_hi = tl.maximum(q_offset + start_m + 1, 0) // BLOCK_N * BLOCK_N  # first row sees keys < q_offset+start_m+1
        full_hi = tl.minimum(full_hi, hi)
    return full_hi, hi
# fmt: on


# fmt: off
@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, stride_n, MASK, lo, hi, n_keys, offs_m, q_offset, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of one query tile with the key tiles starting in [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid, bias = _key_bias(MASK, offs_n, n_keys, HAS_MASK)
        k = _load(K + offs_n[:, None] * stride_n + offs_d[None, :], valid[:, None], UPCAST)  # (BLOCK_N, D)
        v = _load(V + offs_n[:, None] * stride_n + offs_d[None, :], valid[:, None], UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]  # (BLOCK_M, BLOCK_N)
        if CAUSAL:  # the diagonal tiles only
            s = tl.where(offs_n[None, :] <= offs_m[:, None] + q_offset, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: avoid -inf - -inf = NaN
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(_operand(p, K.dtype.element_ty, UPCAST), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i
# fmt: on


# one binary for all lengths and head counts
# fmt: off
@triton.jit(do_not_specialize=["H", "Lq", "Lk", "P", "q_offset"])  # one binary for all lengths and head counts
def _attn_fwd(Q, K, V, PK, PV, IDS, MASK, O, LSE,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_pn, stride_ph, stride_pp,
              H, Lq, Lk, P, q_offset, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_MASK: tl.constexpr, PER_ROW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]  # O shares q's strides
    q = _load(Q + q_ptrs, offs_m[:, None] < Lq, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # 1. the prefix, always visible: only its tail tile is masked (by P)
    n = tl.load(IDS + b).to(tl.int64) if PER_ROW else 0
    p_off = n * stride_pn + h * stride_ph
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, PK + p_off, PV + p_off, stride_pp, MASK, 0, P, P, offs_m, 0,
                               qk_scale, HEAD_DIM, BLOCK_N, False, False, UPCAST, PRECISION)
    # 2. the real keys: off-diagonal tiles, then (causal) the tiles crossing the diagonal
    kv_len = _kv_len(MASK + b * Lk, Lk, HAS_MASK)
    full_hi, hi = _causal_range(start_m, kv_len, q_offset, CAUSAL, BLOCK_M, BLOCK_N)
    kv_off = b * stride_kb + h * stride_kh
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K + kv_off, V + kv_off, stride_kn, MASK + b * Lk, 0, full_hi,
                               kv_len, offs_m, q_offset, qk_scale, HEAD_DIM, BLOCK_N, HAS_MASK, False, UPCAST,
                               PRECISION)
    if CAUSAL:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K + kv_off, V + kv_off, stride_kn, MASK + b * Lk, full_hi,
                                   hi, kv_len, offs_m, q_offset, qk_scale, HEAD_DIM, BLOCK_N, HAS_MASK, True,
                                   UPCAST, PRECISION)
    # epilogue (FA2's deferred normalisation): a row with nothing visible has l = 0 -> o = 0, lse = 0 (a finite
    # sentinel; the backward re-masks, so its p is 0 anyway)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(O + q_ptrs, _output(acc / l_safe[:, None], O.dtype.element_ty, UPCAST), mask=offs_m[:, None] < Lq)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, tl.where(empty, 0.0, m_i + tl.math.log2(l_safe)), mask=offs_m < Lq)
# fmt: on


# fmt: off
@triton.jit(do_not_specialize=["H", "Lq"])
def _attn_bwd_delta(O, DO, DELTA, stride_qb, stride_qh, stride_qm, H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, one value per query row."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ptrs = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(O + ptrs, mask=offs_m[:, None] < Lq, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=offs_m[:, None] < Lq, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)
# fmt: on


# fmt: off
@triton.jit
def _dkdv_tiles(dk, dv, k, v, bias, Q, DO, LSE, DELTA, stride_qm, lo, hi, offs_n, Lq, q_offset, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """Add the contributions of the query tiles starting in [lo, hi) to one key tile's dK (unscaled), dV.
    Rows past Lq load q = dO = delta = 0, so they add exactly nothing."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < Lq
        q = _load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], in_q[:, None], UPCAST)  # (BLOCK_M, D)
        do = _load(DO + offs_m[:, None] * stride_qm + offs_d[None, :], in_q[:, None], UPCAST)
        lse = tl.load(LSE + offs_m, mask=in_q, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=in_q, other=0.0)
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + bias[:, None]  # sᵀ (BLOCK_N, BLOCK_M)
        if CAUSAL:
            s = tl.where(offs_m[None, :] + q_offset >= offs_n[:, None], s, float("-inf"))
        p = tl.math.exp2(s - lse[None, :])  # pᵀ
        dv = tl.dot(_operand(p, Q.dtype.element_ty, UPCAST), do, dv, input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO·Vᵀ)ᵀ
        ds = p * (dp - delta[None, :])
        dk = tl.dot(_operand(ds, Q.dtype.element_ty, UPCAST), q, dk, input_precision=PRECISION)
    return dk, dv
# fmt: on


# one binary for all lengths and head counts
# fmt: off
@triton.jit(do_not_specialize=["H", "Lq", "Lk", "P", "q_offset"])  # one binary for all lengths and head counts
def _attn_bwd_dkdv(Q, K, V, PK, PV, IDS, MASK, DO, LSE, DELTA, DK, DV, PART,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_pn, stride_ph, stride_pp,
                   H, Lq, Lk, P, q_offset, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr, PER_ROW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Programs 0 .. cdiv(P, BLOCK_N)-1 along axis 0 own prefix tiles (fp32 partials of row b), the rest own
    real-key tiles (dK, dV written in place, zeros for padded keys)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = b * stride_qb + h * stride_qh
    lse_off = bh.to(tl.int64) * Lq
    n_prefix_tiles = tl.cdiv(P, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if tile < n_prefix_tiles:  # a prefix tile: every query row sees it, no causal mask
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n = tl.load(IDS + b).to(tl.int64) if PER_ROW else 0
        p_ptrs = n * stride_pn + h * stride_ph + offs_n[:, None] * stride_pp + offs_d[None, :]
        valid, bias = _key_bias(MASK, offs_n, P, False)
        k = _load(PK + p_ptrs, valid[:, None], UPCAST)
        v = _load(PV + p_ptrs, valid[:, None], UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, bias, Q + q_off, DO + q_off, LSE + lse_off, DELTA + lse_off, stride_qm,
                             0, Lq, offs_n, Lq, q_offset, qk_scale, HEAD_DIM, BLOCK_M, False, UPCAST, PRECISION)
        part = (bh.to(tl.int64) * P + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]  # PART (2, B, H, P, D)
        tl.store(PART + part, dk * sm_scale, mask=offs_n[:, None] < P)
        tl.store(PART + tl.num_programs(1).to(tl.int64) * P * HEAD_DIM + part, dv, mask=offs_n[:, None] < P)
    else:  # a real-key tile
        start_n = (tile - n_prefix_tiles) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_len = _kv_len(MASK + b * Lk, Lk, HAS_MASK)
        k_ptrs = b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        valid, bias = _key_bias(MASK + b * Lk, offs_n, kv_len, HAS_MASK)
        k = _load(K + k_ptrs, valid[:, None], UPCAST)
        v = _load(V + k_ptrs, valid[:, None], UPCAST)
        # query tiles [lo, mid) cross the causal diagonal (masked), [mid, hi) see the whole key tile
        lo = 0
        mid = 0
        hi = tl.where(start_n < kv_len, Lq, 0)  # a tile wholly past the last real key: nothing to do
        if CAUSAL:
            lo = tl.maximum(start_n - q_offset, 0) // BLOCK_M * BLOCK_M  # first query that sees key start_n
            mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M
            mid = tl.minimum(mid, hi)
            lo = tl.minimum(lo, mid)
        dk, dv = _dkdv_tiles(dk, dv, k, v, bias, Q + q_off, DO + q_off, LSE + lse_off, DELTA + lse_off, stride_qm,
                             lo, mid, offs_n, Lq, q_offset, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL, UPCAST, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, bias, Q + q_off, DO + q_off, LSE + lse_off, DELTA + lse_off, stride_qm,
                             mid, hi, offs_n, Lq, q_offset, qk_scale, HEAD_DIM, BLOCK_M, False, UPCAST, PRECISION)
        tl.store(DK + k_ptrs, _output(dk * sm_scale, DK.dtype.element_ty, UPCAST), mask=offs_n[:, None] < Lk)
        tl.store(DV + k_ptrs, _output(dv, DV.dtype.element_ty, UPCAST), mask=offs_n[:, None] < Lk)
# fmt: on


# fmt: off
@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_n, MASK, lo, hi, n_keys, offs_m, q_offset, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add the key tiles starting in [lo, hi) to one query tile's dQ (unscaled)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid, bias = _key_bias(MASK, offs_n, n_keys, HAS_MASK)
        k = _load(K + offs_n[:, None] * stride_n + offs_d[None, :], valid[:, None], UPCAST)
        v = _load(V + offs_n[:, None] * stride_n + offs_d[None, :], valid[:, None], UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None] + q_offset, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_operand(ds, K.dtype.element_ty, UPCAST), k, dq, input_precision=PRECISION)
    return dq
# fmt: on


# one binary for all lengths and head counts
# fmt: off
@triton.jit(do_not_specialize=["H", "Lq", "Lk", "P", "q_offset"])  # one binary for all lengths and head counts
def _attn_bwd_dq(Q, K, V, PK, PV, IDS, MASK, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_pn, stride_ph, stride_pp,
                 H, Lq, Lk, P, q_offset, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_MASK: tl.constexpr, PER_ROW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_q = offs_m < Lq
    q_ptrs = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + tl.arange(0, HEAD_DIM)[None, :]
    q = _load(Q + q_ptrs, in_q[:, None], UPCAST)
    do = _load(DO + q_ptrs, in_q[:, None], UPCAST)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n = tl.load(IDS + b).to(tl.int64) if PER_ROW else 0
    p_off = n * stride_pn + h * stride_ph
    dq = _dq_tiles(dq, q, do, lse, delta, PK + p_off, PV + p_off, stride_pp, MASK, 0, P, P, offs_m, 0, qk_scale,
                   HEAD_DIM, BLOCK_N, False, False, UPCAST, PRECISION)
    kv_len = _kv_len(MASK + b * Lk, Lk, HAS_MASK)
    full_hi, hi = _causal_range(start_m, kv_len, q_offset, CAUSAL, BLOCK_M, BLOCK_N)
    kv_off = b * stride_kb + h * stride_kh
    dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, stride_kn, MASK + b * Lk, 0, full_hi, kv_len,
                   offs_m, q_offset, qk_scale, HEAD_DIM, BLOCK_N, HAS_MASK, False, UPCAST, PRECISION)
    if CAUSAL:
        dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, stride_kn, MASK + b * Lk, full_hi, hi, kv_len,
                       offs_m, q_offset, qk_scale, HEAD_DIM, BLOCK_N, HAS_MASK, True, UPCAST, PRECISION)
    tl.store(DQ + q_ptrs, _output(dq * sm_scale, DQ.dtype.element_ty, UPCAST), mask=in_q[:, None])
# fmt: on


# fmt: off
@triton.jit(do_not_specialize=["B", "N_BANK"])
def _reduce_prefix_grad(PART, IDS, OUT, B, N_BANK, N_ELEM, PER_ROW: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK: tl.constexpr):
    """OUT[t, n] = sum of PART[t, b] over the rows b with prefix_index[b] == n, in ascending b: a fixed order, so
    the result is bitwise reproducible, and an entry no row uses is exactly zero. t = 0 keys, 1 values;
    PART (2, B, N_ELEM) fp32, OUT (2, N_BANK, N_ELEM) in the prefix dtype."""
    n = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N_ELEM
    acc = tl.zeros([BLOCK], tl.float32)
    row = PART + t * B * N_ELEM + offs  # pointer arithmetic is 64-bit: no int32 overflow
    for b in range(0, B):
        take = inside
        if PER_ROW:
            take = inside & (tl.full([BLOCK], 0, tl.int32) + tl.load(IDS + b) == n)
        acc += tl.load(row, mask=take, other=0.0)  # a masked-off row is not even read
        row += N_ELEM
    tl.store(OUT + (t * N_BANK + n) * N_ELEM + offs, _output(acc, OUT.dtype.element_ty, UPCAST), mask=inside)
# fmt: on


# -----------------------------------------------------------------------------
# launchers and the autograd.Function


# what attention() accepts
DTYPES, HEAD_DIMS = (torch.float32, torch.float16, torch.bfloat16), (16, 32, 64, 128)
# GPU tiles (BLOCK_M, BLOCK_N, warps, stages): the tutorial's, or the nearest spill-free on
# sm_90/80; not timed yet
_T16, _F32 = (
    ((128, 64, 8, 3), (32, 128, 4, 3), (128, 32, 4, 3)),
    ((64, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
)
GPU_TILES = {
    "16-bit": {
        16: _T16,
        32: _T16,
        64: ((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
        128: ((64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)),
    },
    "fp32 tf32": {
        16: _F32,
        32: ((64, 32, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2)),
        64: ((64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
        128: ((32, 32, 4, 2), (32, 32, 8, 2), (16, 32, 4, 2)),
    },
    # FMA dots: all of K in registers
    "fp32 ieee": {
        16: ((32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2)),
        32: ((32, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)),
        64: ((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
        128: ((16, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)),
    },
}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_config(D, dtype, precision="tf32"):
    """fwd/dq tile queries by BLOCK_M, keys by BLOCK_N; dkdv the reverse. The interpreter gets
    16 x 16 tiles: its cost is per tile step, whatever the tile's size."""
    kind = "fp32 " + precision if dtype == torch.float32 else "16-bit"
    return dict(
        zip(("fwd", "dkdv", "dq"), ((16, 16, 1, 1),) * 3 if _interpreting() else GPU_TILES[kind][D])
    )


def _launch_args(q, k, pk, mask, ids):
    """The arguments the three attention kernels share, in their order."""
    B, H, Lq, D = q.shape
    P = 0 if pk is None else pk[0].shape[2]
    return dict(
        # tensors after q, k, v; unused ones (no prefix, no ids, no mask) get a valid pointer they
        # never read
        tensors=(
            k if pk is None else pk[0],
            k if pk is None else pk[1],
            q if ids is None else ids,
            torch.empty(1, dtype=torch.uint8, device=q.device) if mask is None else mask,
        ),
        strides=(
            *q.stride()[:3],
            *k.stride()[:3],
            *(pk[0].stride()[:3] if pk is not None else (0, 0, 0)),
        ),
        sizes=(H, Lq, k.shape[2], P, k.shape[2] - Lq),
        flags=dict(
            HEAD_DIM=D,
            HAS_MASK=mask is not None,
            PER_ROW=ids is not None,
            UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        ),
    )


def _forward(q, k, v, pk, mask, ids, causal, scale, precision, cfg):
    B, H, Lq, D = q.shape
    a = _launch_args(q, k, pk, mask, ids)
    # same strides as q (checked by the caller): the kernel indexes both alike
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = cfg["fwd"]
    _attn_fwd[(triton.cdiv(Lq, BM), B * H)](
        q,
        k,
        v,
        *a["tensors"],
        o,
        lse,
        *a["strides"],
        *a["sizes"],
        scale * math.log2(math.e),
        BLOCK_M=BM,
        BLOCK_N=BN,
        CAUSAL=causal,
        PRECISION=precision,
        **a["flags"],
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, pk, mask, ids, n_bank, causal, scale, precision, cfg):
    B, H, Lq, D = q.shape
    Lk, P = k.shape[2], 0 if pk is None else pk[0].shape[2]
    a = _launch_args(q, k, pk, mask, ids)
    if not _same_strides(do, o):  # the kernels index q, o, dO, dQ with one set of strides
        do = torch.empty_like(o).copy_(do)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(Lq, 64), B * H)](
        o, do, delta, *q.stride()[:3], H, Lq, HEAD_DIM=D, BLOCK_M=64
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    assert _same_strides(dq, q) and _same_strides(dk, k) and _same_strides(dv, k), (
        "gradient layout mismatch"
    )
    # per-row prefix dK, dV
    part = torch.empty(2, B, H, max(P, 1), D, device=q.device, dtype=torch.float32)
    qk_scale = scale * math.log2(math.e)
    BM, BN, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(P, BN) + triton.cdiv(Lk, BN), B * H)](
        q,
        k,
        v,
        *a["tensors"],
        do,
        lse,
        delta,
        dk,
        dv,
        part,
        *a["strides"],
        *a["sizes"],
        qk_scale,
        scale,
        BLOCK_M=BM,
        BLOCK_N=BN,
        CAUSAL=causal,
        PRECISION=precision,
        **a["flags"],
        num_warps=warps,
        num_stages=stages,
    )
    BM, BN, warps, stages = cfg["dq"]
    _attn_bwd_dq[(triton.cdiv(Lq, BM), B * H)](
        q,
        k,
        v,
        *a["tensors"],
        do,
        lse,
        delta,
        dq,
        *a["strides"],
        *a["sizes"],
        qk_scale,
        scale,
        BLOCK_M=BM,
        BLOCK_N=BN,
        CAUSAL=causal,
        PRECISION=precision,
        **a["flags"],
        num_warps=warps,
        num_stages=stages,
    )
    if pk is None:
        return dq, dk, dv, None, None
    # every entry written below
    dp = torch.empty(2, n_bank, H, P, D, device=q.device, dtype=pk[0].dtype)
    if P > 0:
        _reduce_prefix_grad[(triton.cdiv(H * P * D, 1024), n_bank, 2)](
            part,
            a["tensors"][2],
            dp,
            B,
            n_bank,
            H * P * D,
            PER_ROW=ids is not None,
            UPCAST=a["flags"]["UPCAST"],
            BLOCK=1024,
        )
    return dq, dk, dv, dp[0], dp[1]


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, ids, mask, causal, scale, precision):
        # the kernels read bytes
        mask = None if mask is None else mask.contiguous().view(torch.uint8)
        prefix = None if pk is None else (pk, pv)
        cfg = pick_config(q.shape[-1], q.dtype, precision)
        o, lse = _forward(q, k, v, prefix, mask, ids, causal, scale, precision, cfg)
        ctx.save_for_backward(q, k, v, o, lse, pk, pv, mask, ids)
        ctx.args = (None if pk is None else pk.shape[0], causal, scale, precision, cfg)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, pk, pv, mask, ids = ctx.saved_tensors
        n_bank, causal, scale, precision, cfg = ctx.args
        prefix = None if pk is None else (pk, pv)
        dq, dk, dv, dpk, dpv = _backward(
            do, q, k, v, o, lse, prefix, mask, ids, n_bank, causal, scale, precision, cfg
        )
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


def _same_strides(a, b):  # strides of size-1 dims never enter an address, so they may differ
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _same_layout(a, b):
    """The kernels index a and b, and the tensors empty_like makes from them (outputs,
    gradients), with one set of strides: the head dim contiguous, no overlap or stride-0
    broadcast. Otherwise copy (documented)."""
    if _same_strides(a, b) and a.stride(-1) == 1 and _same_strides(torch.empty_like(a), a):
        return a, b
    return a.contiguous(), b.contiguous()


def attention(
    q,
    k,
    v,
    *,
    key_padding_mask=None,
    causal=False,
    prefix_k=None,
    prefix_v=None,
    prefix_index=None,
    softmax_scale=None,
    fp32_precision="ieee",
):
    """Fused attention over [prefix keys ; keys]; semantics in the module docstring.
    fp32_precision: "ieee" (exact fp32 dots, the default) or "tf32" (faster on GPU, ~1e-3
    relative error)."""
    assert q.dim() == k.dim() == v.dim() == 4, (
        f"q, k, v must be (B, H, L, D); got {q.shape}, {k.shape}, {v.shape}"
    )
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert k.shape == v.shape == (B, H, Lk, D), (
        f"k, v must be (B, H, Lk, D) = {(B, H, Lk, D)}; got {k.shape}"
    )
    assert q.dtype in DTYPES, f"dtype {q.dtype}: fp32, fp16, bf16 only"
    assert k.dtype == v.dtype == q.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert D in HEAD_DIMS, f"head dim {D} not supported {HEAD_DIMS}"
    assert Lq >= 1 and Lk >= 1, "empty query or key sequence"
    assert q.device == k.device == v.device, "q, k, v on different devices"
    assert key_padding_mask is None or key_padding_mask.device == q.device, (
        "key_padding_mask on another device"
    )
    assert q.is_cuda or _interpreting(), (
        "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    )
    assert fp32_precision in ("ieee", "tf32"), (
        f"fp32_precision {fp32_precision!r}: 'ieee' or 'tf32'"
    )
    if key_padding_mask is not None:
        assert key_padding_mask.shape == (B, Lk) and key_padding_mask.dtype == torch.bool, (
            f"key_padding_mask must be bool (B, Lk) = {(B, Lk)}; got {key_padding_mask.dtype} {key_padding_mask.shape}"
        )
    pk = pv = None
    if prefix_k is not None:
        assert prefix_v is not None and prefix_v.shape == prefix_k.shape, (
            "prefix_k and prefix_v shapes differ"
        )
        if prefix_k.dim() == 3:  # shared (H, P, D): a bank of one entry that every row uses
            # (an index is moot, as in math)
            pk, pv, prefix_index = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), None
        else:
            assert prefix_k.dim() == 4, (
                f"prefix must be (H, P, D) or (N, H, P, D); got {prefix_k.shape}"
            )
            assert prefix_index is not None and prefix_index.shape == (B,), (
                "a prefix bank needs prefix_index (B,)"
            )
            assert prefix_index.dtype in (torch.int32, torch.int64), (
                "prefix_index must be int32 or int64"
            )
            assert prefix_index.device == q.device, "prefix_index on another device"
            # on GPU a check costs a sync or extra launches: ids in [0, N) are the caller's duty
            if not q.is_cuda:
                assert (
                    0 <= int(prefix_index.min()) and int(prefix_index.max()) < prefix_k.shape[0]
                ), "prefix_index out of range"
            pk, pv = prefix_k, prefix_v
            # IDS + b: no view [::beams]; one binary
            prefix_index = prefix_index.to(torch.int64).contiguous()
        assert pk.shape[1] == H and pk.shape[3] == D, (
            f"prefix (.., H, P, D) must match H={H}, D={D}: {pk.shape}"
        )
        # under autocast q, k, v arrive in bf16 while the prefix parameters stay fp32: compute in
        # q's dtype, as autocast would for a matmul (the cast is differentiable, so the fp32
        # parameter gets its gradient)
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
        # stride 0 (expand) is fine: the prefix is only read
        if pk.stride(-1) != 1 or not _same_strides(pk, pv):
            pk, pv = pk.contiguous(), pv.contiguous()
    else:
        assert prefix_v is None and prefix_index is None, (
            "prefix_v / prefix_index given without prefix_k"
        )
    k, v = _same_layout(k, v)
    q, _ = _same_layout(q, q)
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    # 16-bit dots ignore it (tf32 = default)
    precision = fp32_precision if q.dtype == torch.float32 else "tf32"
    return _FusedAttention.apply(
        q, k, v, pk, pv, prefix_index, key_padding_mask, bool(causal), scale, precision
    )


# -----------------------------------------------------------------------------
# a quick benchmark (the full correctness + tuning + SDPA comparison is tools/gpu_check.py)

if __name__ == "__main__":
    from triton.testing import do_bench

    # CPU: TRITON_INTERPRET=1 python -m kernels.attention
    gpu = torch.cuda.is_available() and not _interpreting()
    (B, H, L, D, P), dev, dt = (
        ((8, 16, 1024, 64, 200), "cuda", torch.bfloat16)
        if gpu
        else ((1, 2, 33, 16, 7), "cpu", torch.float32)
    )
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(H, P, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    lens = torch.randint(L // 2, L + 1, (B,), device=dev)
    mask = torch.arange(L, device=dev)[None, :] < lens[:, None]  # ragged right padding

    def f():
        return attention(q, k, v, key_padding_mask=mask, prefix_k=pk, prefix_v=pv)

    # useful forward FLOPs: 2 matmuls (QKᵀ, PV) x 2 FLOPs per multiply-add x D, for every (query,
    # visible key) pair of every head; the queries of row b are its len(b) real tokens, each seeing
    # P + len(b) keys. fwd+bwd counts 3.5x the forward (FA2's convention: the backward's 5 matmuls)
    flops = 4 * D * H * (lens * (P + lens)).sum().item()
    bench = do_bench if gpu else (lambda fn: [fn(), float("nan")][1])  # CPU: run once, no timing
    ms_fwd, ms_all = bench(f), bench(lambda: f().backward(torch.ones_like(q)))
    print(
        f"{torch.cuda.get_device_name() if gpu else 'CPU interpreter'} {dt} B={B} H={H} L={L} D={D} P={P} ragged: "
        f"fwd {ms_fwd:.3f} ms {flops / ms_fwd * 1e-9:.0f} TFLOP/s; fwd+bwd {ms_all:.3f} ms "
        f"{3.5 * flops / ms_all * 1e-9:.0f} TFLOP/s"
    )
