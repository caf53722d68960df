"""The adapter's terms of the cuBLAS-base strategy (fastpeft/ops/strategy.py) in one small Triton kernel.

cuBLAS has written the base product into Y; this kernel adds the low-rank term and the column scale and bias:

    S = (X ⊙ keep_in / (1-p)) U                      shrink: X read once, S kept in registers (float32)
    Y ← (Y + keep_out ⊙ ((S ⊙ s) E) / (1-p)) ⊙ c + b   expand, in place, over this program's columns
    Z = Y + ... before ⊙ c (DoRA's saved output)

    Forward:  X = x,  U = Aᵀ, E = Bᵀ, keep_in = dropout    (S = T, optionally written)
    Backward: X = dY, U = B,  E = A,  keep_out = dropout   (S = G, Y = dY W from cuBLAS, the result is dX)

The grid is (row blocks, column splits): a decode step (a few rows) still spreads over the GPU, each split
recomputing the rows' S from X (read from L2 after the first). Memory traffic: X once (plus L2 re-reads), Y read
and written once, U and E; never more than PEFT's separate dropout, shrink, expand, scale and add kernels.
Oracle: fastpeft/reference/lora.py (the same terms in PyTorch).
"""
from __future__ import annotations

from ._compat import dot_precision, interpreting, launch, tl, triton
from ._tiles import bucket, fit_shared, pow2_at_least_16, strides2
from .dropout import keep_tile, row_keys
from .limits import UPDATE_MAX_RANK


def update_configs():
    """What autotune may pick (tests compile every one ahead of time); one small config under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    shapes = [(16, 128, 64, 4, 4), (32, 128, 128, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Row blocks no taller than the rows' bucket (a decode step keeps 16-row tiles); the pipelined tiles within
    the shared-memory budget."""
    el = named_args["x_ptr"].element_size()
    m_bucket = max(named_args["M_BUCKET"], 16)
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= m_bucket] or configs[:1]
    block_r = kwargs.get("BLOCK_R", UPDATE_MAX_RANK)

    def stage_bytes(c):  # the shrink's X and U tiles, and the expand's E and Y tiles (both loops are pipelined)
        return (c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + block_r)
                + c.kwargs["BLOCK_N"] * (block_r + c.kwargs["BLOCK_M"])) * el
    return fit_shared(short, stage_bytes) or short[:1]


@triton.autotune(configs=update_configs(), key=["M_BUCKET", "K", "N", "R", "MASK_IN", "MASK_OUT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def lora_update_kernel(
    x_ptr, u_ptr, e_ptr, scale_ptr, y_ptr, s_ptr, c_ptr, bias_ptr, z_ptr, seed_ptr,
    M, K, N, R, cols_per_split,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_er, stride_en, stride_ym, stride_yn,
    stride_sm, stride_sr, stride_zm, stride_zn,
    threshold, inv_keep, M_BUCKET,
    MASK_IN: tl.constexpr, MASK_OUT: tl.constexpr, WRITE_S: tl.constexpr, OUT_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_Z: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    rm_in = rm % M  # rows past M re-read valid rows; their results are never stored
    row_ok = rm < M
    dtype = x_ptr.dtype.element_ty
    if MASK_IN or MASK_OUT:
        row_key = row_keys(seed_ptr, rm_in)

    # Shrink: S = (X ⊙ keep / (1-p)) U over the whole K, in float32.
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    u_ptrs = u_ptr + rk[:, None] * stride_uk + rr[None, :] * stride_ur
    acc_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        if MASK_IN:
            keep = keep_tile(row_key, k * BLOCK_K + rk, threshold)
            a = tl.where(keep, a.to(tl.float32) * inv_keep, 0.0).to(dtype)
        u = tl.load(u_ptrs, mask=(rk[:, None] < k_left) & (rr[None, :] < R), other=0.0)
        acc_s = tl.dot(a, u.to(dtype), acc_s, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        u_ptrs += BLOCK_K * stride_uk
    if WRITE_S:
        if pid_n == 0:
            tl.store(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, acc_s,
                     mask=row_ok[:, None] & (rr[None, :] < R))
    sc = tl.load(scale_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)
    t = (acc_s * sc[None, :]).to(dtype)  # rounded once, after scaling, as the fused GEMM's epilogue does

    # Expand over this program's columns: Y ← (Y + keep ⊙ T E / (1-p)) ⊙ c + b, in place.
    first = pid_n * cols_per_split
    last = tl.minimum(first + cols_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        col_ok = rn < last
        e = tl.load(e_ptr + rr[:, None] * stride_er + rn[None, :] * stride_en,
                    mask=(rr[:, None] < R) & col_ok[None, :], other=0.0)
        lora = tl.dot(t, e.to(dtype), input_precision=DOT_PRECISION)
        if MASK_OUT:
            lora = tl.where(keep_tile(row_key, rn, threshold), lora * inv_keep, 0.0)
        tile = row_ok[:, None] & col_ok[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
        y = tl.load(y_ptrs, mask=tile, other=0.0).to(tl.float32) + lora
        if WRITE_Z:
            tl.store(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, y.to(z_ptr.dtype.element_ty),
                     mask=tile)
        if OUT_SCALE:
            y = y * tl.load(c_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=tile)


def column_splits(M: int, N: int, target_programs: int, block_m: int = 16, block_n: int = 128) -> int:
    """How many column ranges the expand is cut into so that about `target_programs` programs run: each range
    recomputes its rows' S, so only as many as the row blocks leave the GPU short of."""
    row_blocks = triton.cdiv(M, block_m)
    if row_blocks >= target_programs:
        return 1
    return max(1, min(triton.cdiv(target_programs, row_blocks), triton.cdiv(N, block_n)))


def update(x, u_kr, e_rn, scale, y, *, s=None, seed=None, threshold=0, inv_keep=1.0, mask_out=False,
           out_scale=None, bias=None, z=None, target_programs=1):
    """y (M, N) ← (y + keep ⊙ ((x ⊙ keep) u_kr ⊙ scale) e_rn) ⊙ out_scale + bias, in place; s (M, R) float32 ←
    the shrink when given; z ← y before the column scale when given. The dropout mask (seed) applies to x
    (mask_out False) or to the low-rank term of the output (mask_out True). Needs R <= UPDATE_MAX_RANK."""
    M, K = x.shape
    R, N = e_rn.shape
    if R > UPDATE_MAX_RANK:
        raise ValueError(f"lora_update: rank {R} > {UPDATE_MAX_RANK} (the kernel keeps S in registers)")
    block_r = pow2_at_least_16(R, UPDATE_MAX_RANK)
    # adapters kept in float32 on a half-precision model: cast once here (R x (K + N) elements) so that both dot
    # operands stream through shared memory as loaded (a cast inside the loop stalls the wgmma pipeline)
    u_kr, e_rn = u_kr.to(x.dtype), e_rn.to(x.dtype)
    splits = column_splits(M, N, target_programs)
    cols_per_split = triton.cdiv(triton.cdiv(N, splits), 128) * 128  # whole column tiles of every config

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, cols_per_split))

    launch(lora_update_kernel)[grid](
        x, u_kr, e_rn, scale, y, s if s is not None else y, out_scale if out_scale is not None else y,
        bias if bias is not None else y, z if z is not None else y, seed if seed is not None else y,
        M, K, N, R, cols_per_split,
        x.stride(0), x.stride(1), u_kr.stride(0), u_kr.stride(1), e_rn.stride(0), e_rn.stride(1),
        y.stride(0), y.stride(1), *strides2(s), *strides2(z),
        threshold, inv_keep, bucket(M),
        MASK_IN=seed is not None and not mask_out, MASK_OUT=seed is not None and mask_out, WRITE_S=s is not None,
        OUT_SCALE=out_scale is not None, HAS_BIAS=bias is not None, WRITE_Z=z is not None,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )
    return y
