"""Triton kernels of the LoRA linear (oracle: fastpeft/reference/lora.py) and their launchers.

Three kernels serve the forward and the backward pass:

* ``lora_gemm``:   OUT = X Wkn (+ bias) + mask ⊙ ((S ⊙ s) E)       one GEMM, the low-rank term in its epilogue
                   S is either loaded (computed by ``lora_shrink``) or built in the K loop from the X tiles
                   already in shared memory (S = X U, "fused shrink": X is read once for both products).
                   Forward:  X = x,  Wkn = Wᵀ, U = Aᵀ, E = Bᵀ                  (S = T)
                   Backward: X = dY, Wkn = W,  U = B,  E = A, mask = dropout   (S = G, OUT = dX)
* ``lora_shrink``: S = (X ⊙ keep / (1-p)) U in float32                 T = drop(x) Aᵀ, or G = dY B
* ``lora_reduce``: C = (X ⊙ keep / (1-p))ᵀ (S ⊙ s), summed over rows
                   dAᵀ = drop(x)ᵀ (G ⊙ s), dB = dYᵀ (T ⊙ s); optionally the column sums of X (dbias = Σ_m dY)

Every operand is a strided view, so nn.Linear (N, K) and GPT-2 Conv1D (K, N) weights are used in place.
Accumulation is float32; S stays float32 in memory and is rounded to the input dtype once, after scaling.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import lora_tma
from ._compat import dot_precision, interpreting, launch, tl, triton
from ._tiles import (MIN_BLOCK_M, bucket, fit_shared, gemm_configs, grouped_tile, pow2_at_least_16, strides2,
                     target_capability)
from .dropout import keep_tile, row_keys
from .limits import FUSED_SHRINK_MAX_RANK
from .lora_terms import bias_activation, fit_registers, lowrank_chunk

# ----------------------------------------------------------------------------------------------------------
# Autotune configurations (the GEMM's: kernels/_tiles.py). `*_configs()` are what autotune may pick; tests
# compile every one ahead of time. Under the interpreter a single small config keeps the CPU tests fast.
# ----------------------------------------------------------------------------------------------------------

def shrink_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4)]
    shapes = [(128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 128, 4, 4), (16, 256, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in shapes]


def reduce_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in [(128, 4, 3), (64, 4, 4), (32, 4, 4)]]


def _block_r(args) -> int:
    return args.get("BLOCK_R", 64)


def _prune_gemm(configs, named_args, **kwargs):
    """Drop tiles much taller than the problem (decode-sized M) and tiles the variant's registers cannot hold; fit
    the rest in shared memory."""
    named_args = {**named_args, **kwargs}  # positional arguments and the constexpr keywords of the launch
    m, el = named_args["M_BUCKET"], named_args["x_ptr"].element_size()
    u_el = el if named_args.get("FUSED_SHRINK") else 0  # the launcher casts U to X's dtype
    configs = fit_registers(configs, named_args)
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * m)] or configs[-1:]
    u_bytes = _block_r(named_args) * u_el

    def stage_bytes(c):
        return c.kwargs["BLOCK_K"] * ((c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * el + u_bytes)

    return fit_shared(short, stage_bytes) or fit_shared(configs, stage_bytes)


def _prune_shrink(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    el = u_el = named_args["x_ptr"].element_size()  # the launcher casts U to X's dtype
    u_bytes = _block_r(named_args) * u_el
    return fit_shared(configs, lambda c: c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] * el + u_bytes))


def _prune_reduce(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    el = named_args["x_ptr"].element_size()
    if _block_r(named_args) >= 64:  # taller row blocks of a 64-wide rank block spill (sm_80) and serialise wgmma
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 32] or configs[-1:]
    return fit_shared(configs, lambda c: c.kwargs["BLOCK_M"] * (named_args["BLOCK_D"] * el + _block_r(named_args) * 4))


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.autotune(configs=gemm_configs(),
                 key=["M_BUCKET", "N", "K", "R", "FUSED_SHRINK", "MASK_LORA", "IN_SCALE", "IN_DOT", "OUT_DOT"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, u_ptr, scale_ptr, e_ptr, out_ptr, seed_ptr,
    in_scale_ptr, out_scale_ptr, z_ptr, q_ptr, p_ptr, in_dot_ptr, in_sum_ptr, out_dot_ptr, s_bias_ptr, res_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr, stride_uk, stride_ur,
    stride_er, stride_en, stride_om, stride_on,
    stride_zm, stride_zn, stride_qm, stride_qk, stride_pm, stride_pn, stride_rm, stride_rn,
    threshold, inv_keep, M_BUCKET,
    HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr, WRITE_S: tl.constexpr, MASK_LORA: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, SCALE_BIAS: tl.constexpr, WRITE_Z: tl.constexpr,
    IN_DOT: tl.constexpr, IN_SUM: tl.constexpr, OUT_DOT: tl.constexpr,
    S_ACT: tl.constexpr, S_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    rm_in = rm % M  # rows past M re-read valid rows; their results are never stored
    rn_in = rn % N
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not FUSED_SHRINK:
        # The low-rank term (S ⊙ s) E first, R in chunks of BLOCK_R, and its dropout mask: the K loop then adds the
        # base product to the same accumulator (one full tile of float32 registers, never two).
        if R_CHUNKS <= 4:
            for c in tl.static_range(R_CHUNKS):
                acc = lowrank_chunk(acc, s_ptr, scale_ptr, e_ptr, s_bias_ptr, rm_in, rn_in, c * BLOCK_R + rr, R,
                                     stride_sm, stride_sr, stride_er, stride_en, dtype, S_ACT, S_BIAS, DOT_PRECISION)
        else:
            for r0 in range(0, R, BLOCK_R):
                acc = lowrank_chunk(acc, s_ptr, scale_ptr, e_ptr, s_bias_ptr, rm_in, rn_in, r0 + rr, R,
                                     stride_sm, stride_sr, stride_er, stride_en, dtype, S_ACT, S_BIAS, DOT_PRECISION)
        if MASK_LORA:
            keep = keep_tile(row_keys(seed_ptr, rm), rn, threshold)
            acc = tl.where(keep, acc * inv_keep, 0.0)

    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn_in[None, :] * stride_wn
    if FUSED_SHRINK:
        u_ptrs = u_ptr + rk[:, None] * stride_uk + rr[None, :] * stride_ur
        acc_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    row_ok = rm < M
    reduce_here = pid_n == 0  # the row reductions of the prologue: one column strip does them for its rows
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if IN_DOT:  # Σ_m X ⊙ Q over this block's rows (IA3: dv = Σ_m dY ⊙ Z)
            if reduce_here:
                q = tl.load(q_ptr + rm_in[:, None] * stride_qm + (k * BLOCK_K + rk)[None, :] * stride_qk,
                            mask=row_ok[:, None] & (rk[None, :] < k_left), other=0.0)
                part = tl.sum(a.to(tl.float32) * q.to(tl.float32), axis=0)
                tl.store(in_dot_ptr + pid_m * K + k * BLOCK_K + rk, part, mask=rk < k_left)
        if IN_SCALE:  # X ⊙ u along K, in float32, rounded once (IA3 feed-forward input; dY ⊙ v in backward)
            u_in = tl.load(in_scale_ptr + k * BLOCK_K + rk, mask=rk < k_left, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * u_in[None, :]).to(dtype)
        if IN_SUM:  # Σ_m of the (scaled) X (IA3: db = Σ_m dY ⊙ v)
            if reduce_here:
                part = tl.sum(tl.where(row_ok[:, None], a.to(tl.float32), 0.0), axis=0)
                tl.store(in_sum_ptr + pid_m * K + k * BLOCK_K + rk, part, mask=rk < k_left)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if FUSED_SHRINK:  # U arrives in X's dtype (the launcher casts it): its tiles stay in the pipeline's buffers
            u = tl.load(u_ptrs, mask=(rk[:, None] < k_left) & (rr[None, :] < R), other=0.0)
            acc_s = tl.dot(a, u, acc_s, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if FUSED_SHRINK:  # epilogue: the low-rank term with S = X U still in registers (R <= BLOCK_R: one chunk)
        if WRITE_S:
            if pid_n == 0:
                s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
                tl.store(s_ptrs, acc_s, mask=(rm[:, None] < M) & (rr[None, :] < R))
        sc = tl.load(scale_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + rr[:, None] * stride_er + rn_in[None, :] * stride_en, mask=rr[:, None] < R, other=0.0)
        act_s = (bias_activation(acc_s, s_bias_ptr, rr, R, S_ACT, S_BIAS) * sc[None, :]).to(dtype)
        if MASK_LORA:  # a second full tile for the masked term: the prune keeps tiles whose two fit in registers
            lora = tl.dot(act_s, e.to(dtype), input_precision=DOT_PRECISION)
            keep = keep_tile(row_keys(seed_ptr, rm), rn, threshold)
            acc += tl.where(keep, lora * inv_keep, 0.0)
        else:
            acc = tl.dot(act_s, e.to(dtype), acc, input_precision=DOT_PRECISION)
    out_mask = row_ok[:, None] & (rn[None, :] < N)
    if HAS_BIAS and (SCALE_BIAS or not OUT_SCALE):
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    if OUT_DOT:  # Σ_m OUT ⊙ P over this block's rows (IA3: du = Σ_m H ⊙ x)
        pm = tl.load(p_ptr + rm_in[:, None] * stride_pm + rn_in[None, :] * stride_pn, mask=out_mask, other=0.0)
        tl.store(out_dot_ptr + pid_m * N + rn, tl.sum(acc * pm.to(tl.float32), axis=0), mask=rn < N)
    if WRITE_Z:  # the output before the output scale, kept for the backward pass
        tl.store(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, acc.to(z_ptr.dtype.element_ty),
                 mask=out_mask)
    if OUT_SCALE:  # OUT ⊙ v along N, in float32 (IA3 output scale; dX ⊙ u in backward)
        acc = acc * tl.load(out_scale_ptr + rn_in).to(tl.float32)[None, :]
        if HAS_BIAS and not SCALE_BIAS:
            acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    if RESIDUAL:  # a bottleneck adapter's residual connection: out = r + ...
        acc += tl.load(res_ptr + rm_in[:, None] * stride_rm + rn_in[None, :] * stride_rn).to(tl.float32)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=shrink_configs(), key=["M_BUCKET", "K", "R", "K_PER_SPLIT", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_shrink})
@triton.jit
def lora_shrink_kernel(
    x_ptr, u_ptr, s_ptr, seed_ptr,
    M, K, R, K_PER_SPLIT,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_ss, stride_sm, stride_sr,
    threshold, inv_keep, M_BUCKET,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[split] = X[:, range of split] U[range of split, :] over the K range of program_id(2)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    rm_in = rm % M
    dtype = x_ptr.dtype.element_ty
    if DROPOUT:
        row_key = row_keys(seed_ptr, rm_in)
    k_begin = pid_s * K_PER_SPLIT
    k_end = min(K, k_begin + K_PER_SPLIT)
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + (k_begin + rk)[None, :] * stride_xk
    u_ptrs = u_ptr + (k_begin + rk)[:, None] * stride_uk + rr[None, :] * stride_ur
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_left = k_end - k0
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        if DROPOUT:
            keep = keep_tile(row_key, k0 + rk, threshold)
            a = tl.where(keep, a.to(tl.float32) * inv_keep, 0.0).to(dtype)
        u = tl.load(u_ptrs, mask=(rk[:, None] < k_left) & (rr[None, :] < R), other=0.0)  # X's dtype (launcher)
        acc = tl.dot(a, u, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        u_ptrs += BLOCK_K * stride_uk
    s_ptrs = s_ptr + pid_s * stride_ss + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.autotune(configs=reduce_configs(), key=["M_BUCKET", "D", "R", "DROPOUT", "HAS_COLSUM"],
                 prune_configs_by={"early_config_prune": _prune_reduce})
@triton.jit
def lora_reduce_kernel(
    x_ptr, s_ptr, scale_ptr, c_ptr, colsum_ptr, seed_ptr,
    M, D, R, rows_per_split,
    stride_xm, stride_xd, stride_sm, stride_sr, stride_cs, stride_cd, stride_cr,
    threshold, inv_keep, M_BUCKET,
    DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rd_in = rd % D
    dtype = x_ptr.dtype.element_ty
    sc = tl.load(scale_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)
    # Cᵀ (R, D) = (S ⊙ s)ᵀ X: the operand formed in registers (S scaled and rounded) is the dot's left one, which
    # the tensor cores read from registers; X's tiles stay in the pipeline's shared-memory buffers.
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_begin = pid_s * rows_per_split
    m_end = min(M, m_begin + rows_per_split)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < m_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rd_in[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
        if DROPOUT:
            keep = keep_tile(row_keys(seed_ptr, rm), rd_in, threshold)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
        if HAS_COLSUM:
            colsum += tl.sum(x.to(tl.float32), axis=0)
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.dot(tl.trans((s * sc[None, :]).to(dtype)), x, acc, input_precision=DOT_PRECISION)
    c_base = c_ptr + pid_s * stride_cs
    tl.store(c_base + rr[:, None] * stride_cr + rd[None, :] * stride_cd, acc.to(c_ptr.dtype.element_ty),
             mask=(rr[:, None] < R) & (rd[None, :] < D))
    if HAS_COLSUM:
        if pid_r == 0:
            tl.store(colsum_ptr + pid_s * D + rd, colsum, mask=rd < D)


# ----------------------------------------------------------------------------------------------------------
# Launchers: operands come as (strided) views with the logical shapes named in each docstring.
# ----------------------------------------------------------------------------------------------------------

def gemm(x, w_kn, bias, e_rn, scale, out, *, s=None, u_kr=None, write_s=False, seed=None, threshold=0,
         inv_keep=1.0, in_scale=None, out_scale=None, scale_bias=False, z=None, in_dot=None, in_sum=None,
         out_dot=None, s_act=0, s_bias=None, residual=None):
    """out (M, N) = ((x ⊙ in_scale) @ w_kn + mask ⊙ ((S ⊙ scale) @ e_rn) [+ bias]) ⊙ out_scale [+ bias].

    x (M, K), w_kn (K, N), e_rn (R, N) (R may be 0: no low-rank term). S (M, R) float32 is read from `s`, or,
    when `u_kr` (K, R) is given, computed in the K loop as x @ u_kr (and written to `s` when `write_s`).
    A `seed` turns on the dropout mask on the low-rank term. The bias is added before `out_scale` when
    `scale_bias`, after it otherwise. Optional extras, all float32: `z` (M, N) receives the output before
    `out_scale`; `in_dot = (q, dst)` puts Σ_m x ⊙ q (q: M x K) in dst (K,); `in_sum` (K,) gets Σ_m x ⊙ in_scale;
    `out_dot = (p, dst)` puts Σ_m OUT ⊙ p (p: M x N, OUT before out_scale) in dst (N,).
    Bottleneck adapters: `s_act` (a code of limits.ACTIVATIONS) and `s_bias` (R,) make the low-rank term
    (f(S + s_bias) ⊙ scale) @ e_rn, and `residual` (M, N) is added last; with K = 0 there is no base product.
    """
    M, K = x.shape
    N = w_kn.shape[1]
    R = e_rn.shape[0]
    fused = u_kr is not None
    extras = any(v is not None for v in (in_scale, in_dot, in_sum, out_dot, s_bias, residual)) or bool(s_act)
    if lora_tma.applies(x, w_kn, target_capability(x), fused=fused, extras=extras):  # Hopper: TMA, persistent
        return lora_tma.gemm(x, w_kn, bias, e_rn, scale, out, s=s, num_sms=_persistent_programs(x), seed=seed,
                             threshold=threshold, inv_keep=inv_keep, out_scale=out_scale, scale_bias=scale_bias, z=z)
    block_r = pow2_at_least_16(R, FUSED_SHRINK_MAX_RANK if fused else 64)
    if fused and u_kr.dtype != x.dtype:  # the kernel rounds U to X's dtype anyway: once here (K x R), so that its
        u_kr = u_kr.to(x.dtype)          # tiles feed the tensor cores from the pipelined buffers
    s_arg = s if s is not None else out  # placeholder pointer, never dereferenced
    u_arg = u_kr if fused else e_rn
    # per-row-block partials of the reductions (row pid_m of a (blocks, D) buffer), summed in a fixed order
    blocks = triton.cdiv(M, MIN_BLOCK_M)
    in_dot_buf = x.new_zeros((blocks, K), dtype=torch.float32) if in_dot is not None else None
    in_sum_buf = x.new_zeros((blocks, K), dtype=torch.float32) if in_sum is not None else None
    out_dot_buf = x.new_zeros((blocks, N), dtype=torch.float32) if out_dot is not None else None
    q, p = (in_dot[0] if in_dot else None), (out_dot[0] if out_dot else None)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    def ptr(t):
        return t if t is not None else out  # placeholder pointer, never dereferenced

    launch(lora_gemm_kernel)[grid](
        x, w_kn, bias if bias is not None else x, s_arg, u_arg, scale if scale is not None else out, e_rn, out,
        seed if seed is not None else out,
        ptr(in_scale), ptr(out_scale), ptr(z), ptr(q), ptr(p), ptr(in_dot_buf), ptr(in_sum_buf), ptr(out_dot_buf),
        ptr(s_bias), ptr(residual),
        M, N, K, R,
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), *strides2(s), *strides2(u_kr),
        e_rn.stride(0), e_rn.stride(1), out.stride(0), out.stride(1),
        *strides2(z), *strides2(q), *strides2(p), *strides2(residual),
        threshold, inv_keep, bucket(M),
        HAS_BIAS=bias is not None, FUSED_SHRINK=fused, WRITE_S=bool(write_s and fused),
        MASK_LORA=seed is not None, IN_SCALE=in_scale is not None, OUT_SCALE=out_scale is not None,
        SCALE_BIAS=bool(scale_bias), WRITE_Z=z is not None, IN_DOT=in_dot is not None, IN_SUM=in_sum is not None,
        OUT_DOT=out_dot is not None, S_ACT=int(s_act), S_BIAS=s_bias is not None, RESIDUAL=residual is not None,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r, R_CHUNKS=0 if fused else triton.cdiv(R, block_r),
    )
    for buf, dst in ((in_dot_buf, in_dot and in_dot[1]), (in_sum_buf, in_sum), (out_dot_buf, out_dot and out_dot[1])):
        if buf is not None:
            torch.sum(buf, 0, out=dst)
    return out


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


HOPPER_SMS = 132  # an H100/H200 SXM: the persistent grid of the ahead-of-time compile


def _persistent_programs(x) -> int:
    """Programs of a persistent grid: one per SM on CUDA; an H100's count when compiling ahead of time (meta
    tensors); 3 under the interpreter, so that each program walks several tiles."""
    if x.device.type == "cuda":
        return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 3 if interpreting() else HOPPER_SMS


def _default_target(x) -> int:
    """Two programs per SM on CUDA (as ops/_common.target_programs); 4 under the interpreter."""
    if x.device.type != "cuda":
        return 4
    return 2 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def shrink_splits(M: int, K: int, R: int, target_programs: int) -> int:
    """How many K ranges the shrink is cut into so that about `target_programs` programs run when the row blocks
    (counted at 64 rows, the smallest tensor-core row block of Hopper) are too few; each range keeps at least
    two K steps of the widest BLOCK_K."""
    tiles = triton.cdiv(M, 64) * triton.cdiv(R, pow2_at_least_16(R, 64))
    if tiles >= target_programs:
        return 1
    return max(1, min(triton.cdiv(target_programs, tiles), K // (2 * _split_align())))


def _split_align() -> int:
    return max(c.kwargs["BLOCK_K"] for c in shrink_configs())


def shrink(x, u_kr, s_out, *, seed=None, threshold=0, inv_keep=1.0, target_programs=None, splits=None):
    """s_out (M, R) float32 = (x ⊙ keep / (1-p)) (M, K) @ u_kr (K, R); no mask without a seed.

    When the row blocks alone are too few to fill the GPU (`target_programs`, default two per SM), K is split
    into ranges whose float32 partials are then added up in a fixed order (deterministic, no atomics).
    """
    M, K = x.shape
    R = u_kr.shape[1]
    block_r = pow2_at_least_16(R, 64)
    if u_kr.dtype != x.dtype:  # the kernel rounds U to X's dtype anyway: once here (K x R), so that its tiles
        u_kr = u_kr.to(x.dtype)  # feed the tensor cores from the pipelined buffers
    if splits is None:
        splits = shrink_splits(M, K, R, target_programs or _default_target(x))
    align = _split_align()
    k_per_split = triton.cdiv(triton.cdiv(K, splits), align) * align
    splits = max(1, triton.cdiv(K, k_per_split))
    if splits > 1:
        target = torch.empty((splits, M, R), device=x.device, dtype=torch.float32)
        strides = (target.stride(0), target.stride(1), target.stride(2))
    else:
        target, strides = s_out, (0, s_out.stride(0), s_out.stride(1))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r), splits)

    launch(lora_shrink_kernel)[grid](
        x, u_kr, target, seed if seed is not None else s_out,
        M, K, R, k_per_split,
        x.stride(0), x.stride(1), u_kr.stride(0), u_kr.stride(1), *strides,
        threshold, inv_keep, bucket(M),
        DROPOUT=seed is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )
    if splits > 1:
        torch.sum(target, 0, out=s_out)
    return s_out


REDUCE_BLOCK_D = 64


def reduce_splits(M: int, D: int, R: int, target_programs: int) -> int:
    """How many row ranges a reduction is split into so that about `target_programs` programs run."""
    programs = triton.cdiv(D, REDUCE_BLOCK_D) * triton.cdiv(R, pow2_at_least_16(R, 64))
    if programs >= target_programs or M <= 256:
        return 1
    return max(1, min(triton.cdiv(target_programs, programs), triton.cdiv(M, 256)))


def reduce(x, s, scale, c_dr, *, colsum=None, seed=None, threshold=0, inv_keep=1.0, splits=1):
    """c_dr (D, R) = (x ⊙ keep / (1-p))ᵀ (D, M) @ (s ⊙ scale) (M, R); colsum (D,) float32 = Σ_m x.

    With splits > 1 the rows are cut into that many ranges, each summed into a float32 partial that is
    then added up in a fixed order (deterministic, no atomics).
    """
    M, D = x.shape
    R = s.shape[1]
    block_r = pow2_at_least_16(R, 64)
    rows_per_split = triton.cdiv(M, splits)
    if splits > 1:
        partial = torch.empty((splits, D, R), device=x.device, dtype=torch.float32)
        target, strides = partial, (partial.stride(0), partial.stride(1), partial.stride(2))
    else:
        target, strides = c_dr, (0, c_dr.stride(0), c_dr.stride(1))
    colsum_buf = None
    if colsum is not None:
        colsum_buf = colsum if splits == 1 else torch.empty((splits, D), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(D, REDUCE_BLOCK_D), triton.cdiv(R, block_r), splits)

    launch(lora_reduce_kernel)[grid](
        x, s, scale, target, colsum_buf if colsum_buf is not None else scale, seed if seed is not None else scale,
        M, D, R, rows_per_split,
        x.stride(0), x.stride(1), s.stride(0), s.stride(1), *strides,
        threshold, inv_keep, bucket(M),
        DROPOUT=seed is not None, HAS_COLSUM=colsum is not None, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_D=REDUCE_BLOCK_D, BLOCK_R=block_r,
    )
    if splits > 1:
        c_dr.copy_(partial.sum(0))
        if colsum is not None:
            colsum.copy_(colsum_buf.sum(0))
    return c_dr
