"""Triton kernels of attention over a learned prefix and the real keys, forward and backward (oracle:
fastpeft/reference/attention.py), and their launchers. The forward is described here; the backward (dK/dV and
dQ kernels, FlashAttention-2 style) below, before its kernels.

    O = softmax(Q [P_K; K]ᵀ · scale + [0; M]) [P_V; V],     LSE_i = log Σ_j exp(scale · q_i·k_j + M_ij)
                                                                 (visible j; M_ij = 0 on the prefix and without a bias)

One program owns BLOCK_M query rows of one (batch, head) and keeps, per row, the running maximum m_i, the running
sum l_i and a float32 (BLOCK_M x BLOCK_D) accumulator (online softmax, flash-attention style). It walks two key
sources one after the other, never concatenating them:

* the prefix P_K, P_V (B_p, H_kv, P, D), B_p = 1 (read with batch stride 0) or B: BLOCK_N keys a tile, every key
  visible to every query. With per-row ranges (constexpr PREFIX_ROWS; prefix_offsets, prefix_lengths (B,) int32,
  e.g. adapters' prefixes packed along P) batch row b walks only the keys [off_b, off_b + len_b), off_b clamped
  into [0, P] and len_b into [0, P − off_b] (`_prefix_range`: no input reads outside the prefix); else [0, P);
* the real keys K, V (B, H_kv, L_k, D): key j is visible to query i iff j <= query_offset + i (with `causal`),
  key_padding_mask[b, j] != 0 and attn_mask[b, h, i, j] allows it (when given). With `causal` the loop stops
  after the block's last visible key (query_offset + the block's last row), so tiles wholly in the future are
  never read. attn_mask is read through four strides (0 on its broadcast dimensions: never expanded in memory),
  chosen by the constexpr MASK_KIND: 0 none (the code of the unmasked kernel), 1 bool read as uint8 (nonzero =
  visible), 2 an additive bias M in natural-log units (values below −1e38 hide the key), added as M · log₂e.

For each tile of scores s = ((q · kᵀ) · scale + M) · log₂e (base-2 exponents: exp2 is the fast instruction)
    m' = max(m, rowmax s),  p = 2^(s − m'),  l = l · 2^(m − m') + Σ p,  acc = acc · 2^(m − m') + p V
(with m' = −∞, a row with nothing visible yet, replaced by 0 so that no ∞ − ∞ appears). At the end
O = acc / l and LSE = (m + log₂ l) · ln 2, the natural log-sum-exp of the scaled scores, kept for the backward
pass; a row with no visible key (possible only with P = 0) gets O = 0 and LSE = +∞ (so exp(s − LSE) = 0 there).
Query head h reads key/value head h // GROUP (grouped-query attention; GROUP = H / H_kv). The head dimension D
(64, 80, 96 or 128) is padded to BLOCK_D, the next power of two, with masked loads. Accumulation is float32; the
probabilities are cast to the input dtype for the tensor-core dot with V (float32 inputs: tf32 or ieee, following
torch's float32 matmul setting). For L_q <= 16 (a decode step over a KV cache) the query block is 16 rows (the
least tl.dot takes) instead of 64 or 128.

Decode (L_q <= 16, GROUP · L_q <= 64) has its own split-K ("flash-decoding") forward, below the forward kernel:
one program per (batch, kv head, chunk of the key tiles) packs the GROUP query heads × L_q rows into its tile (each
K/V tile read once per group) and writes its chunk's partial (O_s, m_s, l_s); a combine kernel merges the chunks
exactly, O = Σ_s e^{m_s − m} l_s O_s / Σ_s e^{m_s − m} l_s with m = max_s m_s, and LSE = m + log Σ_s e^{m_s − m} l_s.
With per-row prefix ranges each row splits its own tiles (its range's, then the real keys') across the programs.
"""
from __future__ import annotations

import torch

from ._compat import dot_precision, interpreting, launch, tl, triton
from ._tiles import EPILOGUE_ROOM, SHARED_PER_BLOCK, bucket, fit_shared, shared_budget
from .limits import ATTENTION_DECODE_MAX_ROWS, ATTENTION_HEAD_DIMS

LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------------------
# Autotune configurations: (BLOCK_M, BLOCK_N, warps, stages), by the target's register use; pruned per launch by the
# query length and by the shared memory that the pipelined K and V tiles take.
# ----------------------------------------------------------------------------------------------------------

# The forward's tiles by (tensor-core operands in shared memory, BLOCK_D <= 64): those that compile without spilling
# (ptxas, bf16/fp16) in every variant (causal, padding mask, per-row prefixes, bool or float attn_mask); the second
# table adds tiles that fit only without an attn_mask (whose tile, staged per key block, takes registers too). The
# float32 accumulator (BLOCK_M x BLOCK_D), the scores and probabilities (BLOCK_M x BLOCK_N) are what the registers
# hold. sm_90 (wgmma reads Q, K, V from shared memory): 128x128 w8 spills 56-184 B at head dim 128 and 96-168 B with
# an attn_mask at 64; 64x128 w4 160-592 B with one; 64x64 w4 24 B with a bias at 128. sm_80 (mma.sync: each warp
# loads its operand fragments into registers): at head dim 128 the 4-warp 64-row blocks sit at 255 registers (64x32
# capped by ptxas at 168 registers for occupancy, 16 B spilled) and 128x64 / 128x128 w8 spill 44-72 B, while 64-row
# blocks on 8 warps take 160-176; at 64, 128x32 w8 is capped at 128 registers (8-16 B spilled).
_FWD_SHAPES = {
    (True, True): [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
    (True, False): [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
    (False, True): [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
    (False, False): [(64, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2), (128, 32, 8, 3)],
}
_FWD_SHAPES_UNMASKED = {
    (True, True): [(64, 128, 4, 3), (128, 128, 8, 3)],
    (True, False): [(64, 64, 4, 3)],
    (False, True): [(128, 128, 8, 3)],
    (False, False): [],
}
_DECODE_SHAPES = [(16, 64, 4, 3), (16, 128, 4, 3)]  # L_q <= 16 (a decode step): 16 rows, the least tl.dot takes


def _union(*tables):
    return list(dict.fromkeys(shape for table in tables for shapes in table.values() for shape in shapes))


_SHAPES = _union(_FWD_SHAPES, _FWD_SHAPES_UNMASKED)


def configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _SHAPES + _DECODE_SHAPES]


def operands_in_shared() -> bool:
    """Whether the target's tensor cores read their operands from shared memory (wgmma on sm_90, and sm_100): the
    GPUs with more shared memory per block than sm_80, told apart by shared_budget() (the architecture the pruning
    runs for, also ahead of time). mma.sync (sm_80, sm_86, sm_89) loads every operand into registers."""
    return shared_budget() > SHARED_PER_BLOCK[80] - EPILOGUE_ROOM


def _listed(configs, args, table, unmasked=None, extra=()):
    """The configs whose (BLOCK_M, BLOCK_N, warps, stages) the tables list for this target and head dimension
    (`unmasked` only without an attn_mask; `extra` always), or all of them when none is (the interpreter's)."""
    key = (operands_in_shared(), args["BLOCK_D"] <= 64)
    allowed = set(table[key]) | set(extra)
    if unmasked is not None and not args.get("MASK_KIND", 0):
        allowed |= set(unmasked[key])
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    return kept or configs


def _prune(configs, named_args, **kwargs):
    """The tiles of _FWD_SHAPES for the target; row blocks for the query length: 16 rows when L_q <= 16 (a decode
    step), else 64 or 128 rows but none much taller than L_q; then fit the K and V tiles of each pipeline stage in
    shared memory. With an attn_mask the pipeliner stages its (BLOCK_M x BLOCK_N) tile too: counted per stage, after
    the resident Q tile."""
    args = {**named_args, **kwargs}
    el, block_d, lq = args["q_ptr"].element_size(), args["BLOCK_D"], args["LQ_BUCKET"]
    configs = _listed(configs, args, _FWD_SHAPES, _FWD_SHAPES_UNMASKED, _DECODE_SHAPES)
    short = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (lq <= 16)
             and c.kwargs["BLOCK_M"] <= max(64, 2 * lq)] or configs[:1]
    if args.get("MASK_KIND", 0):
        return _fit_with_mask(short, lambda c: 2 * c.kwargs["BLOCK_N"] * block_d * el,
                              lambda c: c.kwargs["BLOCK_M"] * block_d * el, args["am_ptr"].element_size())

    def stage_bytes(c):
        return 2 * c.kwargs["BLOCK_N"] * block_d * el

    return fit_shared(short, stage_bytes) or fit_shared(configs[:1], stage_bytes) or configs[:1]


def _fit_with_mask(configs, stage_bytes, resident_bytes, mask_el):
    """Configs whose pipeline (stage_bytes plus the attn_mask tile per stage) fits shared_budget() after their
    resident tiles, with the depth cut to fit (once each); the first config at depth 2 when none does."""
    fitted, budget = {}, shared_budget()
    for c in configs:
        per_stage = stage_bytes(c) + c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * mask_el
        stages = min(c.num_stages, max(budget - resident_bytes(c), 0) // per_stage)
        if stages >= 2:
            key = (tuple(sorted(c.kwargs.items())), c.num_warps, stages)
            fitted.setdefault(key, triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages))
    return (list(fitted.values())
            or [triton.Config(dict(configs[0].kwargs), num_warps=configs[0].num_warps, num_stages=2)])


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------

# On sm_90 every key loop of these kernels waits for all wgmma groups once an iteration (`wgmma.wait_group 0`, the
# PTX of each loop: forward `S wait0 PV`, dQ `S wait0 dP wait0 dQ`, dK/dV `Sᵀ wait0 dPᵀ wait0 dV dK`): triton's wgmma
# pipeliner gives a dot whose result other operations read in the same iteration (S by the softmax, dP by dS) a wait
# for every group right after it. The accumulating dots (P V, dS K, Pᵀ dO, dSᵀ Q) are issued last and stay in flight
# across the loop's back edge, over the next tiles' copy wait and the issue of the next S; the online softmax's
# rescale of the accumulator (forward) reads it only after that wait. Keeping S of block j + 1 in flight beside the
# softmax of block j needs warp specialization or a ping-pong of warpgroups (FlashAttention-3), which this pipeliner
# does not do.
@triton.jit
def _online_tile(q, kt_ptrs, v_ptrs, kt_ok, v_ok, visible, bias, m_i, l_i, acc, qk_scale,
                 HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of keys through the online softmax: kt_ptrs the (BLOCK_D x BLOCK_N) pointers of Kᵀ, v_ptrs the
    (BLOCK_N x BLOCK_D) pointers of V, with their load masks; `visible` (BLOCK_M x BLOCK_N) the scores kept;
    `bias` (with HAS_BIAS) the attn_mask tile in log₂ units, added to the scaled scores."""
    k = tl.load(kt_ptrs, mask=kt_ok, other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        s = s + bias
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs, mask=v_ok, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _real_keys(visible, cols, col_ok, rows, row_ok, query_offset, mask_ptr, stride_mn, am_ptrs, stride_an,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KIND: tl.constexpr):
    """Which of the real keys `cols` each query row (positions `rows`) sees, narrowing `visible`, and the additive
    attn_mask bias in log₂ units (0.0 without one): the causal rule, the key padding row at `mask_ptr`, and the
    attn_mask tile at `am_ptrs` (per row) + cols · stride_an (bool: True = visible; floating: below −1e38 hides,
    clamped there so no inf enters the arithmetic)."""
    if CAUSAL:
        visible = visible & (cols[None, :] <= query_offset + rows[:, None])
    if HAS_MASK:
        keep = tl.load(mask_ptr + cols * stride_mn, mask=col_ok, other=0)
        visible = visible & (keep != 0)[None, :]
    bias = 0.0
    if MASK_KIND == 1:
        shown = tl.load(am_ptrs + cols[None, :] * stride_an, mask=row_ok[:, None] & col_ok[None, :], other=0)
        visible = visible & (shown != 0)
    if MASK_KIND == 2:
        bias = tl.load(am_ptrs + cols[None, :] * stride_an, mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        visible = visible & (bias >= -1e38)
        bias = tl.maximum(bias, -1e38) * 1.4426950408889634
    return visible, bias


@triton.jit
def _prefix_range(off_ptr, len_ptr, b, P, PREFIX_ROWS: tl.constexpr):
    """[lo, hi) of batch row b's prefix keys: with PREFIX_ROWS [off_b, off_b + len_b), off_b clamped into [0, P]
    and len_b into [0, P − off_b] (so that no input makes a kernel read outside the prefix); else [0, P)."""
    if PREFIX_ROWS:
        lo = tl.minimum(tl.maximum(tl.load(off_ptr + b), 0), P)
        hi = lo + tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), P - lo)
    else:
        lo = 0
        hi = P
    return lo, hi


@triton.autotune(configs=configs(),
                 key=["BLOCK_D", "LQ_BUCKET", "LK_BUCKET", "P_BUCKET", "CAUSAL", "HAS_MASK", "MASK_KIND",
                      "PREFIX_ROWS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, poff_ptr, plen_ptr, mask_ptr, am_ptr, o_ptr, lse_ptr,
    H, Lq, Lk, P, D, GROUP, query_offset, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ab, stride_ah, stride_am, stride_an,
    stride_ob, stride_oh, stride_om, stride_od,
    LQ_BUCKET, LK_BUCKET, P_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KIND: tl.constexpr, PREFIX_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    rn = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + rd[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # The prefix: the keys [p_lo, p_hi) of this row's range (all P without per-row ranges), every one visible.
    p_lo, p_hi = _prefix_range(poff_ptr, plen_ptr, b, P, PREFIX_ROWS)
    pk_base = pk_ptr + b * stride_pkb + hk * stride_pkh
    pv_base = pv_ptr + b * stride_pvb + hk * stride_pvh
    for n0 in range(p_lo, p_hi, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < p_hi
        m_i, l_i, acc = _online_tile(q, pk_base + cols[None, :] * stride_pkn + rd[:, None] * stride_pkd,
                                     pv_base + cols[:, None] * stride_pvn + rd[None, :] * stride_pvd,
                                     d_ok[:, None] & col_ok[None, :], col_ok[:, None] & d_ok[None, :],
                                     col_ok[None, :], 0.0, m_i, l_i, acc, qk_scale, False, DOT_PRECISION)

    # The real keys: causal rule, padding mask and attn_mask; with `causal`, none past the block's last visible
    # key.
    hi = Lk
    if CAUSAL:
        last_row = tl.minimum((pid_m + 1) * BLOCK_M, Lq) - 1
        hi = tl.maximum(tl.minimum(Lk, query_offset + last_row + 1), 0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    am_base = am_ptr + b.to(tl.int64) * stride_ab + h.to(tl.int64) * stride_ah + rows[:, None] * stride_am
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < Lk
        visible, bias = _real_keys(col_ok[None, :], cols, col_ok, rows, row_ok, query_offset,
                                   mask_ptr + b * stride_mb, stride_mn, am_base, stride_an, CAUSAL, HAS_MASK, MASK_KIND)
        m_i, l_i, acc = _online_tile(q, k_base + cols[None, :] * stride_kn + rd[:, None] * stride_kd,
                                     v_base + cols[:, None] * stride_vn + rd[None, :] * stride_vd,
                                     d_ok[:, None] & col_ok[None, :], col_ok[:, None] & d_ok[None, :],
                                     visible, bias, m_i, l_i, acc, qk_scale, MASK_KIND == 2, DOT_PRECISION)

    # O = acc / l (0 for a row that saw no key); LSE in natural log of the scaled scores (+inf for such a row).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + rd[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh * Lq + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------

def _attn_mask_args(attn_mask, shape, dummy):
    """(pointer, strides, MASK_KIND) of an attn_mask broadcastable to `shape` (B, H, Lq, Lk): its own storage with
    stride 0 on the broadcast dimensions (no expanded copy). Bool is read as uint8 (a view); kind 1 for a bool or
    8-bit integer mask (nonzero = visible), 2 for a floating additive one; (dummy, zeros, 0) without a mask."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), 0
    kind = 2 if attn_mask.dtype.is_floating_point else 1
    if attn_mask.dtype == torch.bool:
        attn_mask = attn_mask.view(torch.uint8)
    assert kind == 2 or attn_mask.dtype in (torch.uint8, torch.int8)
    return attn_mask, attn_mask.expand(shape).stride(), kind


def _prefix_args(prefix_k, prefix_v, k, v, B, dummy, prefix_offsets=None, prefix_lengths=None):
    """(pk, pv, P, pk strides, pv strides, offsets, lengths, PREFIX_ROWS) of a launch's prefix: batch stride 0 when
    shared (first dimension 1); without a prefix k and v with P = 0. The per-row ranges: (B,) int32, contiguous (a
    missing one filled with its default, offsets 0 or lengths P, which the kernels clamp to P − off_b); without
    either (or without a prefix) (dummy, dummy, False): every row walks the whole prefix."""
    if prefix_k is None:
        return k, v, 0, (0, 0, 0, 0), (0, 0, 0, 0), dummy, dummy, False
    P = prefix_k.shape[2]
    offsets, lengths, rows = _prefix_rows_args(prefix_offsets, prefix_lengths, B, P, dummy)
    return prefix_k, prefix_v, P, _prefix_strides(prefix_k), _prefix_strides(prefix_v), offsets, lengths, rows


def _prefix_rows_args(prefix_offsets, prefix_lengths, B, P, dummy):
    """(offsets, lengths, PREFIX_ROWS) of the per-row prefix ranges, as `_prefix_args`."""
    if prefix_offsets is None and prefix_lengths is None:
        return dummy, dummy, False
    if prefix_offsets is None:
        prefix_offsets = torch.zeros(B, dtype=torch.int32, device=dummy.device)
    if prefix_lengths is None:
        prefix_lengths = torch.full((B,), P, dtype=torch.int32, device=dummy.device)
    for t in (prefix_offsets, prefix_lengths):
        assert t.dtype == torch.int32 and tuple(t.shape) == (B,) and t.is_contiguous(), "(B,) int32, contiguous"
    return prefix_offsets, prefix_lengths, True


def forward(q, k, v, prefix_k, prefix_v, o, lse, *, scale, causal=False, key_padding_mask=None, query_offset=0,
            attn_mask=None, prefix_offsets=None, prefix_lengths=None):
    """O (B, H, Lq, D) and LSE (B, H, Lq) float32 (contiguous) for q (B, H, Lq, D), k and v (B, H_kv, Lk, D),
    prefix_k and prefix_v (1 or B, H_kv, P, D) or None, key_padding_mask (B, Lk) int8 (nonzero: keep) or None,
    attn_mask (see _attn_mask_args) or None, prefix_offsets and prefix_lengths (B,) int32 or None (row b's prefix
    keys [off_b, off_b + len_b), clamped into the prefix). Shapes are checked by the caller
    (fastpeft/ops/attention.py); D must be one of limits.ATTENTION_HEAD_DIMS."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert D in ATTENTION_HEAD_DIMS and H % Hkv == 0 and lse.is_contiguous()
    pk, pv, P, pk_strides, pv_strides, poff, plen, rows = _prefix_args(prefix_k, prefix_v, k, v, B, lse,
                                                                       prefix_offsets, prefix_lengths)
    mask = key_padding_mask if key_padding_mask is not None else lse
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    am, am_strides, mask_kind = _attn_mask_args(attn_mask, (B, H, Lq, Lk), lse)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    launch(prefix_attention_fwd_kernel)[grid](
        q, k, v, pk, pv, poff, plen, mask, am, o, lse,
        H, Lq, Lk, P, D, H // Hkv, int(query_offset), float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *mask_strides, *am_strides, *o.stride(),
        bucket(Lq), bucket(Lk), bucket(P),
        CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, MASK_KIND=mask_kind, PREFIX_ROWS=rows,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=triton.next_power_of_2(D),
    )
    return o, lse


# ----------------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2 style). With LSE and Δ_i = rowsum(dO_i ⊙ O_i) (computed by the caller), each tile
# recomputes P = exp(S · scale − LSE) under the forward's masks (P = 0 where LSE = +inf: a row that saw no key) and
#     dV = Pᵀ dO,   dS = P ⊙ (dO Vᵀ − Δ),   dK = scale · dSᵀ Q,   dQ = scale · dS K.
# Two kernels, no atomics (deterministic):
#
# * dK/dV: one program per (BLOCK_N keys of one source, key batch · kv head); it holds its K and V tiles and the
#   float32 dK, dV accumulators, and loops over the query rows of every query head of its GQA group (and, for a
#   prefix shared by the batch, over every batch row: the sum over the batch stays in registers). Launched once on
#   the prefix (no mask; with per-row ranges only the rows whose [off_b, off_b + len_b) covers a key add to it, a
#   row whose range misses the tile is skipped, and a key no row reads gets 0) and once on the real keys (causal
#   rule and padding mask; with `causal`, the row loop starts at the first row block that can see the tile).
# * dQ: one program per (BLOCK_M query rows, batch · head), walking the prefix tiles (its row's range) and then the
#   real key tiles like the forward.
# Scores use base-2 exponents as in the forward (LSE is scaled by log₂e on load); the attn_mask tile (MASK_KIND)
# is reloaded and the bias added exactly as in the forward, so P is recomputed identically.
# ----------------------------------------------------------------------------------------------------------

# dK/dV (BLOCK_M, BLOCK_N, warps, stages) by (tensor-core operands in shared memory, BLOCK_D <= 64): the tiles that
# compile without spilling in every variant (ptxas, bf16/fp16, causal, padding mask, bool/bias attn_mask, prefixes).
# The float32 dK and dV accumulators (2 · BLOCK_N · BLOCK_D) are what the register file holds all along; on sm_80
# mma.sync also loads every warp's copy of the Q and dO operand tiles into registers, so only 16-row blocks fit at
# head dim 64 and 8 warps at 128 (e.g. sm_80, D 64, bias mask: 32x64 w4 spills 16-28 B at 255 registers, 16x64 w8
# uses 176); on sm_90 wgmma reads them from shared memory, and at head dim 128 only 8 warps (two warpgroups sharing
# the accumulators) fit: 32x64 w4 spills 32 B, 64x64 w8 64-104 B, 64x128 w8 112-244 B (255 registers).
_DKDV_SHAPES = {
    (True, True): [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)],
    (True, False): [(32, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3)],
    (False, True): [(16, 64, 8, 3), (16, 128, 8, 2)],
    (False, False): [(32, 64, 8, 3), (32, 64, 8, 2)],
}
# dQ (BLOCK_M, BLOCK_N, warps, stages) as _FWD_SHAPES (the dQ accumulator, S, dP and dS tiles; Q and dO resident).
# sm_90: 64x64 w4 spills 24-48 B with a bias at head dim 128. sm_80: at head dim 128 64x64 w4 and 128-row blocks on
# 8 warps spill 12-40 B (255 registers) while 64-row blocks on 8 warps take 158-188; at 64, 64x64 w4 and 128x64 w8
# spill 36-56 B with a bias.
_DQ_SHAPES = {
    (True, True): [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
    (True, False): [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
    (False, True): [(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
    (False, False): [(64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 8, 3)],
}
_DQ_SHAPES_UNMASKED = {
    (True, True): [],
    (True, False): [(64, 64, 4, 3)],
    (False, True): [(64, 64, 4, 3), (128, 64, 8, 3)],
    (False, False): [],
}


def bwd_configs(shapes):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune_dkdv(configs, named_args, **kwargs):
    """The tiles of _DKDV_SHAPES for this target and head dimension (all of `configs` when none of them is listed:
    the interpreter's), with the depth cut so that the resident K and V tiles plus, per stage, the Q and dO tiles
    (and the attn_mask tile) fit shared_budget()."""
    args = {**named_args, **kwargs}
    el, block_d = args["q_ptr"].element_size(), args["BLOCK_D"]
    listed = _listed(configs, args, _DKDV_SHAPES)
    mask_el = args["am_ptr"].element_size() if args.get("MASK_KIND", 0) else 0
    return _fit_with_mask(listed, lambda c: 2 * c.kwargs["BLOCK_M"] * block_d * el,
                          lambda c: 2 * c.kwargs["BLOCK_N"] * block_d * el, mask_el)


def _prune_dq(configs, named_args, **kwargs):
    """As the forward (short row blocks for short queries), with the resident Q and dO tiles taken off the shared
    budget before the pipelined K and V tiles are fitted (float32 tiles are staged through shared memory)."""
    args = {**named_args, **kwargs}
    el, block_d = args["q_ptr"].element_size(), args["BLOCK_D"]
    configs = _listed(configs, args, _DQ_SHAPES, _DQ_SHAPES_UNMASKED)
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, 2 * args["LQ_BUCKET"])] or configs[:1]
    if args.get("MASK_KIND", 0):
        return _fit_with_mask(short, lambda c: 2 * c.kwargs["BLOCK_N"] * block_d * el,
                              lambda c: 2 * c.kwargs["BLOCK_M"] * block_d * el, args["am_ptr"].element_size())
    fitted, budget = [], shared_budget()
    for c in short:
        free = budget - 2 * c.kwargs["BLOCK_M"] * block_d * el
        stages = min(c.num_stages, max(free, 0) // (2 * c.kwargs["BLOCK_N"] * block_d * el))
        if stages >= 2:
            fitted.append(triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages))
    return fitted or [triton.Config(dict(configs[0].kwargs), num_warps=configs[0].num_warps, num_stages=2)]


@triton.autotune(configs=bwd_configs(_union(_DKDV_SHAPES)),
                 key=["BLOCK_D", "LQ_BUCKET", "N_BUCKET", "NB", "GROUP", "CAUSAL", "HAS_MASK", "MASK_KIND",
                      "PREFIX_ROWS"],
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def prefix_attention_bwd_dkdv_kernel(
    q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, poff_ptr, plen_ptr, mask_ptr, am_ptr, dk_ptr, dv_ptr,
    H, HKV, Lq, N, D, GROUP, NB, query_offset, scale, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ab, stride_ah, stride_am, stride_an,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    LQ_BUCKET, N_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KIND: tl.constexpr, PREFIX_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of keys [n0, n0 + BLOCK_N) of source (k_ptr, v_ptr), batch bk (of the source), kv head hk; query
    batches bk + 0 .. bk + NB − 1 (NB = B for a shared prefix, whose bk is 0; else 1). With PREFIX_ROWS (a prefix
    source) query batch b reads only the keys of its range: the others are masked, and a row whose range misses
    the tile runs no row block."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bk = pid_bh // HKV
    hk = pid_bh % HKV
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    rm = tl.arange(0, BLOCK_M)
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + bk * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + rd[None, :] * stride_kd,
                mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + bk * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + rd[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query i sees key j iff j <= query_offset + i: rows before n0 − query_offset see none of the tile
        lo = (tl.maximum(n0 - query_offset, 0) // BLOCK_M) * BLOCK_M
    for bi in range(0, NB):
        b = bk + bi
        key_ok = col_ok
        m_hi = Lq
        if PREFIX_ROWS:
            r_lo, r_hi = _prefix_range(poff_ptr, plen_ptr, b, N, PREFIX_ROWS)
            key_ok = key_ok & (cols >= r_lo) & (cols < r_hi)
            m_hi = tl.where((r_lo < n0 + BLOCK_N) & (r_hi > n0), Lq, 0)  # 0: none of the tile is row b's
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + cols * stride_mn, mask=col_ok, other=0)
            key_ok = key_ok & (keep != 0)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = q_ptr + b * stride_qb + h * stride_qh
            do_base = do_ptr + b * stride_dob + h * stride_doh
            row_base = (b * H + h) * Lq
            am_base = am_ptr + b.to(tl.int64) * stride_ab + h.to(tl.int64) * stride_ah + cols[:, None] * stride_an
            for m0 in range(lo, m_hi, BLOCK_M):
                rows = m0 + rm
                row_ok = rows < Lq
                q = tl.load(q_base + rows[:, None] * stride_qm + rd[None, :] * stride_qd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)             # (BLOCK_M, BLOCK_D)
                do = tl.load(do_base + rows[:, None] * stride_dom + rd[None, :] * stride_dod,
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)            # (BLOCK_M, BLOCK_D)
                lse2 = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
                visible = key_ok[:, None]  # rows past Lq: LSE +inf (`other`) makes their P 0
                if CAUSAL:
                    visible = visible & (cols[:, None] <= query_offset + rows[None, :])
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # Sᵀ (BLOCK_N, BLOCK_M)
                if MASK_KIND == 1:
                    shown = tl.load(am_base + rows[None, :] * stride_am, mask=col_ok[:, None] & row_ok[None, :],
                                    other=0)
                    visible = visible & (shown != 0)
                if MASK_KIND == 2:  # as the forward: bias in log₂ units added to the scaled scores
                    bias = tl.load(am_base + rows[None, :] * stride_am, mask=col_ok[:, None] & row_ok[None, :],
                                   other=0.0).to(tl.float32)
                    visible = visible & (bias >= -1e38)
                    st = st + tl.maximum(bias, -1e38) * 1.4426950408889634
                pt = tl.where(visible, tl.exp2(st - lse2[None, :]), 0.0)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                dst = pt * (dpt - delta[None, :])
                # the two accumulations last: on sm_90 both stay in flight into the next row block, up to the wait
                # for its Sᵀ (Sᵀ and dPᵀ, read by this iteration's softmax terms, are waited for at once)
                dv = tl.dot(pt.to(k.dtype), do, dv, input_precision=DOT_PRECISION)
                dk = tl.dot(dst.to(k.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * scale
    tl.store(dk_ptr + bk * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn
             + rd[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + bk * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn
             + rd[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_tile(q, do, dq, lse2, delta, k_ptrs, v_ptrs, kv_ok, visible, bias, qk_scale, HAS_BIAS: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """One key tile of dQ: k_ptrs, v_ptrs the (BLOCK_N x BLOCK_D) pointers of K and V, kv_ok their load mask;
    bias (with HAS_BIAS) as in _online_tile."""
    k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        s = s + bias
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.autotune(configs=bwd_configs(_union(_DQ_SHAPES, _DQ_SHAPES_UNMASKED)),
                 key=["BLOCK_D", "LQ_BUCKET", "LK_BUCKET", "P_BUCKET", "CAUSAL", "HAS_MASK", "MASK_KIND",
                      "PREFIX_ROWS"],
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit
def prefix_attention_bwd_dq_kernel(
    q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, poff_ptr, plen_ptr, mask_ptr, am_ptr, dq_ptr,
    H, Lq, Lk, P, D, GROUP, query_offset, scale, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ab, stride_ah, stride_am, stride_an,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    LQ_BUCKET, LK_BUCKET, P_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KIND: tl.constexpr, PREFIX_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    rn = tl.arange(0, BLOCK_N)
    qd_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + rd[None, :] * stride_qd,
                mask=qd_ok, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + rd[None, :] * stride_dod,
                 mask=qd_ok, other=0.0)
    lse2 = tl.load(lse_ptr + pid_bh * Lq + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + pid_bh * Lq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    p_lo, p_hi = _prefix_range(poff_ptr, plen_ptr, b, P, PREFIX_ROWS)  # this row's prefix keys
    pk_base = pk_ptr + b * stride_pkb + hk * stride_pkh
    pv_base = pv_ptr + b * stride_pvb + hk * stride_pvh
    for n0 in range(p_lo, p_hi, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < p_hi
        dq = _dq_tile(q, do, dq, lse2, delta, pk_base + cols[:, None] * stride_pkn + rd[None, :] * stride_pkd,
                      pv_base + cols[:, None] * stride_pvn + rd[None, :] * stride_pvd,
                      col_ok[:, None] & d_ok[None, :], row_ok[:, None] & col_ok[None, :], 0.0, qk_scale, False,
                      DOT_PRECISION)

    hi = Lk
    if CAUSAL:
        last_row = tl.minimum((pid_m + 1) * BLOCK_M, Lq) - 1
        hi = tl.maximum(tl.minimum(Lk, query_offset + last_row + 1), 0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    am_base = am_ptr + b.to(tl.int64) * stride_ab + h.to(tl.int64) * stride_ah + rows[:, None] * stride_am
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < Lk
        visible, bias = _real_keys(row_ok[:, None] & col_ok[None, :], cols, col_ok, rows, row_ok, query_offset,
                                   mask_ptr + b * stride_mb, stride_mn, am_base, stride_an, CAUSAL, HAS_MASK, MASK_KIND)
        dq = _dq_tile(q, do, dq, lse2, delta, k_base + cols[:, None] * stride_kn + rd[None, :] * stride_kd,
                      v_base + cols[:, None] * stride_vn + rd[None, :] * stride_vd,
                      col_ok[:, None] & d_ok[None, :], visible, bias, qk_scale, MASK_KIND == 2, DOT_PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + rd[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=qd_ok)


def _prefix_strides(t):
    """Strides of a (1 or B, H_kv, P, D) prefix with batch stride 0 when shared (first dimension 1)."""
    return (0 if t.shape[0] == 1 else t.stride(0), *t.stride()[1:])


def backward_dkdv(q, do, lse, delta, k, v, dk, dv, *, scale, causal=False, key_padding_mask=None,
                  query_offset=0, attn_mask=None, prefix_offsets=None, prefix_lengths=None):
    """dK, dV (written into dk, dv, shaped like k and v) of one key source k, v: the real keys (B, H_kv, L_k, D),
    with `causal`, key_padding_mask (B, L_k) int8 or None and attn_mask (as `forward`) or None; or a prefix
    (1 or B, H_kv, P, D), with causal=False, no masks and its per-row ranges (prefix_offsets, prefix_lengths as
    `forward`) — a shared prefix (first dimension 1) sums the contributions of every batch row, each over its own
    range (0 for a key no row reads). lse and delta (B, H, Lq) float32, contiguous."""
    B, H, Lq, D = q.shape
    Bk, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    assert D in ATTENTION_HEAD_DIMS and H % Hkv == 0 and lse.is_contiguous() and delta.is_contiguous()
    if N == 0 or Bk == 0:
        return dk, dv
    NB = B if Bk == 1 and B > 1 else 1
    poff, plen, rows = _prefix_rows_args(prefix_offsets, prefix_lengths, B, N, lse)
    mask = key_padding_mask if key_padding_mask is not None else lse
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    am, am_strides, mask_kind = _attn_mask_args(attn_mask, (B, H, Lq, N), lse)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), Bk * Hkv)

    launch(prefix_attention_bwd_dkdv_kernel)[grid](
        q, do, lse, delta, k, v, poff, plen, mask, am, dk, dv,
        H, Hkv, Lq, N, D, H // Hkv, NB, int(query_offset), float(scale), float(scale) * LOG2E,
        *q.stride(), *do.stride(), *k.stride(), *v.stride(), *mask_strides, *am_strides, *dk.stride(),
        *dv.stride(), bucket(Lq), bucket(N),
        CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, MASK_KIND=mask_kind, PREFIX_ROWS=rows,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=triton.next_power_of_2(D),
    )
    return dk, dv


def backward_dq(q, do, lse, delta, k, v, prefix_k, prefix_v, dq, *, scale, causal=False, key_padding_mask=None,
                query_offset=0, attn_mask=None, prefix_offsets=None, prefix_lengths=None):
    """dQ (written into dq, shaped like q) over the prefix (or None) and the real keys; arguments as `forward`,
    with dO like q and lse, delta (B, H, Lq) float32, contiguous."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert D in ATTENTION_HEAD_DIMS and H % Hkv == 0 and lse.is_contiguous() and delta.is_contiguous()
    pk, pv, P, pk_strides, pv_strides, poff, plen, rows = _prefix_args(prefix_k, prefix_v, k, v, B, lse,
                                                                       prefix_offsets, prefix_lengths)
    mask = key_padding_mask if key_padding_mask is not None else lse
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    am, am_strides, mask_kind = _attn_mask_args(attn_mask, (B, H, Lq, Lk), lse)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    launch(prefix_attention_bwd_dq_kernel)[grid](
        q, do, lse, delta, k, v, pk, pv, poff, plen, mask, am, dq,
        H, Lq, Lk, P, D, H // Hkv, int(query_offset), float(scale), float(scale) * LOG2E,
        *q.stride(), *do.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *mask_strides,
        *am_strides, *dq.stride(), bucket(Lq), bucket(Lk), bucket(P),
        CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, MASK_KIND=mask_kind, PREFIX_ROWS=rows,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=triton.next_power_of_2(D),
    )
    return dq


# ----------------------------------------------------------------------------------------------------------
# Decode forward: split-K ("flash-decoding") with the GQA group packed into the query tile. For L_q <= 16 one
# program owns one (batch, kv head) and one of NUM_SPLITS chunks of the key tiles (the tiles of its row's prefix
# range, then real key tiles); its BLOCK_M rows are the group's query heads x the query rows, row r = query head
# hk · GROUP + r // L_q, query position r % L_q (so each K/V tile is read once per group). Each program writes its
# chunk's unnormalised float32 accumulator O_s·l_s, row max m_s and row sum l_s (base 2; m_s = −∞, l_s = 0 for a
# chunk that sees no key); the combine kernel then gives O = Σ_s 2^{m_s − m} l_s O_s / Σ_s 2^{m_s − m} l_s with
# m = max_s m_s, and LSE = (m + log₂ Σ_s 2^{m_s − m} l_s) · ln 2 (+∞, O = 0 for a row that sees nothing). With
# one split the program writes O and LSE itself.
# ----------------------------------------------------------------------------------------------------------

_COMBINE_ROWS = 16


def decode_applies(lq: int, group: int) -> bool:
    """Whether the split-K decode forward takes L_q query rows of a GQA group of `group` query heads."""
    return lq <= 16 and group * lq <= ATTENTION_DECODE_MAX_ROWS


def decode_splits(sms: int, programs: int, tiles: int) -> int:
    """Key splits for `programs` = B · H_kv programs on `sms` SMs: about two programs per SM (B · H_kv · splits
    ≳ 2 · SMs), each split with at least one of the `tiles` key tiles."""
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), tiles))


def _decode_config(el, block_d, block_m, block_n, am):
    """4 warps; the pipeline depth (3 at most) fitted to shared memory as the forward's prune does."""
    base = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=3)]
    if am is not None:
        return _fit_with_mask(base, lambda c: 2 * block_n * block_d * el, lambda c: block_m * block_d * el,
                              am.element_size())[0]
    return (fit_shared(base, lambda c: 2 * block_n * block_d * el)
            or [triton.Config(dict(base[0].kwargs), num_warps=4, num_stages=2)])[0]


@triton.jit
def prefix_attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, poff_ptr, plen_ptr, mask_ptr, am_ptr, o_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr,
    HKV, Lq, Lk, P, D, GROUP, ROWS, NUM_SPLITS, query_offset, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ab, stride_ah, stride_am, stride_an,
    stride_ob, stride_oh, stride_om, stride_od,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KIND: tl.constexpr, PREFIX_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split pid_s of the key tiles for the GROUP query heads of (batch b, kv head hk); ROWS = B · H · L_q, the
    rows of the partial buffers po (NUM_SPLITS, ROWS, D), pm and pl (NUM_SPLITS, ROWS), float32."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Lq
    h = hk * GROUP + r // Lq  # the query head of each packed row
    i = r % Lq                # and its query position
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    rn = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + rd[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # This split's key tiles [t0, t1) of the prefix tiles (of this row's range [p_lo, p_hi): the split is the
    # row's own) followed by the real key tiles (with `causal`, none past the last row's last visible key).
    hi = Lk
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Lk, query_offset + Lq), 0)
    p_lo, p_hi = _prefix_range(poff_ptr, plen_ptr, b, P, PREFIX_ROWS)
    tiles_p = (p_hi - p_lo + BLOCK_N - 1) // BLOCK_N
    tiles = tiles_p + (hi + BLOCK_N - 1) // BLOCK_N
    per_split = (tiles + NUM_SPLITS - 1) // NUM_SPLITS
    t0 = pid_s * per_split
    t1 = tl.minimum(t0 + per_split, tiles)

    pk_base = pk_ptr + b * stride_pkb + hk * stride_pkh
    pv_base = pv_ptr + b * stride_pvb + hk * stride_pvh
    for n0 in range(p_lo + t0 * BLOCK_N, p_lo + tl.minimum(t1, tiles_p) * BLOCK_N, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < p_hi
        m_i, l_i, acc = _online_tile(q, pk_base + cols[None, :] * stride_pkn + rd[:, None] * stride_pkd,
                                     pv_base + cols[:, None] * stride_pvn + rd[None, :] * stride_pvd,
                                     d_ok[:, None] & col_ok[None, :], col_ok[:, None] & d_ok[None, :],
                                     col_ok[None, :], 0.0, m_i, l_i, acc, qk_scale, False, DOT_PRECISION)

    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    am_base = am_ptr + b.to(tl.int64) * stride_ab + h[:, None].to(tl.int64) * stride_ah + i[:, None] * stride_am
    for n0 in range(tl.maximum(t0 - tiles_p, 0) * BLOCK_N, tl.maximum(t1 - tiles_p, 0) * BLOCK_N, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < Lk
        visible, bias = _real_keys(col_ok[None, :], cols, col_ok, i, row_ok, query_offset,  # i: each row's position
                                   mask_ptr + b * stride_mb, stride_mn, am_base, stride_an, CAUSAL, HAS_MASK, MASK_KIND)
        m_i, l_i, acc = _online_tile(q, k_base + cols[None, :] * stride_kn + rd[:, None] * stride_kd,
                                     v_base + cols[:, None] * stride_vn + rd[None, :] * stride_vd,
                                     d_ok[:, None] & col_ok[None, :], col_ok[:, None] & d_ok[None, :],
                                     visible, bias, m_i, l_i, acc, qk_scale, MASK_KIND == 2, DOT_PRECISION)

    flat = pid_bh * (GROUP * Lq) + r  # the row's index in (B, H, L_q): LSE's offset
    if NUM_SPLITS == 1:  # the whole key range: O and LSE directly, as the forward kernel
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(o_ptr + b * stride_ob + h[:, None] * stride_oh + i[:, None] * stride_om + rd[None, :] * stride_od,
                 (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + flat, lse, mask=row_ok)
    else:
        part = pid_s.to(tl.int64) * ROWS + flat
        tl.store(po_ptr + part[:, None] * D + rd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(pm_ptr + part, m_i, mask=row_ok)
        tl.store(pl_ptr + part, l_i, mask=row_ok)


@triton.jit
def prefix_attention_combine_kernel(
    po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, H, Lq, D, ROWS, NUM_SPLITS,
    stride_ob, stride_oh, stride_om, stride_od,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """O and LSE of BLOCK_R rows of (B, H, L_q) from the NUM_SPLITS partials (log-sum-exp rescaling)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(pm_ptr + s * ROWS + rows, mask=row_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        part = s * ROWS + rows.to(tl.int64)
        w = tl.exp2(tl.load(pm_ptr + part, mask=row_ok, other=float("-inf")) - m_use)  # 0 for an empty chunk
        l_sum += w * tl.load(pl_ptr + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(po_ptr + part[:, None] * D + rd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                                    other=0.0)
    empty = l_sum == 0.0
    l_safe = tl.where(empty, 1.0, l_sum)
    lse = tl.where(empty, float("inf"), (m_use + tl.log2(l_safe)) * 0.6931471805599453)
    b = rows // (H * Lq)
    h = (rows // Lq) % H
    i = rows % Lq
    o_rows = b * stride_ob + h * stride_oh + i * stride_om
    tl.store(o_ptr + o_rows[:, None] + rd[None, :] * stride_od, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows, lse, mask=row_ok)


def forward_decode(q, k, v, prefix_k, prefix_v, o, lse, *, scale, causal=False, key_padding_mask=None,
                   query_offset=0, attn_mask=None, prefix_offsets=None, prefix_lengths=None, num_splits=None,
                   sm_count=1):
    """`forward` for a decode step (decode_applies(L_q, H / H_kv)): the split-K kernel over `num_splits` chunks of
    the key tiles (default: enough for about two programs per SM of the `sm_count` SMs, sized for the longest
    prefix range: P, or the longest length when the lengths are on the CPU — no device synchronisation), then the
    combine kernel (none with one split). Other arguments as `forward`."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    assert D in ATTENTION_HEAD_DIMS and H % Hkv == 0 and lse.is_contiguous() and decode_applies(Lq, group)
    pk, pv, P, pk_strides, pv_strides, poff, plen, ranges = _prefix_args(prefix_k, prefix_v, k, v, B, lse,
                                                                         prefix_offsets, prefix_lengths)
    p_walk = P  # the longest prefix range a row walks (P unless known on the host without tracing or a sync)
    if ranges and plen.device.type == "cpu" and not torch.compiler.is_compiling():
        p_walk = int(torch.minimum(plen.clamp(min=0), P - poff.clamp(0, P)).max()) if B else 0
    mask = key_padding_mask if key_padding_mask is not None else lse
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    am, am_strides, mask_kind = _attn_mask_args(attn_mask, (B, H, Lq, Lk), lse)
    block_d = triton.next_power_of_2(D)
    block_m = max(16, triton.next_power_of_2(group * Lq))
    block_n = 16 if interpreting() else 64
    hi = max(min(Lk, int(query_offset) + Lq), 0) if causal else Lk
    tiles = triton.cdiv(p_walk, block_n) + triton.cdiv(hi, block_n)
    if num_splits is None:
        num_splits = decode_splits(sm_count, B * Hkv, tiles)
    num_splits = max(int(num_splits), 1)
    rows = B * H * Lq
    if num_splits == 1:
        po = pm = pl = lse  # unused
    else:
        def new(*shape):  # NaN-filled under the interpreter: a partial row left unwritten shows in the tests
            t = torch.empty(shape, device=q.device, dtype=torch.float32)
            return t.fill_(float("nan")) if interpreting() else t

        po, pm, pl = new(num_splits, rows, D), new(num_splits, rows), new(num_splits, rows)
    config = _decode_config(q.element_size(), block_d, block_m, block_n, attn_mask)
    launch(prefix_attention_decode_kernel)[(num_splits, B * Hkv)](
        q, k, v, pk, pv, poff, plen, mask, am, o, lse, po, pm, pl,
        Hkv, Lq, Lk, P, D, group, rows, num_splits, int(query_offset), float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *mask_strides, *am_strides, *o.stride(),
        CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, MASK_KIND=mask_kind, PREFIX_ROWS=ranges,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        launch(prefix_attention_combine_kernel)[(triton.cdiv(rows, _COMBINE_ROWS),)](
            po, pm, pl, o, lse, H, Lq, D, rows, num_splits, *o.stride(),
            BLOCK_R=_COMBINE_ROWS, BLOCK_D=block_d, num_warps=4,
        )
    return o, lse
