"""Triton kernel of a LoRA linear on a 4-bit (bitsandbytes NF4/FP4) base weight, and its launcher.

The base weight W (N, K) stays packed: flattened row-major (f = n K + k), two 4-bit codes per byte (element f in
the high nibble of byte f // 2 when f is even, in the low nibble when f is odd), one float32 scale per block of
`blocksize` consecutive elements (blocks may span rows):

    deq(W)[n, k] = round_x(round_w(code[q_f] · absmax[f // blocksize]))

with `code` the 16-entry table (NF4 or FP4, passed as a tensor) and round_w, round_x the roundings to the dtype
bitsandbytes dequantizes to (W_DTYPE) and then to x's dtype: exactly the W that Linear4bit's forward multiplies.
With double quantization the scales are themselves 8-bit codes:

    absmax[b] = code2[absmax_u8[b]] · absmax2[b // blocksize2] + offset     (float32, the product rounded first)

One kernel, ``nf4_gemm``, serves the forward pass and dX:

    forward:  OUT (M, N) = X deq(W)ᵀ + bias + (S ⊙ s) E            S = drop(x) Aᵀ, E = Bᵀ (R, N)
    dX:       OUT (M, K) = dY deq(W) + mask ⊙ ((S ⊙ s) E)           S = G = dY B,   E = A (R, K)

The low-rank term is formed first, in the float32 accumulator the K loop then adds the base product to (as
kernels/lora.py's ``lora_gemm`` does). In the K loop each program reads the packed bytes of its W tile once
(a (rows, width / 2) byte tile split into its two nibbles), looks the codes up in the 16-entry table, multiplies
by the block scales (one per row and block-column group of the tile when K is a multiple of blocksize, one per
element otherwise), rounds, and feeds the tile to the tensor cores: W crosses memory once, at 4 bits per weight.
"""
from __future__ import annotations

import torch

from ._compat import dot_precision, interpreting, launch, tl, triton
from ._tiles import bucket, fit_shared, grouped_tile, pow2_at_least_16
from .dropout import keep_tile, row_keys
from .lora_terms import fit_registers

try:  # exact float32 products (mul.rn: never contracted into an FMA) on the GPU
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    libdevice = None

W_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the dtype W is dequantized to: constexpr code
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Autotune configurations: what autotune may pick (tests/aot.py compiles every one); one small config under the
# interpreter, whose 64-wide dX tiles cover two scale groups when blocksize is 32.
# ----------------------------------------------------------------------------------------------------------

def nf4_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_N is the dot's row count (OUTᵀ)
        (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 5),
        (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much taller than the problem (decode-sized M) and tiles the variant's registers cannot hold; fit
    what the pipeliner stages in shared memory: the x tile and the W tile's float32 code-table values (two per
    packed byte; the bytes themselves are loaded to registers), and its scales."""
    named_args = {**named_args, **kwargs}
    m, el = named_args["M_BUCKET"], named_args["x_ptr"].element_size()
    paired, aligned = named_args["PAIRED"], named_args["ALIGNED"]
    configs = fit_registers(configs, named_args)
    # Per thread, floats of the accumulator plus elements of the W tile formed in registers (measured with ptxas,
    # tests/aot.py): odd K gathers every element's byte and scale (at most 64); a 64-wide rank block holds its S
    # and E chunks beside them (at most 96).
    budget = 64 if not paired else 96 if named_args.get("BLOCK_R", 16) >= 64 else None
    if budget:
        def per_thread(c):
            threads = 32 * c.num_warps
            return (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_N"] // threads

        configs = [c for c in configs if per_thread(c) <= budget] or configs[-1:]
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * m)] or configs[-1:]
    # float32 values staged per W element: its code-table value, and its scale's where it has its own (one per byte
    # when blocks span rows, one per element when K is odd; double quantization gathers two per scale)
    scale_words = 2 if named_args["NESTED"] else 1
    w_words = 1.0 + (0.0 if aligned and paired else 0.5 * scale_words if paired else scale_words)

    def stage_bytes(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return bk * bm * el + int(bn * bk * 4 * w_words) + bn * 8

    return fit_shared(short, stage_bytes) or fit_shared(configs, stage_bytes)


# ----------------------------------------------------------------------------------------------------------
# Dequantization of one W tile
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _exact_product(a, b, INTERPRETED: tl.constexpr):
    """a · b in float32, rounded on its own (a following addition is never fused into it)."""
    if INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def block_scales(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blocksize2, block, ok,
                 NESTED: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 absmax of the blocks `block` (any shape; finite where `ok` is false): stored, or decoded from its
    8-bit code (double quantization)."""
    if NESTED:
        q8 = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        group_scale = tl.load(absmax_scale_ptr + block // blocksize2, mask=ok, other=0.0)
        return _exact_product(tl.load(absmax_code_ptr + q8), group_scale, INTERPRETED) + absmax_offset
    else:
        return tl.load(absmax_ptr + block, mask=ok, other=0.0)


@triton.jit
def _round(v, dtype: tl.constexpr, W_DTYPE: tl.constexpr):
    """float32 -> the dequantization dtype (code of W_DTYPES) -> `dtype`, each rounding to nearest."""
    if W_DTYPE == 1:
        v = v.to(tl.float16)
    elif W_DTYPE == 2:
        v = v.to(tl.bfloat16)
    return v.to(dtype)


@triton.jit
def dequant_tile(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blocksize2,
                 rows, row_ok, col0, K, half_K, blocks_per_row, dtype: tl.constexpr,
                 WIDTH: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PAIRED: tl.constexpr,
                 ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """deq(W)[rows, col0 : col0 + WIDTH] as a (len(rows), WIDTH) tile of `dtype`; finite (not necessarily zero)
    outside W (rows where `row_ok` is false, columns from K on): the other operand is zero there.

    PAIRED (K even, col0 even): byte col0/2 + j of each row holds columns col0 + 2j (high nibble) and col0 + 2j + 1
    (low nibble), both in one scale block: one byte load and one scale per pair. ALIGNED (K % BLOCKSIZE == 0):
    the scales are per row and per BLOCKSIZE-wide column group of the tile. Otherwise each element's own."""
    if PAIRED:
        j = tl.arange(0, WIDTH // 2)
        col = col0 + 2 * j  # the column of each high nibble
        ok = row_ok[:, None] & (col < K)[None, :]
        byte = tl.load(packed_ptr + rows[:, None] * half_K + (col0 // 2 + j)[None, :], mask=ok, other=0)
        byte = byte.to(tl.int32)
        if ALIGNED:
            row_block = rows * blocks_per_row + col0 // BLOCKSIZE
            if WIDTH <= BLOCKSIZE:  # the tile lies in one block column: one scale per row
                scale = block_scales(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blocksize2,
                                     row_block, row_ok, NESTED, INTERPRETED)[:, None]
            else:  # WIDTH / BLOCKSIZE groups of columns, each with one scale per row
                scale = tl.zeros((rows.shape[0], WIDTH // 2), dtype=tl.float32)
                for g in tl.static_range(WIDTH // BLOCKSIZE):
                    group = block_scales(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blocksize2,
                                         row_block + g, row_ok & (row_block * 0 + col0 + g * BLOCKSIZE < K), NESTED,
                                         INTERPRETED)
                    scale = tl.where((j >= g * (BLOCKSIZE // 2))[None, :], group[:, None], scale)
        else:  # blocks span rows: each pair's own block
            block = (rows[:, None] * K + col[None, :]) // BLOCKSIZE
            scale = block_scales(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blocksize2, block, ok,
                                 NESTED, INTERPRETED)
        high = _round(tl.load(code_ptr + (byte >> 4)) * scale, dtype, W_DTYPE)
        low = _round(tl.load(code_ptr + (byte & 15)) * scale, dtype, W_DTYPE)
        return tl.reshape(tl.join(high, low), (rows.shape[0], WIDTH))
    else:  # K odd: a row may start in the middle of a byte; each element finds its own byte, nibble and block
        col = col0 + tl.arange(0, WIDTH)
        ok = row_ok[:, None] & (col < K)[None, :]
        flat = rows[:, None] * K + col[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
        q = (byte >> ((1 - (flat & 1)) * 4)) & 15
        scale = block_scales(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blocksize2,
                             flat // BLOCKSIZE, ok, NESTED, INTERPRETED)
        return _round(tl.load(code_ptr + q) * scale, dtype, W_DTYPE)


@triton.jit
def lowrank_chunk_t(acc, s_ptr, scale_ptr, e_ptr, rm_in, rn_in, r, R, stride_sm, stride_sr, stride_er, stride_en,
                    dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """accᵀ + ((S ⊙ s)[:, r] E[r, :])ᵀ = accᵀ + E[r, :]ᵀ (S ⊙ s)[:, r]ᵀ for one chunk r of ranks: lora_terms'
    ``lowrank_chunk`` on a transposed tile, with the same roundings (S ⊙ s and E to x's dtype)."""
    s = tl.load(s_ptr + r[:, None] * stride_sr + rm_in[None, :] * stride_sm, mask=r[:, None] < R, other=0.0)
    sc = tl.load(scale_ptr + r, mask=r < R, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + rn_in[:, None] * stride_en + r[None, :] * stride_er, mask=r[None, :] < R, other=0.0)
    return tl.dot(e.to(dtype), (s * sc[:, None]).to(dtype), acc, input_precision=DOT_PRECISION)


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------

@triton.autotune(configs=nf4_configs(),
                 key=["M_BUCKET", "N", "K", "R", "TRANSPOSE_W", "MASK_LORA", "NESTED", "BLOCKSIZE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def nf4_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr,
    bias_ptr, s_ptr, scale_ptr, e_ptr, out_ptr, seed_ptr,
    M, N, K, R, half_K, blocks_per_row,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_er, stride_en, stride_om, stride_on,
    absmax_offset, blocksize2, threshold, inv_keep, M_BUCKET,
    TRANSPOSE_W: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_LORA: tl.constexpr, NESTED: tl.constexpr,
    PAIRED: tl.constexpr, ALIGNED: tl.constexpr, BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr,
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT (M, cols) = X (M, depth) · deq(W)ᵀ or deq(W) + mask ⊙ ((S ⊙ s) E) [+ bias]; W (N, K) packed.

    Forward (not TRANSPOSE_W): cols = N, depth = K. dX (TRANSPOSE_W): cols = K, depth = N. BLOCK_N tiles the
    output columns, BLOCK_K the depth."""
    if TRANSPOSE_W:
        cols = K
        depth = N
    else:
        cols = N
        depth = K
    pid_m, pid_n = grouped_tile(M, cols, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    rm_in = rm % M  # rows past M re-read valid rows; their results are never stored
    rn_in = rn % cols
    dtype = x_ptr.dtype.element_ty

    # The output tile is computed transposed, OUTᵀ = deq(W)-tile · Xᵀ: the W tile, formed in registers, is the dot's
    # left operand (which the tensor cores read from registers, so wgmma stays in flight across K steps) and its
    # rows (BLOCK_N) fill the 64-row wgmma tiles even when M is a decode-sized handful of rows.
    if R_CHUNKS == 0:  # a zero accumulator defined by a (tiny) dot: ptxas then keeps the K loop's wgmma pipelined
        acc = tl.dot(tl.zeros((BLOCK_N, 16), dtype=dtype), tl.zeros((16, BLOCK_M), dtype=dtype),
                     input_precision=DOT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # The low-rank term (S ⊙ s) E first, R in chunks of BLOCK_R, and dX's dropout mask on it
    if R_CHUNKS <= 4:
        for c in tl.static_range(R_CHUNKS):
            acc = lowrank_chunk_t(acc, s_ptr, scale_ptr, e_ptr, rm_in, rn_in, c * BLOCK_R + rr, R,
                                  stride_sm, stride_sr, stride_er, stride_en, dtype, DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            acc = lowrank_chunk_t(acc, s_ptr, scale_ptr, e_ptr, rm_in, rn_in, r0 + rr, R,
                                  stride_sm, stride_sr, stride_er, stride_en, dtype, DOT_PRECISION)
    if MASK_LORA:
        keep = tl.trans(keep_tile(row_keys(seed_ptr, rm), rn, threshold))
        acc = tl.where(keep, acc * inv_keep, 0.0)

    xt_ptrs = x_ptr + rk[:, None] * stride_xk + rm_in[None, :] * stride_xm
    col0 = pid_n * BLOCK_N
    for d0 in range(0, depth, BLOCK_K):
        left = depth - d0
        xt = tl.load(xt_ptrs, mask=rk[:, None] < left, other=0.0)
        if TRANSPOSE_W:  # W rows d0.. (the depth), the columns of this output tile: (BLOCK_K, BLOCK_N), transposed
            w = tl.trans(dequant_tile(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr,
                                      absmax_offset, blocksize2, d0 + rk, rk < left, col0, K, half_K, blocks_per_row,
                                      dtype, BLOCK_N, BLOCKSIZE, NESTED, PAIRED, ALIGNED, W_DTYPE, INTERPRETED))
        else:  # W rows of this output tile, columns d0.. (the depth): (BLOCK_N, BLOCK_K)
            w = dequant_tile(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                             blocksize2, rn_in, rn_in < cols, d0, K, half_K, blocks_per_row, dtype,
                             BLOCK_K, BLOCKSIZE, NESTED, PAIRED, ALIGNED, W_DTYPE, INTERPRETED)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
        xt_ptrs += BLOCK_K * stride_xk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[:, None]
    out = tl.trans(acc).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, out, mask=(rm < M)[:, None] & (rn < cols)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------

def keep_threshold(p: float) -> int:
    """The signed int32 threshold t with P(hash >= t) = 1 - p: fastpeft/reference/dropout.py's, which the
    lora kernels receive from the ops layer (tests check the two agree)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * 2**32)) - 2**31, 2**31 - 1)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"nf4_gemm: {message}")


def nf4_gemm(x, packed, absmax, code, *, shape, blocksize, w_dtype, transpose_w=False, absmax_code=None,
             absmax_scale=None, absmax_offset=0.0, blocksize2=256, s=None, scale=None, e=None, bias=None, seed=None,
             dropout_p=0.0, out=None):
    """x (M, K) · deq(W)ᵀ + bias + (s ⊙ scale) e  ->  (M, N); or, with transpose_w, x = dY (M, N) ·
    deq(W) + mask ⊙ ((s ⊙ scale) e)  ->  (M, K), the mask regenerated from `seed` (dropout_p > 0).

    W (N, K) = `shape` is bitsandbytes' 4-bit layout: `packed` uint8 (N K / 2 bytes, any shape, contiguous),
    `code` its 16-entry float32 table, `absmax` float32 per `blocksize` elements, or (double quantization)
    uint8 codes into `absmax_code` (256 float32) scaled by `absmax_scale` (float32 per `blocksize2` blocks)
    plus `absmax_offset`. W is dequantized as bitsandbytes does, to `w_dtype`, then to x's dtype.
    s (M, R) float32, scale (R,) float32, e (R, cols) any float dtype (strided views are fine): all or none.
    The output (x's dtype) is written into `out` when given. Accumulation is float32.
    """
    N, K = (int(v) for v in shape)
    _check(x.dim() == 2 and x.dtype in _X_DTYPES, f"x must be a 2-D float16/bfloat16/float32 tensor, got "
           f"{tuple(x.shape)} {x.dtype}")
    M, depth = x.shape
    cols, want_depth = (K, N) if transpose_w else (N, K)
    _check(depth == want_depth, f"x has {depth} columns, W {tuple(shape)} needs {want_depth}"
           f"{' (transpose_w: x is dY)' if transpose_w else ''}")
    _check(N > 0 and K > 0 and N * K % 2 == 0, f"W {tuple(shape)}: N·K must be even and positive")
    _check(N * K < 2**31, f"W {tuple(shape)} has 2^31 elements or more")
    _check(w_dtype in W_DTYPES, f"w_dtype must be one of {list(W_DTYPES)}, got {w_dtype}")
    _check(blocksize >= 2 and blocksize & (blocksize - 1) == 0, f"blocksize must be a power of two, got {blocksize}")
    _check(packed.dtype == torch.uint8 and packed.numel() == N * K // 2 and packed.is_contiguous(),
           f"packed must be {N * K // 2} contiguous uint8 bytes, got {packed.numel()} {packed.dtype}")
    _check(code.dtype == torch.float32 and code.numel() == 16 and code.is_contiguous(),
           "code must be the 16-entry contiguous float32 table")
    blocks = triton.cdiv(N * K, blocksize)
    nested = absmax.dtype == torch.uint8
    _check(absmax.numel() == blocks and absmax.is_contiguous() and absmax.dtype in (torch.float32, torch.uint8),
           f"absmax must hold {blocks} contiguous float32 scales (or uint8 codes), got {absmax.numel()} {absmax.dtype}")
    if nested:
        _check(absmax_code is not None and absmax_code.dtype == torch.float32 and absmax_code.numel() == 256
               and absmax_code.is_contiguous(), "double quantization needs absmax_code: 256 contiguous float32")
        _check(blocksize2 > 0, f"blocksize2 must be positive, got {blocksize2}")
        groups = triton.cdiv(blocks, blocksize2)
        _check(absmax_scale is not None and absmax_scale.dtype == torch.float32 and absmax_scale.numel() == groups
               and absmax_scale.is_contiguous(), f"double quantization needs absmax_scale: {groups} float32")
    lowrank = [t is not None for t in (s, scale, e)]
    _check(all(lowrank) or not any(lowrank), "s, scale and e are given together or not at all")
    R = 0
    if all(lowrank):
        R = s.shape[1] if s.dim() == 2 else -1
        _check(s.dim() == 2 and s.shape[0] == M and s.dtype == torch.float32, f"s must be ({M}, R) float32")
        _check(scale.dim() == 1 and scale.shape[0] == R and scale.dtype == torch.float32,
               f"scale must be ({R},) float32")
        _check(e.dim() == 2 and tuple(e.shape) == (R, cols) and e.dtype.is_floating_point,
               f"e must be ({R}, {cols}), got {tuple(e.shape)}")
    _check(bias is None or (not transpose_w and bias.shape == (N,)), "bias is (N,) and for the forward only")
    mask = seed is not None and dropout_p > 0
    _check(not mask or transpose_w, "the dropout mask applies to dX (transpose_w=True) only")
    threshold, inv_keep = (keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p)) if mask else (0, 1.0)
    tensors = [t for t in (x, packed, absmax, code, absmax_code, absmax_scale, s, scale, e, bias, seed, out)
               if t is not None]
    _check(all(t.device == x.device for t in tensors), "every tensor must be on x's device")
    if out is None:
        out = torch.empty((M, cols), device=x.device, dtype=x.dtype)
    _check(tuple(out.shape) == (M, cols) and out.dtype == x.dtype, f"out must be ({M}, {cols}) {x.dtype}")
    if M == 0:
        return out

    block_r = pow2_at_least_16(R, 64)
    placeholder = code  # a pointer never dereferenced by the variant launched

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)

    launch(nf4_gemm_kernel)[grid](
        x, packed, absmax, code, absmax_code if nested else placeholder, absmax_scale if nested else placeholder,
        bias if bias is not None else placeholder, s if R else placeholder, scale if R else placeholder,
        e if R else placeholder, out, seed if mask else placeholder,
        M, N, K, R, K // 2, K // blocksize,
        x.stride(0), x.stride(1), *((s.stride(0), s.stride(1), e.stride(0), e.stride(1)) if R else (0, 0, 0, 0)),
        out.stride(0), out.stride(1),
        float(absmax_offset), int(blocksize2), threshold, inv_keep, bucket(M),
        TRANSPOSE_W=bool(transpose_w), HAS_BIAS=bias is not None, MASK_LORA=mask, NESTED=nested,
        PAIRED=K % 2 == 0, ALIGNED=K % blocksize == 0, BLOCKSIZE=int(blocksize), W_DTYPE=W_DTYPES[w_dtype],
        INTERPRETED=interpreting(), DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
        R_CHUNKS=triton.cdiv(R, block_r),
    )
    return out
