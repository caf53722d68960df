"""What the LoRA GEMM kernels share (kernels/lora.py's ``lora_gemm`` and its Hopper path, kernels/lora_tma.py):
the low-rank term of an output tile, acc + (f(S + b) ⊙ s) E, and the register rules of the heavy variants."""
from __future__ import annotations

from ._activation import activation
from ._compat import tl, triton


def fit_registers(configs, args):
    """The tiles a register-heavy variant keeps (measured with ptxas for sm_80 and sm_90, tests/aot.py). Heavy:
    a full-tile dropout mask, row reductions or a second output (Z) beside the accumulator; each warp group then
    holds at most 64 rows and 128 accumulator floats per thread, K steps at most 128 wide. Very heavy (the fused
    shrink's second product, in-loop row reductions): at most 64 accumulator floats per thread and 64-wide K steps
    (the mma.sync tiles keep their operands in registers). A 64-wide rank block counts as very heavy."""
    very = any(args.get(flag) for flag in ("FUSED_SHRINK", "IN_DOT", "OUT_DOT"))
    very = very or args.get("BLOCK_R", 16) >= 64  # a 64-wide rank block of S beside the accumulator
    heavy = very or any(args.get(flag) for flag in ("MASK_LORA", "IN_SUM", "WRITE_Z", "OUT_SCALE"))
    if not heavy:
        return configs
    kept = {}
    for c in configs:
        bm, bn, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        per_thread = bm * bn // (32 * w)
        if bm > 16 * w or per_thread > (64 if very else 128):
            continue
        kwargs = dict(c.kwargs)
        kwargs["BLOCK_K"] = min(kwargs["BLOCK_K"], 64 if very else 128)
        key = (tuple(sorted(kwargs.items())), w, c.num_stages)
        kept.setdefault(key, triton.Config(kwargs, num_warps=w, num_stages=c.num_stages))
    return list(kept.values()) or configs[-1:]


@triton.jit
def lowrank_chunk(acc, s_ptr, scale_ptr, e_ptr, s_bias_ptr, rm_in, rn_in, r, R, stride_sm, stride_sr, stride_er,
                  stride_en, dtype: tl.constexpr, S_ACT: tl.constexpr, S_BIAS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """acc + (f(S + b) ⊙ s)[:, r] E[r, :] for one chunk r of ranks, S float32 read from memory."""
    s = tl.load(s_ptr + rm_in[:, None] * stride_sm + r[None, :] * stride_sr, mask=r[None, :] < R, other=0.0)
    s = bias_activation(s, s_bias_ptr, r, R, S_ACT, S_BIAS)
    sc = tl.load(scale_ptr + r, mask=r < R, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + r[:, None] * stride_er + rn_in[None, :] * stride_en, mask=r[:, None] < R, other=0.0)
    return tl.dot((s * sc[None, :]).to(dtype), e.to(dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def bias_activation(s, s_bias_ptr, r, R, S_ACT: tl.constexpr, S_BIAS: tl.constexpr):
    """f(S + b) on a float32 (rows, ranks) tile: the bottleneck adapter's non-linearity (identity when S_ACT = 0)."""
    if S_BIAS:
        s = s + tl.load(s_bias_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
    return activation(s, S_ACT)
