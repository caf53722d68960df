"""The LoRA GEMM's Hopper path (sm_90): ``lora_gemm``'s function with the operand tiles moved by TMA and a
persistent tile order (oracle: fastpeft/reference/lora.py, through kernels/lora.py's ``gemm``).

    OUT = (X Wkn + mask ⊙ ((S ⊙ s) E) [+ bias]) ⊙ c [+ bias]

X (M, K) and W are read through tensor descriptors, made by each program once (in a small global scratch buffer
triton allocates at launch; no host-side descriptor, so torch.compile traces the launch as any other): the copy
engine fetches each (BLOCK_M, BLOCK_K) and (BLOCK_K, BLOCK_N) tile into shared memory (cp.async.bulk.tensor, no
address arithmetic in the warps, out-of-range rows and columns filled with zeros), and wgmma reads them there.
W is described as it lies in memory: nn.Linear's (N, K) (the tile is transposed for the dot, which wgmma reads
K-major at no cost) or Conv1D's / dX's (K, N).
The grid holds one program per SM; each walks the output tiles tile, tile + #SMs, ... in grouped order (GROUP_M
row tiles share a column strip of W in L2), so no wave of short-lived programs is left half-empty at the end.

The low-rank term is formed before each tile's K loop, exactly as ``lora_gemm`` forms it (S float32 from memory,
R in chunks of BLOCK_R, the dropout mask of dX), in the same accumulator the K loop then adds the base product to.
Only the variants that need nothing inside the K loop but the two tiles come here (``applies``): no fused shrink,
no input scale, no row reductions, no bottleneck activation; those stay on ``lora_gemm``.
"""
from __future__ import annotations

import torch

from ._compat import dot_precision, interpreting, launch, tl, triton
from ._tiles import bucket, fit_shared, pow2_at_least_16, strides2, tile_of
from .dropout import keep_tile, row_keys
from .lora_terms import fit_registers, lowrank_chunk

TMA_MIN_ROWS = 128  # below this the row tiles are too few to fill 132 SMs: lora_gemm's small tiles serve them
_TMA_DTYPES = (torch.bfloat16, torch.float16)


def tma_configs():
    """What autotune may pick (Hopper tiles: 64-row wgmma per warp group, 64-wide K steps of 128-byte rows, deep
    pipelines in 227 KiB of shared memory). Under the interpreter a single small config exercises partial tiles."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 64, 4, 5), (128, 64, 64, 4, 6), (64, 128, 64, 4, 6),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """lora_gemm's register rules for its heavy variants, then the pipeline depth that fits shared memory."""
    named_args = {**named_args, **kwargs}
    el = 2  # bf16 / fp16 operands only
    configs = fit_registers(configs, named_args)
    if named_args.get("WRITE_Z"):  # Z stored beside the scaled output: 128 x 256 with 8 warps spilled 16 B (sm_90)
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) <= 64
                   ] or configs[-1:]
    return fit_shared(configs, lambda c: c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * el)


@triton.autotune(configs=tma_configs(),
                 key=["M_BUCKET", "N", "K", "R", "MASK_LORA", "OUT_SCALE", "WRITE_Z", "W_NK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def lora_gemm_tma_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, scale_ptr, e_ptr, out_ptr, seed_ptr, out_scale_ptr, z_ptr,
    M, N, K, R, stride_xm, stride_w,
    stride_sm, stride_sr, stride_er, stride_en, stride_om, stride_on, stride_zm, stride_zn,
    threshold, inv_keep, M_BUCKET,
    HAS_BIAS: tl.constexpr, MASK_LORA: tl.constexpr, OUT_SCALE: tl.constexpr, SCALE_BIAS: tl.constexpr,
    WRITE_Z: tl.constexpr, W_NK: tl.constexpr, NUM_SMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    # the descriptors, made once per persistent program: X (M, K) and W as it lies, (N, K) or (K, N)
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    if W_NK:
        w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_w, 1], [BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, [K, N], [stride_w, 1], [BLOCK_K, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    for tile in range(tl.program_id(0), num_m * num_n, NUM_SMS):
        pid_m, pid_n = tile_of(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        rm_in = rm % M  # rows past M re-read valid rows; their results are never stored
        rn_in = rn % N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if R_CHUNKS <= 4:
            for c in tl.static_range(R_CHUNKS):
                acc = lowrank_chunk(acc, s_ptr, scale_ptr, e_ptr, s_ptr, rm_in, rn_in, c * BLOCK_R + rr, R,
                                     stride_sm, stride_sr, stride_er, stride_en, dtype, 0, False, DOT_PRECISION)
        else:
            for r0 in range(0, R, BLOCK_R):
                acc = lowrank_chunk(acc, s_ptr, scale_ptr, e_ptr, s_ptr, rm_in, rn_in, r0 + rr, R,
                                     stride_sm, stride_sr, stride_er, stride_en, dtype, 0, False, DOT_PRECISION)
        if MASK_LORA:
            keep = keep_tile(row_keys(seed_ptr, rm), rn, threshold)
            acc = tl.where(keep, acc * inv_keep, 0.0)

        for k in range(0, k_steps):
            a = x_desc.load([off_m, k * BLOCK_K])
            if W_NK:
                b = w_desc.load([off_n, k * BLOCK_K]).T
            else:
                b = w_desc.load([k * BLOCK_K, off_n])
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        out_mask = (rm < M)[:, None] & (rn < N)[None, :]
        if HAS_BIAS and (SCALE_BIAS or not OUT_SCALE):
            acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
        if WRITE_Z:  # the output before the output scale, kept for the backward pass
            tl.store(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, acc.to(z_ptr.dtype.element_ty),
                     mask=out_mask)
        if OUT_SCALE:
            acc = acc * tl.load(out_scale_ptr + rn_in).to(tl.float32)[None, :]
            if HAS_BIAS and not SCALE_BIAS:
                acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(dtype), mask=out_mask)


# ----------------------------------------------------------------------------------------------------------
# When the path applies, and its launcher
# ----------------------------------------------------------------------------------------------------------

def tma_layout(t: torch.Tensor) -> str | None:
    """How a 2-D operand can be described to TMA: "rows" (row-major, stride 1 along dim 1), "cols" (a transposed
    row-major tensor, stride 1 along dim 0), or None (the copy engine needs a unit stride, 16-byte aligned base
    and other stride)."""
    if t.dim() != 2 or t.data_ptr() % 16:
        return None
    el = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * el) % 16 == 0:
        return "rows"
    if t.stride(0) == 1 and (t.stride(1) * el) % 16 == 0:
        return "cols"
    return None


def applies(x, w_kn, target_cc: int | None, *, fused: bool, extras: bool) -> bool:
    """Whether ``gemm`` may run on this path: a Hopper target (compute capability 9.x), half-precision operands
    in TMA-describable layouts, at least TMA_MIN_ROWS rows and K > 0, and a variant with nothing in the K loop but
    the two tiles (`fused`: the shrink is fused; `extras`: an input scale, a row reduction or an activation)."""
    return (target_cc is not None and target_cc // 10 == 9 and not fused and not extras
            and x.dtype in _TMA_DTYPES and w_kn.dtype == x.dtype and x.shape[0] >= TMA_MIN_ROWS and x.shape[1] > 0
            and tma_layout(x) == "rows" and tma_layout(w_kn) is not None)


def gemm(x, w_kn, bias, e_rn, scale, out, *, s, num_sms: int, seed=None, threshold=0, inv_keep=1.0, out_scale=None,
         scale_bias=False, z=None):
    """lora.gemm's function on the Hopper path (the caller checked ``applies``): out (M, N) = (x @ w_kn +
    mask ⊙ ((s ⊙ scale) @ e_rn) [+ bias]) ⊙ out_scale [+ bias], `num_sms` persistent programs at most."""
    M, K = x.shape
    N = w_kn.shape[1]
    R = e_rn.shape[0]
    block_r = pow2_at_least_16(R, 64)
    w_nk = tma_layout(w_kn) == "cols"
    if x.device.type == "cuda":
        _scratch_allocator()

    def grid(meta):
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    def ptr(t):
        return t if t is not None else out  # placeholder pointer, never dereferenced

    launch(lora_gemm_tma_kernel)[grid](
        x, w_kn, ptr(bias), ptr(s), ptr(scale), e_rn, out, ptr(seed), ptr(out_scale), ptr(z),
        M, N, K, R, x.stride(0), w_kn.stride(1) if w_nk else w_kn.stride(0),
        *strides2(s), e_rn.stride(0), e_rn.stride(1), out.stride(0), out.stride(1), *strides2(z),
        threshold, inv_keep, bucket(M),
        HAS_BIAS=bias is not None, MASK_LORA=seed is not None, OUT_SCALE=out_scale is not None,
        SCALE_BIAS=bool(scale_bias), WRITE_Z=z is not None, W_NK=w_nk, NUM_SMS=num_sms,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r, R_CHUNKS=triton.cdiv(R, block_r),
    )
    return out


def _scratch_allocator() -> None:
    """Descriptors made inside a kernel live in a small global scratch buffer that triton asks an allocator for at
    launch: give it torch's caching allocator unless the program set one (per thread: a context variable)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
