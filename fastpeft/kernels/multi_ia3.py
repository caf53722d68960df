"""Triton kernels of the multi-adapter IA3 linear (oracle: fastpeft/reference/multi_ia3.py) and their launchers.

Each token scales by the vector of its own adapter, read through a pointer table (1, S) int64 of one layer (the
data_ptr of l_s, contiguous, one dtype; 0 for an empty slot) and the token's slot (-1: none, scale 1):

* ``multi_ia3_gemm``:      OUT = ((X ⊙ u_row) Wkn + bias) ⊙ v_row        one GEMM; u_row gathered per row of the X
                           tiles as they are loaded (prologue, feed-forward targets), or v_row in the epilogue by
                           column chunks (output scaling); only one of the two per launch (a layer scales one side)
* ``multi_ia3_row_scale``: DST[m] = SRC[m] ⊙ l_row                      in place or into a new tensor: after cuBLAS
                           at decode sizes (a GEMM tile would leave the GPU idle) and in the backward pass

Scales multiply in float32 and the result is rounded once.
"""
from __future__ import annotations

from ._compat import TL_DTYPES, dot_precision, interpreting, launch, tl, triton
from ._tiles import bucket, fit_shared, gemm_configs, grouped_tile


def _prune_gemm(configs, named_args, **kwargs):
    """Tiles no taller than the problem needs; with input scales, tiles whose scaled x operand fits in registers
    (_scaled_operand); the pipelined operand tiles (and the gathered input scales) in shared memory."""
    args = {**named_args, **kwargs}
    el, v_el = args["x_ptr"].element_size(), args["V_DTYPE"].primitive_bitwidth // 8
    scales = bool(args["IN_SCALE"])
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * args["M_BUCKET"])] or configs[-1:]
    if scales:
        short = [c for c in short if _scaled_operand(c) <= SCALED_OPERAND_BUDGET] or short[-1:]

    def stage_bytes(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return bk * ((bm + bn) * el + (bm * v_el if scales else 0))

    return fit_shared(short, stage_bytes) or fit_shared(configs, stage_bytes)


SCALED_OPERAND_BUDGET = 64  # elements of the scaled x operand live per thread (beyond them ptxas spills)


def _scaled_operand(c) -> int:
    """Elements of x ⊙ u a thread holds with input scales: the (BLOCK_M, BLOCK_K) operand is formed in registers.
    Tiles of 64 rows or more (wgmma on sm_90) split it over the warps, and the group in flight keeps the previous
    one live (twice); shorter tiles (mma.sync) give every warp along the columns the whole operand."""
    bm, bk, warps = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps
    return 2 * bm * bk // (32 * warps) if bm >= 64 else bm * bk // 32


@triton.jit
def _row_vectors(table_ptr, token_slot_ptr, rows, n_slots, V_DTYPE: tl.constexpr):
    """(pointer to each row's vector, whether the row has one)."""
    slot = tl.load(token_slot_ptr + rows)
    inside = (slot >= 0) & (slot < n_slots)
    addr = tl.load(table_ptr + tl.where(inside, slot, 0))
    addr = tl.where(inside, addr, 0)
    return addr.to(tl.pointer_type(V_DTYPE)), addr != 0


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "IN_SCALE"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit(do_not_specialize=["n_slots"])
def multi_ia3_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, table_ptr, token_slot_ptr,
    M, N, K, n_slots,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on, M_BUCKET,
    HAS_BIAS: tl.constexpr, IN_SCALE: tl.constexpr, V_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_in = rm % M  # rows past M re-read valid rows; their results are never stored
    rn_in = rn % N
    dtype = x_ptr.dtype.element_ty
    vec, has = _row_vectors(table_ptr, token_slot_ptr, rm_in, n_slots, V_DTYPE)
    x_ptrs = x_ptr + rm_in.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn_in[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.maximum(tl.cdiv(K, BLOCK_K), 1)):  # at least once: no path skips the tensor cores
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        if IN_SCALE:  # x ⊙ u_row in float32, rounded once
            u = tl.load(vec[:, None] + (k * BLOCK_K + rk)[None, :], mask=has[:, None] & (rk[None, :] < k_left),
                        other=1.0)
            a = (a.to(tl.float32) * u.to(tl.float32)).to(dtype)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    if IN_SCALE:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
    else:  # (x W + b) ⊙ v_row, stored by column chunks of at most 64: the gathered v tile is as large as the
        # accumulator, and whole it would double the registers the tile holds (ptxas spills)
        n0 = pid_n * BLOCK_N
        half: tl.constexpr = BLOCK_N // 2
        if BLOCK_N <= 64:
            _scale_store(acc, vec, has, n0, rm, out_ptr, M, N, stride_om, stride_on, BLOCK_N)
        elif BLOCK_N <= 128:
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            _scale_store(left, vec, has, n0, rm, out_ptr, M, N, stride_om, stride_on, half)
            _scale_store(right, vec, has, n0 + half, rm, out_ptr, M, N, stride_om, stride_on, half)
        else:
            quarter: tl.constexpr = BLOCK_N // 4
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            q0, q1 = _halves(left, BLOCK_M, half)
            _scale_store(q0, vec, has, n0, rm, out_ptr, M, N, stride_om, stride_on, quarter)
            _scale_store(q1, vec, has, n0 + quarter, rm, out_ptr, M, N, stride_om, stride_on, quarter)
            q2, q3 = _halves(right, BLOCK_M, half)
            _scale_store(q2, vec, has, n0 + half, rm, out_ptr, M, N, stride_om, stride_on, quarter)
            _scale_store(q3, vec, has, n0 + half + quarter, rm, out_ptr, M, N, stride_om, stride_on, quarter)


@triton.jit
def _halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(left, right) column halves of a (ROWS, COLS) tile."""
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _scale_store(acc, vec, has, n0, rm, out_ptr, M, N, stride_om, stride_on, COLS: tl.constexpr):
    """out[rm, n0:n0+COLS] = acc ⊙ v_row (rows without a vector: acc)."""
    rn = n0 + tl.arange(0, COLS)
    v = tl.load(vec[:, None] + (rn % N)[None, :], mask=has[:, None], other=1.0)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptrs, (acc * v.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_slots"])
def multi_ia3_row_scale_kernel(
    src_ptr, dst_ptr, table_ptr, token_slot_ptr, n_slots, D,
    stride_sm, stride_sd, stride_dm, stride_dd,
    IN_PLACE: tl.constexpr, V_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    vec, has = _row_vectors(table_ptr, token_slot_ptr, m, n_slots, V_DTYPE)
    src_ptrs, dst_ptrs = src_ptr + m * stride_sm + rd * stride_sd, dst_ptr + m * stride_dm + rd * stride_dd
    if IN_PLACE:  # a row without an adapter is left as it is
        if has:
            _scale_row(src_ptrs, dst_ptrs, vec + rd, rd < D, has)
    else:
        _scale_row(src_ptrs, dst_ptrs, vec + rd, rd < D, has)


@triton.jit
def _scale_row(src_ptrs, dst_ptrs, vec_ptrs, ok, has):
    src = tl.load(src_ptrs, mask=ok, other=0.0)
    has = (ok.to(tl.int32) * 0 + has.to(tl.int32)) != 0  # as a block: the interpreter's block & scalar is not bool
    v = tl.load(vec_ptrs, mask=ok & has, other=1.0)
    tl.store(dst_ptrs, (src.to(tl.float32) * v.to(tl.float32)).to(dst_ptrs.dtype.element_ty), mask=ok)


def gemm(x, w_kn, bias, out, table, token_slot, *, in_scale, vector_dtype):
    """out (M, N) = ((x ⊙ u_row) @ w_kn + bias) with in_scale, else (x @ w_kn + bias) ⊙ v_row; rows' vectors from
    `table` by `token_slot` (-1: none)."""
    M, K = x.shape
    N = w_kn.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(multi_ia3_gemm_kernel)[grid](
        x, w_kn, bias if bias is not None else x, out, table, token_slot,
        M, N, K, table.shape[-1],
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), out.stride(0), out.stride(1), bucket(M),
        HAS_BIAS=bias is not None, IN_SCALE=bool(in_scale), V_DTYPE=TL_DTYPES[vector_dtype],
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return out


def row_scale(src, dst, table, token_slot, *, vector_dtype):
    """dst[m] = src[m] ⊙ l_row (dst may be src: then rows without an adapter are not touched)."""
    M, D = src.shape
    block_d = 256 if not interpreting() else 32
    launch(multi_ia3_row_scale_kernel)[(M, triton.cdiv(D, block_d))](
        src, dst, table, token_slot, table.shape[-1], D,
        src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        IN_PLACE=src.data_ptr() == dst.data_ptr(), V_DTYPE=TL_DTYPES[vector_dtype], BLOCK_D=block_d, num_warps=4,
    )
    return dst
