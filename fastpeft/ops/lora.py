"""`fp.ops.lora_linear`: the LoRA linear as one registered op with autograd.

    y = (x Wᵀ + ((drop(x) Aᵀ) ⊙ s) Bᵀ) ⊙ c + b      (math and backward: fastpeft/reference/lora.py)

The output column scale c is optional (DoRA's m / ‖W + s B A‖, fastpeft/ops/dora.py). `fastpeft::lora_linear`
returns (y, T, Z) with T = drop(x) Aᵀ (float32, M x R) and, when c is trained, Z (the output before c and b)
kept for the backward pass, which is `fastpeft::lora_linear_backward`. Both are `torch.library.triton_op`s: on
CUDA they launch the kernels of fastpeft/kernels/lora.py, elsewhere they run the reference, and torch.compile
traces them without graph breaks. Saved for backward: x and T (and Z with a trained c); the dropout mask is
regenerated from the seed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import FUSED_SHRINK_MAX_RANK, TRITON_DTYPES, UPDATE_MAX_RANK
from ..reference import lora as reference
from ..reference._common import scale_cols
from ..reference.dropout import keep_threshold
from . import dispatch, registry
from .strategy import strategy
from ._common import (TINY_M, autocast, check_base, check_device, check_floating, check_vector, rows_backend,
                      target_programs)

registry.describe("lora_linear", dtypes=TRITON_DTYPES, doc="y = x W^T + b + s * drop(x) A^T B^T",
                  note=f"inputs of at most {TINY_M} rows (tokens) run the reference (cuBLAS)")


def _kernels():
    from ..kernels import lora  # imported on first CUDA call only: `import fastpeft` never loads triton

    return lora


def _update_kernel():
    from ..kernels import lora_update

    return lora_update


def cublas_base(x: Tensor, rank: int, out_scale: Tensor | None) -> bool:
    """Whether this call runs the cuBLAS-base strategy (fastpeft/ops/strategy.py): the table's or the pinned
    choice for LoRA (DoRA with a column scale), for ranks the adapter kernel holds in registers."""
    op = "lora_linear" if out_scale is None else "dora_linear"
    return rank <= UPDATE_MAX_RANK and strategy(op, x) == "cublas"


# ------------------------------------------------------------------------------------------------------------
# Public functional op
# ------------------------------------------------------------------------------------------------------------

def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scale: float | Tensor, *, dropout_p: float = 0.0, seed: Tensor | None = None,
                fan_in_fan_out: bool = False, out_scale: Tensor | None = None) -> Tensor:
    """y = (x Wᵀ + ((drop(x) Aᵀ) ⊙ s) Bᵀ) ⊙ out_scale + b for x of shape (..., K).

    weight: (N, K), or (K, N) with `fan_in_fan_out` (GPT-2 Conv1D, used in place); lora_a: (R, K);
    lora_b: (N, R); scale: a number, or an (R,) tensor of per-rank scales (several adapters concatenated
    along R); dropout_p: dropout on the adapter's input; seed: int64 tensor that fixes the dropout mask
    (drawn from torch's generator when omitted); out_scale: optional (N,) column scale of everything but the bias.
    """
    x, weight, bias = autocast(x, weight, bias)
    K, N = check_lora(x, weight, bias, lora_a, lora_b, fan_in_fan_out, "lora_linear")
    R = lora_a.shape[0]
    if not isinstance(scale, Tensor):
        scale = torch.full((R,), float(scale), device=x.device, dtype=torch.float32)
    elif scale.shape != (R,):
        raise InputError(f"lora_linear: scale has shape {tuple(scale.shape)}; expected ({R},), one entry per rank "
                         "(or pass a number).")
    else:
        check_device(scale, "scale", x, "lora_linear")
    check_device(seed, "seed", x, "lora_linear")
    if seed is not None and (seed.dtype.is_floating_point or seed.numel() != 1):
        raise InputError(f"lora_linear: seed must be a one-element integer tensor, got {seed.dtype} of shape "
                         f"{tuple(seed.shape)}; pass e.g. torch.tensor([1234]) (or None to draw one).")
    if out_scale is not None and (out_scale.shape != (N,) or out_scale.device != x.device
                                  or not out_scale.dtype.is_floating_point):
        raise InputError(f"lora_linear: out_scale must be a floating-point ({N},) tensor on {x.device}, got "
                         f"{out_scale.dtype} of shape {tuple(out_scale.shape)} on {out_scale.device}; pass one "
                         "column scale per output feature (or None).")
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"lora_linear: dropout_p={dropout_p} is outside [0, 1); use a probability such as 0.05, "
                         "or 0.0 for none.")
    if dropout_p == 0.0:
        seed = None
    elif seed is None:
        seed = torch.randint(0, 2**31 - 1, (), device=x.device, dtype=torch.int64)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b, scale, out_scale))
    need_t = grads and (lora_b.requires_grad or scale.requires_grad)
    need_z = grads and out_scale is not None and out_scale.requires_grad
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # a no-op view still costs an autograd node
    args = (x2, weight, bias, lora_a, lora_b, scale, seed, float(dropout_p), bool(fan_in_fan_out), bool(need_t),
            out_scale, bool(need_z))
    if torch.compiler.is_compiling() or rows_backend("lora_linear", x2) != "torch":
        y = torch.ops.fastpeft.lora_linear(*args)[0]
    elif grads and (seed is not None or lora_a.dtype != x.dtype or lora_b.dtype != x.dtype):
        y = _EagerReference.apply(*args)[0]  # the mask is regenerated, wide adapter gradients accumulate wide
    else:  # eager, no mask: autograd through the reference saves x and M x r products and skips the op boundary
        y = reference.lora_linear_fwd(*args[:9], False, out_scale, False)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def check_lora(x, weight, bias, lora_a, lora_b, fan_in_fan_out, where: str) -> tuple[int, int]:
    """Host-side validation of the LoRA linear's inputs (shapes, dtypes, devices) before any launch, in the words
    of `where` (lora_linear, dora_linear). Returns (K, N)."""
    K, N = check_base(x, weight, fan_in_fan_out, where)
    if lora_a.dim() != 2 or lora_a.shape[1] != K or lora_a.shape[0] < 1:
        raise InputError(f"{where}: lora_a has shape {tuple(lora_a.shape)}; expected (r, {K}) with r >= 1 (the "
                         "down projection, one row per rank, over the layer's input features).")
    R = lora_a.shape[0]
    if lora_b.shape != (N, R):
        raise InputError(f"{where}: lora_b has shape {tuple(lora_b.shape)}; expected ({N}, {R}) to match "
                         f"lora_a {tuple(lora_a.shape)} and the weight (the up projection: out features x rank).")
    check_vector(bias, "bias", N, "one entry per output feature", x, where)
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_device(t, name, x, where)
        check_floating(t, name, where)
    return K, N


# ------------------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------------------

@torch.library.triton_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: Tensor,
                    seed: Tensor | None, dropout_p: float, fan_in_fan_out: bool, need_t: bool,
                    out_scale: Tensor | None, need_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    if rows_backend("lora_linear", x) == "torch":
        return reference.lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, seed, dropout_p, fan_in_fan_out,
                                         need_t, out_scale, need_z)
    return triton_forward(x, weight, bias, lora_a, lora_b, scale, seed, dropout_p, fan_in_fan_out, need_t,
                           out_scale, need_z)


@torch.library.triton_op("fastpeft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor,
                             t: Tensor, seed: Tensor | None, dropout_p: float, fan_in_fan_out: bool, need_dx: bool,
                             need_da: bool, need_db: bool, need_ds: bool, need_dbias: bool, out_scale: Tensor | None,
                             z: Tensor, need_dc: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dx, need_da, need_db, need_ds, need_dbias, need_dc)
    if rows_backend("lora_linear", dy) == "torch":
        return reference.lora_linear_bwd(dy, x, weight, lora_a, lora_b, scale, t, seed, dropout_p, fan_in_fan_out,
                                         needs, out_scale, z)
    return triton_backward(dy, x, weight, lora_a, lora_b, scale, t, seed, dropout_p, fan_in_fan_out, needs,
                            out_scale, z)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, seed, dropout_p, fan_in_fan_out, _, out_scale, _ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scale, output[1], seed, out_scale, output[2])
    ctx.dropout_p, ctx.fan_in_fan_out = dropout_p, fan_in_fan_out
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.eager_reference = False
    ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state


def _backward(ctx, dy, _dt, _dz):
    x, weight, lora_a, lora_b, scale, t, seed, out_scale, z = ctx.saved_tensors
    need_dx, need_dw, need_dbias, need_da, need_db, need_ds = ctx.needs_input_grad[:6]
    need_dc = ctx.needs_input_grad[10]
    args = (dy, x, weight, lora_a, lora_b, scale, t, seed, ctx.dropout_p, ctx.fan_in_fan_out)
    needs = (need_dx, need_da, need_db, need_ds, need_dbias, need_dc)
    with dispatch.restore(ctx.dispatch):
        if ctx.eager_reference:
            dx, da, db, ds, dbias, dc = reference.lora_linear_bwd(*args, needs, out_scale, z)
        else:
            dx, da, db, ds, dbias, dc = torch.ops.fastpeft.lora_linear_backward(*args, *needs[:5], out_scale, z,
                                                                                need_dc)
    dw = None
    if need_dw:  # a trainable base weight (unusual with LoRA): dW = (dY ⊙ c)ᵀ x (transposed for Conv1D)
        dw = scale_cols(dy, out_scale).t().to(weight.dtype) @ x.to(weight.dtype)
        dw = dw.t() if ctx.fan_in_fan_out else dw
    return (dx if need_dx else None, dw, dbias.to(ctx.bias_dtype) if need_dbias else None,
            da if need_da else None, db if need_db else None, ds if need_ds else None, None, None, None, None,
            dc if need_dc else None, None)


torch.library.register_autograd("fastpeft::lora_linear", _backward, setup_context=_setup_context)


class _EagerReference(torch.autograd.Function):
    """The reference path in eager mode, with the registered op's autograd (saved: x and T; mask from seed)."""

    @staticmethod
    def forward(ctx, *args):  # the (ctx, ...) form: autograd then skips binding a signature per call
        output = reference.lora_linear_fwd(*args)
        _setup_context(ctx, args, output)
        ctx.eager_reference = True
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dy, dt, dz):
        return _backward(ctx, dy, dt, dz)


# ------------------------------------------------------------------------------------------------------------
# Triton paths
# ------------------------------------------------------------------------------------------------------------

# Provisional cost model (H100-class numbers) for "fused shrink": computing S = X U inside the GEMM costs
# redundant MMA work on every column tile; a separate shrink kernel costs one more read of X and a launch.
_MMA_FLOPS = 6.0e14
_HBM_BYTES_PER_S = 3.0e12
_LAUNCH_S = 3.0e-6


def fuse_shrink(M: int, K: int, N: int, R: int, elem_bytes: int, dropout: bool) -> bool:
    """Whether the shrink product is cheaper inside the GEMM's K loop than as its own kernel (or as
    `kernel_options().fused_shrink` pins it)."""
    if dropout or R > FUSED_SHRINK_MAX_RANK:
        return False  # the mask would be regenerated per column tile; and S must fit one rank block
    forced = dispatch.kernel_options().fused_shrink
    if forced is not None:
        return forced
    redundant = 2.0 * M * K * max(R, 16) * math.ceil(N / 128) / _MMA_FLOPS
    separate = _LAUNCH_S + M * K * elem_bytes / _HBM_BYTES_PER_S
    return redundant <= separate


def _col_scaled_b(lora_b, c):
    """B for the separate shrink G = (dY ⊙ c) B = dY (B ⊙ c): scaled only on that path (the fused one scales dY)."""
    return lora_b if c is None else lora_b * c[:, None].to(lora_b.dtype)


def dropout_args(seed, dropout_p):
    if dropout_p == 0.0 or seed is None:
        return {}
    return {"seed": seed, "threshold": keep_threshold(dropout_p), "inv_keep": 1.0 / (1.0 - dropout_p)}


def triton_forward(x, weight, bias, lora_a, lora_b, scale, seed, dropout_p, fan_in_fan_out, need_t, out_scale,
                    need_z):
    kern = _kernels()
    bias = bias.contiguous() if bias is not None else None  # the kernels index bias and scales densely
    scale = scale.contiguous()
    M, K = x.shape
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    R = lora_a.shape[0]
    out = dispatch.new_output((M, N), like=x)
    t = dispatch.new_output((M, R) if need_t else (0,), like=x, dtype=torch.float32)
    z = dispatch.new_output((M, N) if need_z else (0,), like=x)
    if M == 0:
        return out, t, z
    w_kn = weight if fan_in_fan_out else weight.t()
    drop = dropout_args(seed, dropout_p)
    if cublas_base(x, R, out_scale):  # Y = x Wᵀ (+ b) on cuBLAS, then the adapter's terms in place
        c = out_scale.contiguous() if out_scale is not None else None
        if bias is not None and c is None:
            torch.addmm(bias, x, w_kn, out=out)
        else:
            torch.mm(x, w_kn, out=out)
        _update_kernel().update(x, lora_a.t(), lora_b.t(), scale, out, s=t if need_t else None, **drop,
                                out_scale=c, bias=bias if c is not None else None, z=z if need_z else None,
                                target_programs=target_programs(x.device))
        return out, t, z
    col = {} if out_scale is None else {"out_scale": out_scale.contiguous(), "z": z if need_z else None}
    if fuse_shrink(M, K, N, R, x.element_size(), bool(drop)):
        kern.gemm(x, w_kn, bias, lora_b.t(), scale, out, s=t if need_t else None, u_kr=lora_a.t(), write_s=need_t,
                  **col)
    else:
        s = t if need_t else dispatch.new_output((M, R), like=x, dtype=torch.float32)
        kern.shrink(x, lora_a.t(), s, **drop)
        kern.gemm(x, w_kn, bias, lora_b.t(), scale, out, s=s, **col)
    return out, t, z


def triton_backward(dy, x, weight, lora_a, lora_b, scale, t, seed, dropout_p, fan_in_fan_out, needs, out_scale, z,
                     dx_gemm=None):
    """With a column scale c, dY' = dY ⊙ c is never stored: the dX GEMM scales the dY tiles it loads (and
    reduces dc = Σ_m dY ⊙ Z from them), the shrink G = dY' B uses B ⊙ c, and dB = c ⊙ (dYᵀ (T ⊙ s)).
    `dx_gemm(dy, g, dx)`, when given, writes dX = dY W + keep ⊙ ((G ⊙ s) A) for a weight that is not a dense
    tensor (a 4-bit one, fastpeft/ops/lora_4bit.py); G is then made by the shrink kernel first."""
    kern = _kernels()
    scale = scale.contiguous()
    need_dx, need_da, need_db, need_ds, need_dbias, need_dc = needs
    M, N = dy.shape
    K = x.shape[1]
    R = lora_a.shape[0]
    drop = dropout_args(seed, dropout_p)
    dx, da, db, ds, dbias, dc = (dy.new_empty((0,)) for _ in range(6))
    if M == 0:
        zeros = (dy.new_zeros((0, K)), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(scale),
                 dy.new_zeros((N,)), torch.zeros((N,), device=dy.device, dtype=torch.float32))
        return tuple(zero if need else empty for zero, need, empty in zip(zeros, needs, (dx, da, db, ds, dbias, dc)))
    c = out_scale.contiguous() if out_scale is not None else None
    g = None
    if need_da or need_ds or need_dx:
        g = dispatch.new_output((M, R), like=dy, dtype=torch.float32)  # G = dY' B
    if need_dx and dx_gemm is not None:
        dx = dispatch.new_output((M, K), like=dy)
        kern.shrink(dy, lora_b, g)
        dx_gemm(dy, g, dx)
    elif need_dx:
        dx = dispatch.new_output((M, K), like=dy)
        w_nk = weight.t() if fan_in_fan_out else weight
        extra = {}
        if c is not None:
            extra["in_scale"] = c
            if need_dc:
                dc = dispatch.new_output((N,), like=dy, dtype=torch.float32)
                extra["in_dot"] = (z, dc)
        if cublas_base(dy, R, c):  # dX = dY' W on cuBLAS, then + keep ⊙ s (dY' B) A in place
            dy_c = dy if c is None else scale_cols(dy, c)
            torch.mm(dy_c, w_nk, out=dx)
            _update_kernel().update(dy_c, lora_b, lora_a, scale, dx, s=g, **drop, mask_out=True,
                                    target_programs=target_programs(dy.device))
            if need_dc:
                dc = (dy.float() * z.float()).sum(0)
        elif fuse_shrink(M, N, K, R, dy.element_size(), False):  # the fused shrink sees the scaled dY tiles
            kern.gemm(dy, w_nk, None, lora_a, scale, dx, s=g, u_kr=lora_b, write_s=True, **drop, **extra)
        else:
            kern.shrink(dy, _col_scaled_b(lora_b, c), g)
            kern.gemm(dy, w_nk, None, lora_a, scale, dx, s=g, **drop, **extra)
    elif g is not None:
        kern.shrink(dy, _col_scaled_b(lora_b, c), g)
    if need_dc and dc.numel() == 0:  # no dX GEMM to reduce it in
        dc = (dy.float() * z.float()).sum(0)
    target = target_programs(dy.device)
    if need_da:
        da = dispatch.new_output(tuple(lora_a.shape), like=lora_a)
        kern.reduce(x, g, scale, da.t(), splits=kern.reduce_splits(M, K, R, target), **drop)
    if need_db:
        db = dispatch.new_output(tuple(lora_b.shape), like=lora_b)
        colsum = dispatch.new_output((N,), like=dy, dtype=torch.float32) if need_dbias else None
        kern.reduce(dy, t, scale, db, colsum=colsum, splits=kern.reduce_splits(M, N, R, target))
        if c is not None:
            db.mul_(c[:, None].to(db.dtype))
        dbias = colsum if need_dbias else dbias
    elif need_dbias:
        dbias = dy.float().sum(0)
    if need_ds:
        ds = (t * g).sum(0).to(scale.dtype)
    if need_dc:
        dc = dc.to(out_scale.dtype)
    return dx, da, db, ds, dbias, dc
