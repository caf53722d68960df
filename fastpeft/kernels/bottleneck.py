"""Triton kernels of the fused bottleneck adapter (oracle: fastpeft/reference/bottleneck.py) and their launchers.

One program owns BLOCK_M rows and walks the hidden dimension d in BLOCK_D chunks; the bottleneck (m <= 256
columns, padded to M_PAD, a power of two) stays in float32 registers between the passes:

* ``bottleneck_fwd``: one pass over d reads x and accumulates S = h W_dᵀ (h = x, or LN(x) with `ln_before`);
  a second pass forms U = s ⊙ (f(S + b_d) W_uᵀ + b_u) chunk by chunk and stores y = U (+ r). x and r are read
  once, y written once; S (and the row mean and rstd) are written only when the backward pass needs them.
  The layer norm before the adapter is applied algebraically, so x is read once (shifted by p, the mean of the
  row's first BLOCK_D elements, for the variance and the product alike: x − p is about as large as x − μ, so
  rounding (x − p) ⊙ γ to the input dtype costs what PyTorch's rounding of LN(x) costs, whatever the mean):
      LN(x) W_dᵀ = rstd · ((x − p)⊙γ) W_dᵀ − rstd · (μ − p) · (γ W_dᵀ) + β W_dᵀ
  with the m-vectors γW_dᵀ and βW_dᵀ computed by the caller.
  With `ln_after`, pass 2 stores the pre-norm z = U (+ r when the residual comes before that norm) and sums z and
  z² per row in float32 (shifted by the mean of the row's first chunk of z, as above); a third pass re-reads the
  row block's z from y (just written by this program: in L2) and writes y = (z − μ_a) rstd_a ⊙ γ_a + β_a (+ r,
  re-read, when the residual comes after the norm). The rows' (μ_a, rstd_a) are saved for the backward pass.
* ``bottleneck_bwd``: one pass over d reads dY and accumulates G = (dY ⊙ s) W_u; then, in registers, with S
  from the forward (M x m float32 is 4m bytes a row, re-reading x to recompute it 2d: at m = d/16 storing is
  the cheaper, and it leaves x unread here),
      F = f(S + b_d),  dS = G ⊙ f'(S + b_d)
  (F and dS are stored, M x m float32, for the weight gradients; for a one-element learned s the row sums
  Σ_j (dY W_u)_j F_j, its gradient without the bias term) and a second pass writes dx = dS W_d, or with
  `ln_before` (x re-read for x̂ = (x − μ) rstd; the row sums come from m-vectors, no extra pass):
      dx = rstd · (γ ⊙ (dS W_d) − c₁ − x̂ c₂),   c₁ = dS·(γW_dᵀ) / d,   c₂ = dS·(S − βW_dᵀ) / d
  and stores dS ⊙ rstd for dW_d = γ ⊙ ((dS ⊙ rstd)ᵀ x − ((dS ⊙ rstd)ᵀ μ)) + β ⊗ Σ dS.
  With `ln_after`, dY first goes through that layer norm's backward: F = f(S + b_d) is formed before the passes
  and ẑ = (s ⊙ (F W_uᵀ + b_u) (+ r) − μ_a) rstd_a recomputed chunk by chunk (one more dot per chunk; r re-read
  when it was added before the norm). A pass 0 over d sums c₁ = mean(γ_a ⊙ dY) and c₂ = mean(γ_a ⊙ dY ⊙ ẑ) per
  row and writes, per 16 rows, the sums of dY ⊙ ẑ and dY (dγ_a, dβ_a: the caller sums those few rows); pass 1
  then uses dz = rstd_a · (γ_a ⊙ dY − c₁ − ẑ c₂) in place of dY and stores it when asked (the upward gradients
  dW_u, db_u, ds, and the residual's gradient when the residual came before the norm, read it).

The weight gradients (dW_u = s ⊙ dzᵀ F, dW_d = dSᵀ h) are column reductions over the rows: the deterministic split
reduction kernel of fastpeft/kernels/lora.py. Accumulation is float32; the tiles of the weights are cast to the
activation dtype for the tensor-core dots.
"""
from __future__ import annotations

from ._activation import activation, activation_slope
from ._compat import dot_precision, interpreting, launch, tl, triton
from ._tiles import bucket, fit_shared, pow2_at_least_16, strides2
from .limits import BOTTLENECK_MAX_WIDTH


def width_pad(m: int) -> int:
    """M_PAD: the bottleneck width as a power of two, at least 16 (the smallest tensor-core dot dimension)."""
    return pow2_at_least_16(m, BOTTLENECK_MAX_WIDTH)


# ----------------------------------------------------------------------------------------------------------
# Autotune configurations: (BLOCK_M, BLOCK_D, warps, stages). Pruned per launch by the registers the
# (BLOCK_M x M_PAD) float32 tiles take, and by shared memory.
# ----------------------------------------------------------------------------------------------------------

_SHAPES = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (64, 32, 8, 3), (32, 64, 8, 3),
           (32, 32, 8, 3), (32, 64, 4, 4), (32, 128, 4, 3), (32, 32, 4, 3), (16, 128, 4, 3), (16, 64, 4, 3),
           (16, 32, 4, 2)]


def configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_D": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s) for bm, bd, w, s in _SHAPES]


# Registers per thread held by the live tiles, at most: float32 (BLOCK_M x M_PAD) tiles (one in the forward: S;
# two in the backward: G and S, with f and f' formed from them), the bottleneck tile as a dot operand in the input
# dtype, and the (BLOCK_M x BLOCK_D) accumulator. Measured with ptxas for sm_90 (cuobjdump -res-usage): tiles
# over this budget spill (STACK > 0), those within it do not. The backward with the layer norm after holds two
# more float32 (BLOCK_M x BLOCK_D) tiles in its first pass (ẑ and dz beside dY).
REGISTER_BUDGET = 112
# The plain backward (no layer norm, no learned scale: only G and S live after pass 1) with an activation whose
# slope needs no transcendental recomputed from S + b_d (linear, relu, tanh, sigmoid, leaky relu: f' from f or a
# comparison) also fits a 64-row block on 8 warps (two warpgroups splitting the bottleneck's columns) at m = 256:
# model 176 (64x64) and 168 (64x32), ptxas 196-253 registers on sm_90 and 219-255 on sm_80, no spill (wgmma on
# sm_90, one group in flight in pass 1). gelu, gelu_new and swish recompute erf / sigmoid from z beside f and spill
# there (16-168 B); so do the learned scale (124-152 B), ln_before (192-532 B) and ln_after (20-596 B). Where the
# 64-row blocks apply, the 32x32 block on 8 warps is dropped: ptxas caps it at 128 registers (two blocks an SM) and
# spills 20 B on sm_90.
PLAIN_BWD_BUDGET = 176
_CHEAP_SLOPES = (0, 1, 5, 6, 7)


def _live_registers(which: str, c, m_pad: int, el: int, ln_after: bool = False) -> float:
    bm, threads = c.kwargs["BLOCK_M"], 32 * c.num_warps
    f32_tiles = 1 if which == "fwd" else 2
    chunk_tiles = 3 if which == "bwd" and ln_after else 1
    return (bm * m_pad * (f32_tiles + el / 4) + chunk_tiles * bm * c.kwargs["BLOCK_D"]) / threads


def _pruner(which: str):
    def prune(configs, named_args, **kwargs):
        """Drop tiles much taller than the problem and those whose live tiles would spill registers; fit the
        rest in shared memory (the larger of the two passes' pipelined operand tiles)."""
        args = {**named_args, **kwargs}
        m_pad, rows = args["M_PAD"], args["M_BUCKET"]
        a_el = args["x_ptr" if which == "fwd" else "dy_ptr"].element_size()
        w_el = max(args["wd_ptr"].element_size(), args["wu_ptr"].element_size())
        short = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * rows)] or configs[-1:]
        ln_after = bool(args.get("LN_AFTER"))
        plain = (which == "bwd" and not (ln_after or args.get("LN_BEFORE") or args.get("ROW_DOT"))
                 and args.get("ACT", 0) in _CHEAP_SLOPES)

        def budget(c):
            wide = plain and c.kwargs["BLOCK_M"] == 64 and c.num_warps == 8
            return PLAIN_BWD_BUDGET if wide else REGISTER_BUDGET

        live = {id(c): _live_registers(which, c, m_pad, a_el, ln_after) for c in short}
        light = [c for c in short if live[id(c)] <= budget(c)] or short[-1:]
        if any(live[id(c)] > REGISTER_BUDGET for c in light):  # 64x32 w8 replaces 32x32 w8 (capped at 128 regs)
            light = [c for c in light if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.num_warps) != (32, 32, 8)]
        extra = 1 if which == "bwd" and ln_after and args.get("HAS_RES") else 0  # the residual's chunk beside dY's

        def stage_bytes(c):
            bm, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"]
            return bd * (bm * a_el * (1 + extra) + m_pad * w_el)

        return fit_shared(light, stage_bytes) or fit_shared(configs[-1:], stage_bytes)

    return prune


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.autotune(configs=configs(), key=["M_BUCKET", "D", "M_PAD", "LN_BEFORE", "LN_AFTER", "WRITE_S"],
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def bottleneck_fwd_kernel(
    x_ptr, res_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, scale_ptr, lnw_ptr, gwd_ptr, bwd_ptr, y_ptr, s_ptr, stats_ptr,
    law_ptr, lab_ptr, astats_ptr,
    M, D, R,
    stride_xm, stride_xd, stride_rm, stride_rd, stride_wdr, stride_wdd, stride_wud, stride_wur,
    stride_ym, stride_yd, stride_scale, scale_value, eps, M_BUCKET,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr,
    SCALE_MODE: tl.constexpr, LN_BEFORE: tl.constexpr, LN_AFTER: tl.constexpr, RES_AFTER_LN: tl.constexpr,
    WRITE_S: tl.constexpr, DOT_PRECISION: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_in = rm % M  # rows past M re-read valid rows; their results are never stored
    row_ok = rm < M
    rr = tl.arange(0, M_PAD)
    r_ok = rr < R
    rd = tl.arange(0, BLOCK_D)
    dtype = x_ptr.dtype.element_ty

    # Pass 1: S = h W_dᵀ, x read once.
    acc = tl.zeros((BLOCK_M, M_PAD), dtype=tl.float32)
    if LN_BEFORE:
        # shift p: the mean of the row's first chunk (read again, from cache, in the loop)
        first = tl.load(x_ptr + rm_in[:, None] * stride_xm + rd[None, :] * stride_xd, mask=rd[None, :] < D,
                        other=0.0)
        pivot = tl.sum(first.to(tl.float32), axis=1) / tl.minimum(D, BLOCK_D)
        sum_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_xx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + rd
        d_ok = dc < D
        a = tl.load(x_ptr + rm_in[:, None] * stride_xm + dc[None, :] * stride_xd, mask=d_ok[None, :], other=0.0)
        if LN_BEFORE:
            xs = tl.where(d_ok[None, :], a.to(tl.float32) - pivot[:, None], 0.0)
            sum_x += tl.sum(xs, axis=1)
            sum_xx += tl.sum(xs * xs, axis=1)
            gamma = tl.load(lnw_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)
            a = (xs * gamma[None, :]).to(dtype)
        w = tl.load(wd_ptr + rr[None, :] * stride_wdr + dc[:, None] * stride_wdd,
                    mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(a, w.to(dtype), acc, input_precision=DOT_PRECISION)
    if LN_BEFORE:
        shift = sum_x / D  # μ − p
        rstd = tl.rsqrt(tl.maximum(sum_xx / D - shift * shift, 0.0) + eps)
        gwd = tl.load(gwd_ptr + rr, mask=r_ok, other=0.0)
        bwd = tl.load(bwd_ptr + rr, mask=r_ok, other=0.0)
        acc = rstd[:, None] * (acc - shift[:, None] * gwd[None, :]) + bwd[None, :]
        if WRITE_S:
            tl.store(stats_ptr + rm * 2, pivot + shift, mask=row_ok)
            tl.store(stats_ptr + rm * 2 + 1, rstd, mask=row_ok)
    if WRITE_S:
        tl.store(s_ptr + rm[:, None] * R + rr[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])
    if HAS_BD:
        acc += tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    f = tl.where(r_ok[None, :], activation(acc, ACT), 0.0).to(dtype)
    if SCALE_MODE == 1:
        scale_value = tl.load(scale_ptr).to(tl.float32)

    # Pass 2: y = s ⊙ (f W_uᵀ + b_u) (+ r), chunk by chunk; with ln_after, the pre-norm z (r added only before
    # the norm) and its row sums, shifted by the mean of the row's first chunk.
    if LN_AFTER:
        pivot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_zz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + rd
        d_ok = dc < D
        wu = tl.load(wu_ptr + dc[None, :] * stride_wud + rr[:, None] * stride_wur,
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        up = _up_chunk(f, wu, bu_ptr, scale_ptr, res_ptr, rm_in, dc, d_ok, stride_rm, stride_rd, stride_scale,
                       scale_value, HAS_BU, SCALE_MODE, HAS_RES and not RES_AFTER_LN, DOT_PRECISION)
        if LN_AFTER:
            pivot = tl.where(d0 == 0, tl.sum(up, axis=1) / tl.minimum(D, BLOCK_D), pivot)
            zs = tl.where(d_ok[None, :], up - pivot[:, None], 0.0)
            sum_z += tl.sum(zs, axis=1)
            sum_zz += tl.sum(zs * zs, axis=1)
        tl.store(y_ptr + rm[:, None] * stride_ym + dc[None, :] * stride_yd, up.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])

    # Pass 3 (ln_after): y = (z − μ) rstd ⊙ γ + β (+ r), z re-read from y (this program's own rows, just written).
    if LN_AFTER:
        shift_a = sum_z / D
        mean_a = pivot + shift_a
        rstd_a = tl.rsqrt(tl.maximum(sum_zz / D - shift_a * shift_a, 0.0) + eps)
        if WRITE_S:
            tl.store(astats_ptr + rm * 2, mean_a, mask=row_ok)
            tl.store(astats_ptr + rm * 2 + 1, rstd_a, mask=row_ok)
        tl.debug_barrier()  # the other threads' stores of pass 2 are visible to this block's loads
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + rd
            d_ok = dc < D
            ok = row_ok[:, None] & d_ok[None, :]
            yp = y_ptr + rm[:, None] * stride_ym + dc[None, :] * stride_yd
            z = tl.load(yp, mask=ok, other=0.0).to(tl.float32)
            gamma = tl.load(law_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)
            beta = tl.load(lab_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)
            out = (z - mean_a[:, None]) * rstd_a[:, None] * gamma[None, :] + beta[None, :]
            if HAS_RES and RES_AFTER_LN:
                out += tl.load(res_ptr + rm_in[:, None] * stride_rm + dc[None, :] * stride_rd, mask=d_ok[None, :],
                               other=0.0).to(tl.float32)
            tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _up_chunk(f, wu, bu_ptr, scale_ptr, res_ptr, rm_in, dc, d_ok, stride_rm, stride_rd, stride_scale, scale_value,
              HAS_BU: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_RES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z = s ⊙ (F W_uᵀ + b_u) (+ r) on one chunk of columns (float32; zero past D), from F in the dot dtype and
    the (M_PAD x BLOCK_D) tile of W_uᵀ."""
    up = tl.dot(f, wu.to(f.dtype), input_precision=DOT_PRECISION)
    if HAS_BU:
        up += tl.load(bu_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE_MODE == 2:
        up *= tl.load(scale_ptr + dc * stride_scale, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    else:
        up *= scale_value
    if HAS_RES:
        up += tl.load(res_ptr + rm_in[:, None] * stride_rm + dc[None, :] * stride_rd, mask=d_ok[None, :],
                      other=0.0).to(tl.float32)
    return tl.where(d_ok[None, :], up, 0.0)


@triton.autotune(configs=configs(),
                 key=["M_BUCKET", "D", "M_PAD", "LN_BEFORE", "LN_AFTER", "NEED_DX", "ACT", "ROW_DOT"],
                 prune_configs_by={"early_config_prune": _pruner("bwd")})
@triton.jit
def bottleneck_bwd_kernel(
    dy_ptr, x_ptr, s_ptr, stats_ptr, wd_ptr, bd_ptr, wu_ptr, scale_ptr, lnw_ptr, gwd_ptr, bwd_ptr,
    f_ptr, ds_ptr, dsr_ptr, dx_ptr, rowdot_ptr,
    bu_ptr, res_ptr, law_ptr, astats_ptr, dz_ptr, part_ptr,
    M, D, R,
    stride_gm, stride_gd, stride_xm, stride_xd, stride_wdr, stride_wdd, stride_wud, stride_wur,
    stride_dxm, stride_dxd, stride_rm, stride_rd, stride_zm, stride_zd, stride_scale, scale_value, M_BUCKET,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, SCALE_MODE: tl.constexpr, LN_BEFORE: tl.constexpr,
    NEED_DX: tl.constexpr, WRITE_F: tl.constexpr, WRITE_DS: tl.constexpr, ROW_DOT: tl.constexpr,
    LN_AFTER: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DZ: tl.constexpr,
    WRITE_PART: tl.constexpr, DOT_PRECISION: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_in = rm % M
    row_ok = rm < M
    rr = tl.arange(0, M_PAD)
    r_ok = rr < R
    rd = tl.arange(0, BLOCK_D)
    dtype = dy_ptr.dtype.element_ty
    if SCALE_MODE == 1:
        scale_value = tl.load(scale_ptr).to(tl.float32)

    # Pass 0 (ln_after): the row sums of the layer norm's backward, ẑ recomputed from F = f(S + b_d):
    # c₁ = mean_k(γ ⊙ dY), c₂ = mean_k(γ ⊙ dY ⊙ ẑ); and the 16-row partial sums of dY ⊙ ẑ and dY (dγ, dβ).
    if LN_AFTER:
        za = tl.load(s_ptr + rm_in[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
        if HAS_BD:
            za += tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        fa = tl.where(r_ok[None, :], activation(za, ACT), 0.0).to(dtype)
        mean_a = tl.load(astats_ptr + rm_in * 2)
        rstd_a = tl.load(astats_ptr + rm_in * 2 + 1)
        c1a = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c2a = tl.zeros((BLOCK_M,), dtype=tl.float32)
        slot = pid * (BLOCK_M // 16) + tl.arange(0, BLOCK_M // 16)
        slot_ok = slot < (M + 15) // 16
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + rd
            d_ok = dc < D
            wu = tl.load(wu_ptr + dc[None, :] * stride_wud + rr[:, None] * stride_wur,
                         mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            z = _up_chunk(fa, wu, bu_ptr, scale_ptr, res_ptr, rm_in, dc, d_ok, stride_rm, stride_rd, stride_scale,
                          scale_value, HAS_BU, SCALE_MODE, HAS_RES, DOT_PRECISION)
            zhat = tl.where(d_ok[None, :], (z - mean_a[:, None]) * rstd_a[:, None], 0.0)
            dyv = tl.load(dy_ptr + rm_in[:, None] * stride_gm + dc[None, :] * stride_gd, mask=d_ok[None, :],
                          other=0.0).to(tl.float32)
            gdy = dyv * tl.load(law_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            c1a += tl.sum(gdy, axis=1)
            c2a += tl.sum(gdy * zhat, axis=1)
            if WRITE_PART:
                dyr = tl.where(row_ok[:, None], dyv, 0.0)
                p_ok = slot_ok[:, None] & d_ok[None, :]
                part = part_ptr + slot[:, None] * (2 * D) + dc[None, :]
                tl.store(part, tl.sum(tl.reshape(dyr * zhat, (BLOCK_M // 16, 16, BLOCK_D)), axis=1), mask=p_ok)
                tl.store(part + D, tl.sum(tl.reshape(dyr, (BLOCK_M // 16, 16, BLOCK_D)), axis=1), mask=p_ok)
        c1a = c1a / D
        c2a = c2a / D

    # Pass 1: G = (dz ⊙ s) W_u (a scalar s is applied after the loop); dz = dY, or with ln_after
    # dz = rstd_a · (γ ⊙ dY − c₁ − ẑ c₂) (stored when asked for: the upward gradients and dr use it).
    g = tl.zeros((BLOCK_M, M_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + rd
        d_ok = dc < D
        a = tl.load(dy_ptr + rm_in[:, None] * stride_gm + dc[None, :] * stride_gd, mask=d_ok[None, :], other=0.0)
        if LN_AFTER:
            wu = tl.load(wu_ptr + dc[None, :] * stride_wud + rr[:, None] * stride_wur,
                         mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            z = _up_chunk(fa, wu, bu_ptr, scale_ptr, res_ptr, rm_in, dc, d_ok, stride_rm, stride_rd, stride_scale,
                          scale_value, HAS_BU, SCALE_MODE, HAS_RES, DOT_PRECISION)
            gamma = tl.load(law_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)
            dzv = (gamma[None, :] * a.to(tl.float32) - c1a[:, None]
                   - (z - mean_a[:, None]) * rstd_a[:, None] * c2a[:, None]) * rstd_a[:, None]
            dzv = tl.where(d_ok[None, :], dzv, 0.0)
            if WRITE_DZ:
                tl.store(dz_ptr + rm[:, None] * stride_zm + dc[None, :] * stride_zd, dzv.to(dz_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & d_ok[None, :])
            if SCALE_MODE == 2:
                dzv *= tl.load(scale_ptr + dc * stride_scale, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            a = dzv.to(dtype)
            w = tl.trans(wu)
        else:
            if SCALE_MODE == 2:
                sc = tl.load(scale_ptr + dc * stride_scale, mask=d_ok, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * sc[None, :]).to(dtype)
            w = tl.load(wu_ptr + dc[:, None] * stride_wud + rr[None, :] * stride_wur,
                        mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.dot(a, w.to(dtype), g, input_precision=DOT_PRECISION)

    # F = f(S + b_d), dS = G ⊙ f'(S + b_d), in registers.
    tile = rm[:, None] * R + rr[None, :]
    tile_ok = row_ok[:, None] & r_ok[None, :]
    s = tl.load(s_ptr + rm_in[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
    z = s
    if HAS_BD:
        z += tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    f = activation(z, ACT)
    if ROW_DOT:  # Σ_j (dY W_u)_j F_j per row: a scalar s's gradient, in float32 (no rounding of F)
        tl.store(rowdot_ptr + rm, tl.sum(tl.where(r_ok[None, :], g * f, 0.0), axis=1), mask=row_ok)
    if SCALE_MODE != 2:
        g *= scale_value
    ds = tl.where(r_ok[None, :], g * activation_slope(z, f, ACT), 0.0)
    if WRITE_F:
        tl.store(f_ptr + tile, f, mask=tile_ok)
    if WRITE_DS:
        tl.store(ds_ptr + tile, ds, mask=tile_ok)
    if LN_BEFORE:
        mean = tl.load(stats_ptr + rm_in * 2)
        rstd = tl.load(stats_ptr + rm_in * 2 + 1)
        if WRITE_DS:
            tl.store(dsr_ptr + tile, ds * rstd[:, None], mask=tile_ok)
        gwd = tl.load(gwd_ptr + rr, mask=r_ok, other=0.0)
        bwd = tl.load(bwd_ptr + rr, mask=r_ok, other=0.0)
        c1 = tl.sum(ds * gwd[None, :], axis=1) / D                    # mean_k γ_k dh_k
        c2 = tl.sum(ds * (s - bwd[None, :]), axis=1) / D              # mean_k γ_k dh_k x̂_k

    # Pass 2: dx = dS W_d (through the layer norm's backward with ln_before).
    if NEED_DX:
        dsb = ds.to(dtype)
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + rd
            d_ok = dc < D
            w = tl.load(wd_ptr + rr[:, None] * stride_wdr + dc[None, :] * stride_wdd,
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            dh = tl.dot(dsb, w.to(dtype), input_precision=DOT_PRECISION)
            if LN_BEFORE:
                gamma = tl.load(lnw_ptr + dc, mask=d_ok, other=0.0).to(tl.float32)
                xv = tl.load(x_ptr + rm_in[:, None] * stride_xm + dc[None, :] * stride_xd, mask=d_ok[None, :],
                             other=0.0).to(tl.float32)
                xhat = (xv - mean[:, None]) * rstd[:, None]
                dh = rstd[:, None] * (gamma[None, :] * dh - c1[:, None] - xhat * c2[:, None])
            tl.store(dx_ptr + rm[:, None] * stride_dxm + dc[None, :] * stride_dxd, dh.to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers: x, r, y, dY, dx are (M, d) views; w_down (m, d), w_up (d, m); S, F, dS, dS ⊙ rstd are contiguous
# (M, m) float32; stats contiguous (M, 2) float32 (mean, rstd); act a code of limits.ACTIVATIONS. Optional operands
# are None.
# ----------------------------------------------------------------------------------------------------------

def _scale_args(scale):
    """(pointer, stride, SCALE_MODE) for a scale given as None (the number scale_value: mode 0), a (1,) tensor
    (mode 1) or a (d,) tensor (mode 2)."""
    if scale is None:
        return None, 0, 0
    if scale.numel() == 1:
        return scale, 0, 1
    return scale, scale.stride(0), 2


def forward(x, residual, w_down, b_down, w_up, b_up, y, *, act=0, scale=None, scale_value=1.0, ln=None, eps=1e-5,
            s=None, stats=None, ln_after=None, residual_after_ln=False, astats=None):
    """y = s ⊙ (f(h W_dᵀ + b_d) W_uᵀ + b_u) (+ residual), h = x or LN(x); with ln_after = (γ, β) (both (d,)),
    y = LN_after(s ⊙ (...) + residual), or LN_after(s ⊙ (...)) + residual when residual_after_ln.

    scale: a (1,) or (d,) tensor, or None for the number `scale_value`. ln: (γ (d,), γW_dᵀ (m,) float32,
    βW_dᵀ (m,) float32) for the layer norm before the adapter. s (M, m) and, with ln, stats (M, 2) receive
    S = h W_dᵀ and the row mean and rstd when given (the backward pass reads them); with ln_after, astats (M, 2)
    receives the rows' mean and rstd of the layer norm after (written when s is given).
    """
    M, D = x.shape
    R = w_down.shape[0]
    assert R <= BOTTLENECK_MAX_WIDTH, "bottleneck wider than BOTTLENECK_MAX_WIDTH: use the two-kernel path"
    scale_ptr, stride_scale, scale_mode = _scale_args(scale)
    lnw, gwd, bwd = ln if ln is not None else (None, None, None)
    law, lab = ln_after if ln_after is not None else (None, None)
    write_s = s is not None
    assert not (write_s and ln_after is not None and astats is None), "the backward pass needs astats"

    def ptr(t):
        return t if t is not None else y  # placeholder pointer, never dereferenced

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    launch(bottleneck_fwd_kernel)[grid](
        x, ptr(residual), w_down, ptr(b_down), w_up, ptr(b_up), ptr(scale_ptr), ptr(lnw), ptr(gwd), ptr(bwd), y,
        ptr(s), ptr(stats), ptr(law), ptr(lab), ptr(astats),
        M, D, R,
        x.stride(0), x.stride(1), *strides2(residual), w_down.stride(0), w_down.stride(1),
        w_up.stride(0), w_up.stride(1), y.stride(0), y.stride(1), stride_scale, float(scale_value), float(eps),
        bucket(M),
        ACT=int(act), HAS_BD=b_down is not None, HAS_BU=b_up is not None, HAS_RES=residual is not None,
        SCALE_MODE=scale_mode, LN_BEFORE=ln is not None, LN_AFTER=ln_after is not None,
        RES_AFTER_LN=bool(residual_after_ln) and ln_after is not None, WRITE_S=write_s,
        DOT_PRECISION=dot_precision(x.dtype), M_PAD=width_pad(R),
    )
    return y


def backward(dy, s, w_down, b_down, w_up, *, act=0, scale=None, scale_value=1.0, f=None, ds=None, dx=None,
             x=None, ln=None, stats=None, dsr=None, rowdot=None, ln_after=None, b_up=None, residual=None,
             astats=None, dz=None, part=None):
    """From dY (M, d) and the forward's S: F = f(S + b_d) into `f`, dS = ((dz ⊙ s) W_u) ⊙ f'(S + b_d) into `ds`,
    dx = dS W_d (or its layer-norm backward) into `dx`, and (a scalar s only) Σ_j (dz W_u ⊙ F)_j per row into
    `rowdot` (M,) float32; each only when given. dz = dY, or with ln_after the layer norm's input gradient.

    ln: (γ, γW_dᵀ, βW_dᵀ) as in `forward`, with x (M, d), stats (M, 2), and `dsr` receiving dS ⊙ rstd.
    ln_after: the layer norm after's γ (d,), with the forward's astats (M, 2), b_up, and the residual when it
    was added before that norm (ẑ is recomputed from S); `dz` (M, d) receives dz, `part` (⌈M/16⌉, 2, d) float32
    the sums over each 16 rows of dY ⊙ ẑ and dY (dγ_after and dβ_after are its column sums).
    """
    M, D = dy.shape
    R = w_down.shape[0]
    assert R <= BOTTLENECK_MAX_WIDTH, "bottleneck wider than BOTTLENECK_MAX_WIDTH: use the two-kernel path"
    scale_ptr, stride_scale, scale_mode = _scale_args(scale)
    assert rowdot is None or scale_mode != 2, "rowdot is the gradient of a scalar scale"
    assert ln_after is None or astats is not None, "the layer norm after needs the forward's astats"
    assert part is None or part.shape == ((M + 15) // 16, 2, D) and part.is_contiguous()
    lnw, gwd, bwd = ln if ln is not None else (None, None, None)
    x_arg = x if x is not None else dy

    def ptr(t):
        return t if t is not None else s  # placeholder pointer, never dereferenced

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    launch(bottleneck_bwd_kernel)[grid](
        dy, x_arg, s, ptr(stats), w_down, ptr(b_down), w_up, ptr(scale_ptr), ptr(lnw), ptr(gwd), ptr(bwd),
        ptr(f), ptr(ds), ptr(dsr), dx if dx is not None else dy, ptr(rowdot),
        ptr(b_up), residual if residual is not None else dy, ptr(ln_after), ptr(astats), dz if dz is not None else dy,
        ptr(part),
        M, D, R,
        dy.stride(0), dy.stride(1), x_arg.stride(0), x_arg.stride(1), w_down.stride(0), w_down.stride(1),
        w_up.stride(0), w_up.stride(1), *strides2(dx), *strides2(residual), *strides2(dz), stride_scale,
        float(scale_value), bucket(M),
        ACT=int(act), HAS_BD=b_down is not None, SCALE_MODE=scale_mode, LN_BEFORE=ln is not None,
        NEED_DX=dx is not None, WRITE_F=f is not None, WRITE_DS=ds is not None, ROW_DOT=rowdot is not None,
        LN_AFTER=ln_after is not None, HAS_BU=b_up is not None and ln_after is not None,
        HAS_RES=residual is not None and ln_after is not None, WRITE_DZ=dz is not None and ln_after is not None,
        WRITE_PART=part is not None and ln_after is not None,
        DOT_PRECISION=dot_precision(dy.dtype), M_PAD=width_pad(R),
    )

