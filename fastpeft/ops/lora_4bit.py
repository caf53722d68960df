"""`fp.ops.lora_linear_4bit`: the LoRA linear on a bitsandbytes 4-bit (NF4 / FP4) base weight.

    y = x Ŵᵀ + b + ((drop(x) Aᵀ) ⊙ s) Bᵀ,     Ŵ[f] = code[q_f] · absmax[f // blocksize]     (f = n K + k)

with the absmax itself 8-bit quantized under double quantization (absmax = code₂[a] · absmax₂[b // 256] + offset).
Backward: dX = dY Ŵ + keep ⊙ ((dY B ⊙ s) A), dA and dB as the dense LoRA linear's (fastpeft/reference/lora.py).

On CUDA two strategies (fastpeft/ops/strategy.py, op "lora_linear_4bit"):
- "fused": Ŵ is formed tile by tile inside the GEMM's K loop (fastpeft/kernels/nf4.py), forward and dX: W crosses
  memory once at 4 bits and no 16-bit copy of it is ever written;
- "cublas": bitsandbytes dequantizes W into a temporary 16-bit copy and the dense LoRA op runs on it (Unsloth's way);
  the backward dequantizes again instead of keeping the copy alive between the passes.
Elsewhere the reference: the library's dequantization, F.linear and the low-rank term. Saved for backward: x and
T = drop(x) Aᵀ (float32); the dropout mask is regenerated from the seed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import TRITON_DTYPES
from ..reference import lora as reference
from . import dispatch, registry
from .lora import dropout_args, triton_backward, triton_forward, check_lora
from .strategy import choose_strategy

registry.describe("lora_linear_4bit", dtypes=TRITON_DTYPES, doc="y = x dequant(W4)^T + b + s * drop(x) A^T B^T",
                  note="bitsandbytes NF4/FP4 weights; no tiny-M rule (the fused kernel reads 4 bits per weight)")


@dataclasses.dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight W (N, K) as its packed codes and statistics (modules/base_layers.packed_4bit).

    packed: uint8, two codes per byte (the even element in the high nibble); absmax: float32 per block of
    `blocksize` elements, or uint8 codes of the double quantization with absmax_code (256 float32),
    absmax_scale (float32 per `blocksize2` blocks) and absmax_offset; code: the 16 values of the quant type;
    dtype: what the library dequantizes to; dequantize: the library's own dequantization, returning W in dtype."""

    packed: Tensor
    absmax: Tensor
    code: Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    dequantize: Callable[[], Tensor]
    absmax_code: Tensor | None = None
    absmax_scale: Tensor | None = None
    absmax_offset: float = 0.0
    blocksize2: int = 256

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def gemm(self, x: Tensor, *, transpose: bool = False, **lowrank) -> Tensor:
        """x Ŵᵀ (or x Ŵ with transpose) plus the kernel's optional low-rank term, on the fused 4-bit kernel."""
        from ..kernels import nf4

        return nf4.nf4_gemm(x, self.packed, self.absmax, self.code, shape=self.shape, blocksize=self.blocksize,
                            w_dtype=self.dtype, transpose_w=transpose, absmax_code=self.absmax_code,
                            absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset,
                            blocksize2=self.blocksize2, **lowrank)


def lora_linear_4bit(x: Tensor, weight: Packed4bit, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                     scale: float | Tensor, *, dropout_p: float = 0.0, seed: Tensor | None = None) -> Tensor:
    """y = x Ŵᵀ + b + ((drop(x) Aᵀ) ⊙ s) Bᵀ for x of shape (..., K) in the layer's compute dtype.

    weight: the 4-bit W (N, K) (Packed4bit); lora_a (R, K); lora_b (N, R); scale: a number or (R,) per-rank scales;
    seed: int64 tensor fixing the dropout mask (drawn when omitted)."""
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise InputError(f"lora_linear_4bit: x has {x.shape[-1] if x.dim() else 0} input features; the 4-bit weight "
                         f"is ({N}, {K}) (out, in): pass x of shape (..., {K}).")
    if not x.dtype.is_floating_point:
        raise InputError(f"lora_linear_4bit: x is {x.dtype}; pass it in the layer's compute dtype (e.g. "
                         "x.to(torch.bfloat16)).")
    check_lora(x, _shape_only(N, K, x), bias, lora_a, lora_b, False, "lora_linear_4bit")
    if weight.device != x.device:
        raise InputError(f"lora_linear_4bit: the 4-bit weight is on {weight.device} but x is on {x.device}; move "
                         "the layer and its input together.")
    R = lora_a.shape[0]
    if not isinstance(scale, Tensor):
        scale = torch.full((R,), float(scale), device=x.device, dtype=torch.float32)
    elif scale.shape != (R,):
        raise InputError(f"lora_linear_4bit: scale has shape {tuple(scale.shape)}; expected ({R},), one per rank.")
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"lora_linear_4bit: dropout_p={dropout_p} is outside [0, 1); use e.g. 0.05, or 0.0.")
    if dropout_p == 0.0:
        seed = None
    elif seed is None:
        seed = torch.randint(0, 2**31 - 1, (), device=x.device, dtype=torch.int64)
    x2 = x.reshape(-1, K)
    y = _LoRA4bit.apply(x2, bias, lora_a, lora_b, scale, weight, seed, float(dropout_p),
                         path(x2.device, x2.dtype, x2.shape[0]))
    return y.reshape(*x.shape[:-1], N)


def _shape_only(n: int, k: int, x: Tensor) -> Tensor:
    """A stand-in of W's shape and x's dtype and device for the shared checks (no storage)."""
    return torch.empty(1, device=x.device, dtype=x.dtype).expand(n, k)


def path(device: torch.device, dtype: torch.dtype, rows: int) -> str:
    """"torch" (the reference), or the CUDA strategy: "fused" or "cublas". No tiny-M rule: at decode sizes the fused
    kernel reads 4 bits per weight where cuBLAS would read a 16-bit copy."""
    if dispatch.choose("lora_linear_4bit", device, dtype, triton_dtypes=TRITON_DTYPES) == "torch":
        return "torch"
    return choose_strategy("lora_linear_4bit", device, dtype, rows)[0]


class _LoRA4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, scale, weight, seed, dropout_p, how):
        if how == "fused":
            y, t = _fused_forward(x, bias, lora_a, lora_b, scale, weight, seed, dropout_p)
        else:
            forward = reference.lora_linear_fwd if how == "torch" else triton_forward
            y, t, _ = forward(x, weight.dequantize().to(x.dtype), bias, lora_a, lora_b, scale, seed, dropout_p,
                              False, True, None, False)
        ctx.save_for_backward(x, lora_a, lora_b, scale, t, seed)
        ctx.weight, ctx.dropout_p, ctx.how = weight, dropout_p, how
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.dispatch = dispatch.snapshot()
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, scale, t, seed = ctx.saved_tensors
        need_dx, need_dbias, need_da, need_db, need_ds = ctx.needs_input_grad[:5]
        needs = (need_dx, need_da, need_db, need_ds, need_dbias, False)
        dy = dy.contiguous()
        weight, p, z = ctx.weight, ctx.dropout_p, dy.new_empty((0,))
        with dispatch.restore(ctx.dispatch):
            if ctx.how == "fused":
                def dx_gemm(dy, g, dx):
                    weight.gemm(dy, transpose=True, s=g, scale=scale, e=lora_a, seed=seed, dropout_p=p, out=dx)

                grads = triton_backward(dy, x, None, lora_a, lora_b, scale, t, seed, p, False, needs, None, z,
                                         dx_gemm=dx_gemm)
            else:
                backward = reference.lora_linear_bwd if ctx.how == "torch" else triton_backward
                w = weight.dequantize().to(dy.dtype) if need_dx else _shape_only(*weight.shape, dy)
                grads = backward(dy, x, w, lora_a, lora_b, scale, t, seed, p, False, needs, None, z)
        dx, da, db, ds, dbias, _ = grads
        return (dx if need_dx else None, dbias.to(ctx.bias_dtype) if need_dbias else None,
                da if need_da else None, db if need_db else None, ds if need_ds else None, None, None, None, None)


def _fused_forward(x, bias, lora_a, lora_b, scale, weight, seed, dropout_p):
    """T = drop(x) Aᵀ on the shrink kernel, then one 4-bit GEMM with (T ⊙ s) Bᵀ and the bias in its epilogue."""
    from ..kernels import lora as kernels

    M = x.shape[0]
    t = dispatch.new_output((M, lora_a.shape[0]), like=x, dtype=torch.float32)
    out = dispatch.new_output((M, weight.shape[0]), like=x)
    if M:
        kernels.shrink(x, lora_a.t(), t, **dropout_args(seed, dropout_p))
        weight.gemm(x, s=t, scale=scale, e=lora_b.t(), bias=bias.contiguous() if bias is not None else None, out=out)
    return out, t
