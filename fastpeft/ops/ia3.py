"""`fp.ops.ia3_linear`: the IA3 linear as one registered op with autograd.

    y = ((x ⊙ u) Wᵀ + b) ⊙ v          (math and backward: fastpeft/reference/ia3.py)

An IA3 layer costs one GEMM: on CUDA the LoRA GEMM kernel of fastpeft/kernels/lora.py runs with no low-rank
term (the launcher of fastpeft/kernels/ia3.py), u applied to the x tiles as they are loaded (prologue) and v in
the epilogue. The backward is that GEMM again, dX = ((dY ⊙ v) W) ⊙ u, with the vector gradients reduced inside
it: dv = Σ_m dY ⊙ Z from the dY tiles the prologue already loads, du = Σ_m H ⊙ x in the epilogue; per-row-block
partials are summed afterwards.
The cuBLAS-base strategy (fastpeft/ops/strategy.py) runs the reference's formula instead: the GEMM on cuBLAS, the
scales as single elementwise passes (the traffic of PEFT's IA3 layer, never more).
Saved for backward: x, and Z (the output before v) when v is trained.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.limits import TRITON_DTYPES
from ..reference import ia3 as reference
from ..reference._common import scale_cols
from . import dispatch, registry
from .strategy import strategy
from ._common import TINY_M, autocast, check_base, check_device, check_vector, dense, rows_backend

registry.describe("ia3_linear", dtypes=TRITON_DTYPES, doc="y = ((x * u) W^T + b) * v",
                  note=f"inputs of at most {TINY_M} rows (tokens) run the reference (cuBLAS)")


def _kernels():
    from ..kernels import ia3  # imported on first CUDA call only: `import fastpeft` never loads triton

    return ia3


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, in_scale: Tensor | None = None,
               out_scale: Tensor | None = None, *, fan_in_fan_out: bool = False) -> Tensor:
    """y = ((x ⊙ in_scale) Wᵀ + b) ⊙ out_scale for x of shape (..., K).

    weight: (N, K), or (K, N) with `fan_in_fan_out` (GPT-2 Conv1D, used in place); in_scale: (K,) or None;
    out_scale: (N,) or None. The scales may be float32 on a half-precision model (they are applied in float32).
    """
    x, weight, bias = autocast(x, weight, bias)
    K, N = _check(x, weight, bias, in_scale, out_scale, fan_in_fan_out)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, in_scale, out_scale))
    need_z = grads and out_scale is not None and out_scale.requires_grad
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    args = (x2, weight, bias, in_scale, out_scale, bool(fan_in_fan_out))
    if torch.compiler.is_compiling() or rows_backend("ia3_linear", x2) != "torch":
        y, _ = torch.ops.fastpeft.ia3_linear(*args, need_z)
    else:  # eager on the reference: autograd through it saves what the formula needs and skips the op boundary
        y, _ = reference.ia3_linear_fwd(*args, False)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def _check(x, weight, bias, in_scale, out_scale, fan_in_fan_out):
    """Host-side validation before any launch. Returns (K, N)."""
    K, N = check_base(x, weight, fan_in_fan_out, "ia3_linear")
    check_device(weight, "weight", x, "ia3_linear")
    check_vector(bias, "bias", N, "one entry per output feature", x, "ia3_linear")
    check_vector(in_scale, "in_scale", K, "one entry per input feature", x, "ia3_linear")
    check_vector(out_scale, "out_scale", N, "one entry per output feature", x, "ia3_linear")
    return K, N


@torch.library.triton_op("fastpeft::ia3_linear", mutates_args=())
def _ia3_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, in_scale: Tensor | None,
                   out_scale: Tensor | None, fan_in_fan_out: bool, need_z: bool) -> tuple[Tensor, Tensor]:
    if rows_backend("ia3_linear", x) == "torch" or strategy("ia3_linear", x) == "cublas":
        return reference.ia3_linear_fwd(x, weight, bias, in_scale, out_scale, fan_in_fan_out, need_z)
    return _triton_forward(x, weight, bias, in_scale, out_scale, fan_in_fan_out, need_z)


@torch.library.triton_op("fastpeft::ia3_linear_backward", mutates_args=())
def _ia3_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, in_scale: Tensor | None,
                            out_scale: Tensor | None, z: Tensor, fan_in_fan_out: bool, need_dx: bool,
                            need_du: bool, need_dv: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dx, need_du, need_dv, need_db)
    if rows_backend("ia3_linear", dy) == "torch" or strategy("ia3_linear", dy) == "cublas":
        return reference.ia3_linear_bwd(dy, x, weight, in_scale, out_scale, z, fan_in_fan_out, needs)
    return _triton_backward(dy, x, weight, in_scale, out_scale, z, fan_in_fan_out, needs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_scale, out_scale, fan_in_fan_out, _ = inputs
    ctx.save_for_backward(x, weight, in_scale, out_scale, output[1])
    ctx.fan_in_fan_out = fan_in_fan_out
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (bias, in_scale, out_scale))
    ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state


def _backward(ctx, dy, _dz):
    x, weight, in_scale, out_scale, z = ctx.saved_tensors
    need_dx, need_dw, need_db, need_du, need_dv = ctx.needs_input_grad[:5]
    with dispatch.restore(ctx.dispatch):
        dx, du, dv, db = torch.ops.fastpeft.ia3_linear_backward(dy, x, weight, in_scale, out_scale, z,
                                                                ctx.fan_in_fan_out, need_dx, need_du, need_dv, need_db)
    dw = None
    if need_dw:  # a trainable base weight (unusual with IA3): dW = (dY ⊙ v)ᵀ (x ⊙ u), transposed for Conv1D
        dz = scale_cols(dy, out_scale).to(weight.dtype)
        dw = dz.t() @ scale_cols(x, in_scale).to(weight.dtype)
        dw = dw.t() if ctx.fan_in_fan_out else dw
    bias_dt, u_dt, v_dt = ctx.dtypes
    return (dx if need_dx else None, dw, db.to(bias_dt) if need_db else None,
            du.to(u_dt) if need_du else None, dv.to(v_dt) if need_dv else None, None, None)


torch.library.register_autograd("fastpeft::ia3_linear", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------------
# Triton paths: the LoRA GEMM kernel with an empty low-rank term and the IA3 scales switched on (kernels/ia3.py)
# ------------------------------------------------------------------------------------------------------------

def _triton_forward(x, weight, bias, in_scale, out_scale, fan_in_fan_out, need_z):
    kern = _kernels()
    M, K = x.shape
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    out = dispatch.new_output((M, N), like=x)
    z = dispatch.new_output((M, N) if need_z else (0,), like=x)
    if M == 0:
        return out, z
    w_kn = weight if fan_in_fan_out else weight.t()
    kern.scaled_gemm(x, w_kn, dense(bias), out, in_scale=dense(in_scale), out_scale=dense(out_scale),
                     scale_bias=True, z=z if need_z else None)
    return out, z


def _triton_backward(dy, x, weight, in_scale, out_scale, z, fan_in_fan_out, needs):
    kern = _kernels()
    need_dx, need_du, need_dv, need_db = needs
    M, N = dy.shape
    K = x.shape[1]
    dx, du, dv, db = (dy.new_empty((0,)) for _ in range(4))
    if M == 0:
        zeros = (dy.new_zeros((0, K)), torch.zeros_like(in_scale) if need_du else du,
                 torch.zeros_like(out_scale) if need_dv else dv, dy.new_zeros((N,)) if need_db else db)
        return tuple(zero if need else e for zero, need, e in zip(zeros, needs, (dx, du, dv, db)))
    if need_dx or need_du:
        dx = dispatch.new_output((M, K), like=dy)
        w_nk = weight.t() if fan_in_fan_out else weight
        dv_f = dispatch.new_output((N,), like=dy, dtype=torch.float32) if need_dv else None
        db_f = dispatch.new_output((N,), like=dy, dtype=torch.float32) if need_db else None
        du_f = dispatch.new_output((K,), like=dy, dtype=torch.float32) if need_du else None
        kern.scaled_gemm(dy, w_nk, None, dx, in_scale=dense(out_scale), out_scale=dense(in_scale),
                         in_dot=(z, dv_f) if need_dv else None, in_sum=db_f, out_dot=(x, du_f) if need_du else None)
        if need_du:
            du = du_f
        if need_dv:
            dv = dv_f
        if need_db:
            db = db_f
    else:  # no GEMM to fuse the reductions into (x needs no gradient)
        if need_dv:
            dv = (dy.float() * z.float()).sum(0)
        if need_db:
            db = scale_cols(dy, out_scale).float().sum(0)
    return dx, du, dv, db
