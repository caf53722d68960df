"""Triton kernels of the multi-adapter LoRA linear (oracle: fastpeft/reference/multi_lora.py) and their launchers.

One batch, a different adapter per token. Adapters are read through a pointer table (3, S) int64 of one layer:
row 0 the data_ptr of A_s (r_s, K), row 1 of B_s (N, r_s), row 2 of the per-rank scale s_s (r_s,) float32 (all
contiguous, one adapter dtype; 0 for an empty slot), with ranks (S,) int32. Adapters of any rank live in their own
tensors: nothing is padded to the largest rank or copied when adapters come and go, and no kernel is specialised on
the number of adapters or their ranks (the decode kernel's rank block and the expand's unrolled rank chunks follow the
power-of-two bucket of the largest).
Tokens come grouped by slot in segments (fastpeft/ops/routing.py); the base product x Wᵀ + b is cuBLAS's, the
kernels add the low-rank term into its output.

* ``multi_lora_shrink``: S[t, :r] = X[t] U_s for every token t of segment (slot s)          (tensor-core tiles)
      forward U = A_sᵀ (T = x A_sᵀ), backward U = B_s (G = dY B_s); S float32 (M, R_max)
* ``multi_lora_expand``: OUT[t] += (S[t, :r] ⊙ s_s) E_s                                    (tensor-core tiles)
      forward E = B_sᵀ (y += (T ⊙ s) Bᵀ), backward E = A_s (dX += (G ⊙ s) A)
* ``multi_lora_decode``: OUT[t] += ((X[t] A_sᵀ) ⊙ s_s) B_sᵀ per token, the rank-sized T kept in registers: shrink
      and expand in one launch (few tokens). Each program owns one token and a chunk of the output columns and
      recomputes T (A_s re-reads come from L2).
* ``multi_lora_reduce`` + ``multi_lora_reduce_combine``: weight gradients per segment, C_s = Xᵀ (S ⊙ s_s) summed
      over its tokens — dA_sᵀ = xᵀ (G ⊙ s), dB_s = dYᵀ (T ⊙ s) — in float32 partials over row chunks (parallel
      over long segments), added up in a fixed order and written into each adapter's gradient (no atomics).

Operand layouts (which table row, and whether the matrix is rank-major): A_s (r, K) is rank-major (element [j, k]
at j·K + k), B_s (N, r) dim-major (element [n, j] at n·r + j).
"""
from __future__ import annotations

import torch

from ._compat import TL_DTYPES, dot_precision, interpreting, launch, tl, triton
from ._tiles import bucket, fit_shared
from .limits import MULTI_LORA_DECODE_MAX_RANK

ROW_A, ROW_B, ROW_SCALE = 0, 1, 2
REDUCE_ROWS = 512      # tokens per row chunk of the weight-gradient reduction


# ----------------------------------------------------------------------------------------------------------
# Autotune configurations (tests compile every one ahead of time); one small config under the interpreter.
# ----------------------------------------------------------------------------------------------------------

def shrink_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_R": 16}, num_warps=4)]
    shapes = [(16, 128, 16, 4, 4), (16, 64, 64, 4, 4), (64, 64, 16, 4, 4), (64, 64, 64, 4, 4),
              (128, 64, 64, 8, 3)]  # (BLOCK_M, BLOCK_K, BLOCK_R, warps, stages)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": br}, num_warps=w, num_stages=s)
            for bm, bk, br, w, s in shapes]


def expand_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 16}, num_warps=4)]
    shapes = [(16, 128, 16, 4), (16, 256, 16, 4), (64, 128, 16, 4), (64, 128, 32, 8), (64, 64, 32, 4),
              (64, 64, 64, 4), (128, 128, 64, 8)]  # (BLOCK_M, BLOCK_N, BLOCK_R, warps)
    # nothing is pipelined (the rank chunks are unrolled, no loop): one stage
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=1)
            for bm, bn, br, w in shapes]


def reduce_configs():
    if interpreting():
        return [triton.Config({"BLOCK_D": 32, "BLOCK_R": 16, "BLOCK_M": 16}, num_warps=4)]
    shapes = [(64, 16, 64, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3)]  # (BLOCK_D, BLOCK_R, BLOCK_M, ...)
    return [triton.Config({"BLOCK_D": bd, "BLOCK_R": br, "BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bd, br, bm, w, s in shapes]


def _small_rank(configs, max_rank):
    """Rank blocks no wider than the widest rank needs (16 for rank <= 16)."""
    need = max(16, bucket(max_rank))
    return [c for c in configs if c.kwargs["BLOCK_R"] <= need] or configs[:1]


def _prune_shrink(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    el, u_el = args["x_ptr"].element_size(), _element_size(args["U_DTYPE"])
    short = [c for c in _small_rank(configs, args["R_MAX"]) if c.kwargs["BLOCK_M"] <= max(16, 2 * args["M_BUCKET"])]
    short = short or _small_rank(configs, args["R_MAX"])[:1]
    return fit_shared(short, lambda c: c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] * el + c.kwargs["BLOCK_R"] * u_el))


def _prune_expand(configs, named_args, **kwargs):
    """Rank blocks no wider than the widest rank needs; the kernel unrolls the rank chunks: at most eight of them,
    and beyond one chunk of 64 only tiles whose adapter chunk is at most 16 elements a thread (its addresses stay
    live across the chunks: larger ones spill); row tiles no taller than the segments need. Nothing is
    pipelined: one chunk's tiles, a few KiB of shared memory. The same adapter-chunk bound for A as the operand at
    ranks up to 16."""
    args = {**named_args, **kwargs}
    need = max(16, bucket(args["R_MAX"]))
    fits = [c for c in configs if c.kwargs["BLOCK_R"] <= need]
    if need > 64 or (need == 16 and args["E_RANK_MAJOR"]):  # and at ranks <= 16 with A as the operand (dX), whose
        # 16 x 256 tile spills on sm_90 in bf16 (ptxas; tests/aot.py's moe_lora entry)
        fits = [c for c in fits if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_R"] <= 16 * 32 * c.num_warps] or fits
    widest = max(c.kwargs["BLOCK_R"] for c in fits)
    ranked = [c for c in fits if need <= 8 * c.kwargs["BLOCK_R"]] or [c for c in fits if c.kwargs["BLOCK_R"] == widest]
    return [c for c in ranked if c.kwargs["BLOCK_M"] <= max(16, 2 * args["M_BUCKET"])] or ranked[:1]


def _prune_reduce(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    el = args["x_ptr"].element_size()
    return fit_shared(_small_rank(configs, args["R_MAX"]),
                      lambda c: c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_D"] * el + c.kwargs["BLOCK_R"] * 4))


def _element_size(dtype) -> int:
    return dtype.primitive_bitwidth // 8


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _slot_rank(slot, ranks_ptr, n_slots):
    """(slot clamped into the table, its rank; rank 0 for a slot outside the table)."""
    inside = (slot >= 0) & (slot < n_slots)
    safe = tl.where(inside, slot, 0)
    rank = tl.where(inside, tl.load(ranks_ptr + safe), 0)
    return safe, rank


@triton.jit
def _segment_rows(seg_start_ptr, seg_slot_ptr, order_ptr, ranks_ptr, n_slots, seg, tile, BLOCK_M: tl.constexpr):
    """Tile `tile` (BLOCK_M tokens) of segment `seg`: (token indices, their mask, whether the tile has any, the
    segment's slot clamped into the table, its rank)."""
    row0 = tl.load(seg_start_ptr + seg) + tile * BLOCK_M
    end = tl.load(seg_start_ptr + seg + 1)
    safe, rank = _slot_rank(tl.load(seg_slot_ptr + seg), ranks_ptr, n_slots)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return tok, row_ok, row0 < end, safe, rank


@triton.jit
def _adapter(table_ptr, row, n_slots, safe, DTYPE: tl.constexpr):
    """Slot `safe`'s tensor in table row `row`, as a typed pointer."""
    return tl.load(table_ptr + row * n_slots + safe).to(tl.pointer_type(DTYPE))


@triton.autotune(configs=shrink_configs(), key=["K", "M_BUCKET", "R_BUCKET", "U_RANK_MAJOR"],
                 prune_configs_by={"early_config_prune": _prune_shrink})
@triton.jit(do_not_specialize=["n_slots", "R_MAX"])
def multi_lora_shrink_kernel(
    x_ptr, table_ptr, ranks_ptr, order_ptr, seg_start_ptr, seg_slot_ptr, s_ptr,
    n_slots, K, R_MAX, stride_xm, stride_xk, stride_sm, M_BUCKET, R_BUCKET,
    U_ROW: tl.constexpr, U_RANK_MAJOR: tl.constexpr, U_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    r_chunks = tl.cdiv(R_MAX, BLOCK_R)
    pid = tl.program_id(0)
    tok, row_ok, any_rows, safe, rank = _segment_rows(seg_start_ptr, seg_slot_ptr, order_ptr, ranks_ptr, n_slots,
                                                      tl.program_id(1), pid // r_chunks, BLOCK_M)
    r0 = (pid % r_chunks) * BLOCK_R
    if any_rows & (r0 < rank):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        rk = tl.arange(0, BLOCK_K)
        u_base = _adapter(table_ptr, U_ROW, n_slots, safe, U_DTYPE)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + rk[None, :] * stride_xk
        if U_RANK_MAJOR:  # Uᵀ[j, k] = A[j, k]
            u_ptrs = u_base + rr[:, None] * K + rk[None, :]
            u_step = BLOCK_K
        else:             # Uᵀ[j, k] = B[k, j]
            u_ptrs = u_base + rk[None, :] * rank + rr[:, None]
            u_step = BLOCK_K * rank
        # Sᵀ = Uᵀ Xᵀ. The adapter's tile comes through an untyped table pointer (no alignment known: no async copy),
        # so it is the dot's register operand, loaded one step ahead; the x tile, pipelined into shared memory, is
        # the other, and a tensor-core group stays in flight across iterations. (`+ 0.0`: an elementwise op between
        # the load and the dot is what hands the operand to wgmma in registers; the loop runs at least once, so no
        # path reaches the result without a tensor-core group, which would make ptxas serialise them.)
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        u = tl.load(u_ptrs, mask=r_ok[:, None] & (rk[None, :] < K), other=0.0)
        for k in range(0, tl.maximum(tl.cdiv(K, BLOCK_K), 1)):
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=row_ok[:, None] & (rk[None, :] < k_left), other=0.0)
            u_ptrs += u_step
            u_next = tl.load(u_ptrs, mask=r_ok[:, None] & (rk[None, :] < k_left - BLOCK_K), other=0.0)
            acc = tl.dot(u.to(a.dtype) + 0.0, tl.trans(a), acc, input_precision=DOT_PRECISION)
            u = u_next
            x_ptrs += BLOCK_K * stride_xk
        tl.store(s_ptr + tok[None, :] * stride_sm + rr[:, None], acc, mask=row_ok[None, :] & r_ok[:, None])


@triton.autotune(configs=expand_configs(), key=["N", "M_BUCKET", "R_BUCKET", "E_RANK_MAJOR"],
                 prune_configs_by={"early_config_prune": _prune_expand})
@triton.jit(do_not_specialize=["n_slots", "R_MAX"])
def multi_lora_expand_kernel(
    s_ptr, table_ptr, ranks_ptr, order_ptr, seg_start_ptr, seg_slot_ptr, out_ptr,
    n_slots, N, R_MAX, stride_sm, stride_om, stride_on, M_BUCKET,
    R_BUCKET: tl.constexpr, E_ROW: tl.constexpr, E_RANK_MAJOR: tl.constexpr, E_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    tok, row_ok, any_rows, safe, rank = _segment_rows(seg_start_ptr, seg_slot_ptr, order_ptr, ranks_ptr, n_slots,
                                                      tl.program_id(1), pid // n_tiles, BLOCK_M)
    if any_rows & (rank > 0):
        dtype = out_ptr.dtype.element_ty
        rn = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        e_base = _adapter(table_ptr, E_ROW, n_slots, safe, E_DTYPE)
        sc_base = _adapter(table_ptr, 2, n_slots, safe, tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The rank chunks unrolled (R_BUCKET: the largest rank's power-of-two bucket; one chunk up to rank 64 with
        # the widest rank block), not looped: the adapter operand (an untyped table pointer, no alignment known)
        # cannot be loaded asynchronously, so a loop would wait for every tensor-core group.
        for r0 in tl.static_range(0, R_BUCKET, BLOCK_R):
            if r0 < rank:
                rr = r0 + tl.arange(0, BLOCK_R)
                r_ok = rr < rank
                s = tl.load(s_ptr + tok[:, None] * stride_sm + rr[None, :], mask=row_ok[:, None] & r_ok[None, :],
                            other=0.0)
                sc = tl.load(sc_base + rr, mask=r_ok, other=0.0)
                if E_RANK_MAJOR:  # E[j, n] = A[j, n]
                    e_ptrs = e_base + rr[:, None] * N + rn[None, :]
                else:             # E[j, n] = B[n, j]
                    e_ptrs = e_base + rn[None, :] * rank + rr[:, None]
                e = tl.load(e_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot((s * sc[None, :]).to(dtype), e.to(dtype), acc, input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + tok[:, None] * stride_om + rn[None, :] * stride_on
        ok = row_ok[:, None] & n_ok[None, :]
        out = tl.load(out_ptrs, mask=ok, other=0.0)
        tl.store(out_ptrs, (out.to(tl.float32) + acc).to(dtype), mask=ok)


@triton.jit(do_not_specialize=["n_slots", "cols_per_program"])
def multi_lora_decode_kernel(
    x_ptr, table_ptr, ranks_ptr, token_slot_ptr, out_ptr,
    n_slots, K, N, cols_per_program, stride_xm, stride_xk, stride_om, stride_on,
    A_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    safe, rank = _slot_rank(tl.load(token_slot_ptr + m), ranks_ptr, n_slots)
    if rank > 0:
        dtype = out_ptr.dtype.element_ty
        a_base = _adapter(table_ptr, 0, n_slots, safe, A_DTYPE)
        b_base = _adapter(table_ptr, 1, n_slots, safe, A_DTYPE)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        rk = tl.arange(0, BLOCK_K)
        t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # T = x A_sᵀ, reduced along K in registers
            k = k0 + rk
            xv = tl.load(x_ptr + m * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
            a = tl.load(a_base + rr[:, None] * K + k[None, :], mask=r_ok[:, None] & (k[None, :] < K), other=0.0)
            t += tl.sum(a.to(tl.float32) * xv[None, :], axis=1)
        t = t * tl.load(_adapter(table_ptr, 2, n_slots, safe, tl.float32) + rr, mask=r_ok, other=0.0)
        n_begin = tl.program_id(1) * cols_per_program
        n_end = tl.minimum(N, n_begin + cols_per_program)
        for n0 in range(n_begin, n_end, BLOCK_N):  # OUT[m, n] += Σ_j T_j s_j B[n, j]
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < n_end
            b = tl.load(b_base + rn[None, :] * rank + rr[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            delta = tl.sum(b.to(tl.float32) * t[:, None], axis=0)
            out_ptrs = out_ptr + m * stride_om + rn * stride_on
            out = tl.load(out_ptrs, mask=n_ok, other=0.0)
            tl.store(out_ptrs, (out.to(tl.float32) + delta).to(dtype), mask=n_ok)


@triton.autotune(configs=reduce_configs(), key=["D", "R_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_reduce})
@triton.jit(do_not_specialize=["n_slots", "R_MAX"])
def multi_lora_reduce_kernel(
    x_ptr, s_ptr, table_ptr, ranks_ptr, order_ptr, seg_slot_ptr, chunk_ptr, partial_ptr,
    n_slots, D, R_MAX, n_chunks, stride_xm, stride_xd, stride_sm, R_BUCKET,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    d_tiles = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    c = tl.program_id(1)
    rd = (pid % d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    r0 = (pid // d_tiles) * BLOCK_R
    seg = tl.load(chunk_ptr + c)  # chunk c: (segment, first row, end row) at c, n_chunks + c, 2 n_chunks + c
    begin = tl.load(chunk_ptr + n_chunks + c)
    end = tl.load(chunk_ptr + 2 * n_chunks + c)
    safe, rank = _slot_rank(tl.load(seg_slot_ptr + seg), ranks_ptr, n_slots)
    if r0 < rank:
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        d_ok = rd < D
        sc = tl.load(_adapter(table_ptr, 2, n_slots, safe, tl.float32) + rr, mask=r_ok, other=0.0)
        # C_sᵀ = (S ⊙ s)ᵀ X: the scaled S tile, formed in registers, is the dot's register operand and the x tile,
        # pipelined into shared memory, the other, so a tensor-core group stays in flight across iterations (a
        # chunk is never empty: the loop runs at least once, no path skips the tensor cores)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for i in range(0, tl.maximum(tl.cdiv(end - begin, BLOCK_M), 1)):
            rows = begin + i * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            tok = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            x = tl.load(x_ptr + tok[:, None] * stride_xm + rd[None, :] * stride_xd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.load(s_ptr + tok[None, :] * stride_sm + rr[:, None], mask=row_ok[None, :] & r_ok[:, None],
                        other=0.0)
            acc = tl.dot((s * sc[:, None]).to(x.dtype), x, acc, input_precision=DOT_PRECISION)
        p_ptrs = partial_ptr + c.to(tl.int64) * R_MAX * D + rr[:, None] * D + rd[None, :]
        tl.store(p_ptrs, acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["n_slots", "R_MAX"])
def multi_lora_reduce_combine_kernel(
    partial_ptr, seg_chunk_ptr, seg_slot_ptr, out_table_ptr, ranks_ptr,
    n_slots, D, R_MAX,
    OUT_RANK_MAJOR: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    d_tiles = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    rd = (pid % d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    r0 = (pid // d_tiles) * BLOCK_R
    safe, rank = _slot_rank(tl.load(seg_slot_ptr + seg), ranks_ptr, n_slots)
    out_addr = tl.load(out_table_ptr + safe)
    if (r0 < rank) & (out_addr != 0):
        rr = r0 + tl.arange(0, BLOCK_R)
        ok = (rr[:, None] < rank) & (rd[None, :] < D)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for c in range(tl.load(seg_chunk_ptr + seg), tl.load(seg_chunk_ptr + seg + 1)):
            acc += tl.load(partial_ptr + c * R_MAX * D + rr[:, None] * D + rd[None, :], mask=ok, other=0.0)
        out_base = out_addr.to(tl.pointer_type(OUT_DTYPE))
        if OUT_RANK_MAJOR:  # dA (r, D)
            out_ptrs = out_base + rr[:, None] * D + rd[None, :]
        else:               # dB (D, r)
            out_ptrs = out_base + rd[None, :] * rank + rr[:, None]
        tl.store(out_ptrs, acc.to(OUT_DTYPE), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers. `table`/`ranks` describe one layer's slots (see the module docstring); `order`, `seg_start`,
# `seg_slot` a routing's segments; host integers size the grids, so nothing synchronises.
# ----------------------------------------------------------------------------------------------------------

def shrink(x, table, ranks, order, seg_start, seg_slot, s_out, *, num_segments, max_segment, max_rank,
           u_row, rank_major, adapter_dtype):
    """s_out[t, :r_s] (float32, M x R_max) = x[t] U_s for every token t of every segment (U: table row u_row,
    A_sᵀ when rank_major, else B_s)."""
    K = x.shape[1]

    def grid(meta):
        return (triton.cdiv(max_segment, meta["BLOCK_M"]) * triton.cdiv(max_rank, meta["BLOCK_R"]), num_segments)

    launch(multi_lora_shrink_kernel)[grid](
        x, table, ranks, order, seg_start, seg_slot, s_out,
        table.shape[1], K, max_rank, x.stride(0), x.stride(1), s_out.stride(0), bucket(max_segment),
        bucket(max_rank),
        U_ROW=u_row, U_RANK_MAJOR=bool(rank_major), U_DTYPE=TL_DTYPES[adapter_dtype],
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return s_out


def expand(s, table, ranks, order, seg_start, seg_slot, out, *, num_segments, max_segment, max_rank, e_row,
           rank_major, adapter_dtype):
    """out[t] += (s[t, :r_s] ⊙ scale_s) E_s for every token t of every segment (E: table row e_row, A_s when
    rank_major, else B_sᵀ)."""
    N = out.shape[1]

    def grid(meta):
        return (triton.cdiv(max_segment, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), num_segments)

    launch(multi_lora_expand_kernel)[grid](
        s, table, ranks, order, seg_start, seg_slot, out,
        table.shape[1], N, max_rank, s.stride(0), out.stride(0), out.stride(1), bucket(max_segment),
        R_BUCKET=bucket(max_rank), E_ROW=e_row, E_RANK_MAJOR=bool(rank_major), E_DTYPE=TL_DTYPES[adapter_dtype],
        DOT_PRECISION=dot_precision(out.dtype),
    )
    return out


def decode_block_r(max_rank: int) -> int:
    """The decode kernel's rank block: the power-of-two bucket (at least 16) of the largest rank."""
    return max(16, bucket(max_rank))


def decode(x, table, ranks, token_slot, out, *, max_rank, adapter_dtype, target_programs):
    """out[t] += ((x[t] A_sᵀ) ⊙ scale_s) B_sᵀ for every token t with a slot s (token_slot; -1: none), shrink and
    expand in one launch: programs (token, column chunk), about `target_programs` of them."""
    M, K = x.shape
    N = out.shape[1]
    block_r = decode_block_r(max_rank)
    if block_r > MULTI_LORA_DECODE_MAX_RANK:
        raise ValueError(f"multi_lora decode kernel: rank {max_rank} > {MULTI_LORA_DECODE_MAX_RANK}; use the segment "
                         "kernels.")
    block_k = max(16, 4096 // block_r)
    block_n = max(16, 4096 // block_r)
    chunks = max(1, min(triton.cdiv(target_programs, max(M, 1)), triton.cdiv(N, block_n)))
    cols = triton.cdiv(triton.cdiv(N, chunks), block_n) * block_n
    launch(multi_lora_decode_kernel)[(M, triton.cdiv(N, cols))](
        x, table, ranks, token_slot, out,
        table.shape[1], K, N, cols, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        A_DTYPE=TL_DTYPES[adapter_dtype], BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return out


def reduce_chunks(seg_start_host, rows: int = REDUCE_ROWS):
    """The row chunks of every segment: ([segment...], [first row...], [end row...]) and each segment's first
    chunk (len = segments + 1), so that long segments spread over programs."""
    segs, begins, ends, first = [], [], [], [0]
    for i, (a, b) in enumerate(zip(seg_start_host, seg_start_host[1:])):
        for r in range(a, b, rows):
            segs.append(i)
            begins.append(r)
            ends.append(min(b, r + rows))
        first.append(len(segs))
    return segs, begins, ends, first


def reduce(x, s, table, ranks, order, seg_start_host, seg_slot, out_table, *, max_rank, rank_major, out_dtype):
    """For every segment (slot s), C_s = x_segᵀ (s_seg ⊙ scale_s) (D x r_s) written, cast to out_dtype, into the
    tensor out_table[slot] points to (rank-major (r_s, D) or dim-major (D, r_s); slots whose entry is 0 skipped)."""
    D = x.shape[1]
    segs, begins, ends, first = reduce_chunks(seg_start_host)
    n_chunks = len(segs)
    chunks = torch.tensor(segs + begins + ends, dtype=torch.int32).to(x.device)
    seg_chunk = torch.tensor(first, dtype=torch.int32).to(x.device)
    partial = torch.empty((n_chunks, max_rank, D), device=x.device, dtype=torch.float32)
    assert partial.numel() < 2**31, "int32 offsets into the partial sums"

    def grid(meta):
        return (triton.cdiv(D, meta["BLOCK_D"]) * triton.cdiv(max_rank, meta["BLOCK_R"]), n_chunks)

    launch(multi_lora_reduce_kernel)[grid](
        x, s, table, ranks, order, seg_slot, chunks, partial,
        table.shape[1], D, max_rank, n_chunks, x.stride(0), x.stride(1), s.stride(0), bucket(max_rank),
        DOT_PRECISION=dot_precision(x.dtype),
    )
    block_d, block_r = 64, 16
    launch(multi_lora_reduce_combine_kernel)[(triton.cdiv(D, block_d) * triton.cdiv(max_rank, block_r),
                                              len(first) - 1)](
        partial, seg_chunk, seg_slot, out_table, ranks,
        table.shape[1], D, max_rank,
        OUT_RANK_MAJOR=bool(rank_major), OUT_DTYPE=TL_DTYPES[out_dtype], BLOCK_D=block_d, BLOCK_R=block_r,
        num_warps=4,
    )
