"""`fp.ops.bottleneck_adapter`: the bottleneck adapter block (math: fastpeft/reference/bottleneck.py).

    y = r + s · (f(x W_dᵀ + b_d) W_uᵀ + b_u)

On CUDA the block runs on the LoRA kernels: the shrink kernel computes S = x W_dᵀ (float32, M x m), and the GEMM
kernel with no base product (K = 0) forms f(S + b_d) in its epilogue, multiplies by W_uᵀ, adds s·b_u and the
residual, and stores y once: x and r are read once, y written once, and only S (m = d / reduction_factor
columns) goes through memory. The backward recomputes f and f' from S (nothing else is saved but x):
    dF = s · dY W_u,  dS = dF ⊙ f'(S + b_d),  dx = dS W_d,  dW_d = dSᵀ x,  dW_u = s · dYᵀ f(S + b_d),
    db_d = Σ dS,  db_u = s · Σ dY,  dr = dY
(the shrink, GEMM and reduction kernels of fastpeft/kernels/lora.py). Layer norms, gating and learned scaling
run the reference (PyTorch) for now.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import bottleneck as reference
from . import dispatch, registry
from .lora import TINY_M, TRITON_DTYPES, _target_programs

registry.describe("bottleneck_adapter", dtypes=TRITON_DTYPES, doc="y = r + s (f(x Wd^T + bd) Wu^T + bu)",
                  note="layer norms, gating and learned scaling run the reference")
KERNEL_ACTIVATIONS = {"linear": 0, "relu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3, "swish": 4,
                      "silu": 4, "tanh": 5}  # kernels/lora.py ACTIVATIONS (not imported: triton stays unloaded)


def _kernels():
    from ..kernels import lora

    return lora


def bottleneck_adapter(x: Tensor, residual: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor,
                       b_up: Tensor | None, *, non_linearity: str = "relu", scaling: float | Tensor = 1.0,
                       ln_before=None, ln_after=None, gate=None, adapter_residual_before_ln: bool = False) -> Tensor:
    """The bottleneck adapter block for x and residual of shape (..., d); w_down (m, d), w_up (d, m)."""
    _check(x, residual, w_down, b_down, w_up, b_up)
    reference.activation(non_linearity)  # a clear error for an unknown name
    plain = (ln_before is None and ln_after is None and gate is None and not isinstance(scaling, Tensor)
             and non_linearity.lower() in KERNEL_ACTIVATIONS)
    d = x.shape[-1]
    x2, r2 = x.reshape(-1, d), residual.reshape(-1, d)
    if not plain or (_backend(x2) == "torch" and not torch.compiler.is_compiling()):
        return reference.bottleneck_adapter(x, residual, w_down, b_down, w_up, b_up, non_linearity=non_linearity,
                                            scaling=scaling, ln_before=ln_before, ln_after=ln_after, gate=gate,
                                            adapter_residual_before_ln=adapter_residual_before_ln)
    y, _ = torch.ops.fastpeft.bottleneck_adapter(x2, r2, w_down, b_down, w_up, b_up, non_linearity.lower(),
                                                 float(scaling))
    return y.reshape(x.shape)


def _check(x, residual, w_down, b_down, w_up, b_up) -> None:
    d = x.shape[-1]
    m = w_down.shape[0]
    if residual.shape != x.shape:
        raise ValueError(f"bottleneck_adapter: residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}; "
                         "they must match.")
    if w_down.dim() != 2 or w_down.shape[1] != d or w_up.shape != (d, m):
        raise ValueError(f"bottleneck_adapter: w_down {tuple(w_down.shape)} and w_up {tuple(w_up.shape)} must be "
                         f"(m, {d}) and ({d}, m) for inputs of {d} features.")
    for name, t, n in (("b_down", b_down, m), ("b_up", b_up, d)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"bottleneck_adapter: {name} has shape {tuple(t.shape)}; expected ({n},).")
    for name, t in (("residual", residual), ("w_down", w_down), ("w_up", w_up), ("b_down", b_down), ("b_up", b_up)):
        if t is not None and t.device != x.device:
            raise ValueError(f"bottleneck_adapter: {name} is on {t.device} but x is on {x.device}.")


def _backend(x2: Tensor) -> str:
    backend = dispatch.choose("bottleneck_adapter", x2.device, x2.dtype, triton_dtypes=TRITON_DTYPES)
    if backend == "triton" and x2.device.type == "cuda" and x2.shape[0] <= TINY_M and not dispatch.requested_backend():
        return "torch"
    return backend


def _act_and_grad(s: Tensor, b_down: Tensor | None, name: str, d_f: Tensor | None = None):
    """f(S + b) and, given dF, dS = dF ⊙ f'(S + b), in float32 (written out: op bodies run below autograd)."""
    z = s if b_down is None else s + b_down.float()
    if name == "linear":
        f, slope = z, torch.ones_like(z)
    elif name == "relu":
        f, slope = torch.relu(z), (z > 0).float()
    elif name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        f, slope = z * cdf, cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    elif name in ("gelu_new", "gelu_pytorch_tanh"):
        t = torch.tanh(0.7978845608028654 * (z + 0.044715 * z ** 3))
        f = 0.5 * z * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif name in ("swish", "silu"):
        sig = torch.sigmoid(z)
        f, slope = z * sig, sig * (1.0 + z * (1.0 - sig))
    else:  # tanh
        f = torch.tanh(z)
        slope = 1.0 - f * f
    return f, (d_f * slope if d_f is not None else None)


@torch.library.triton_op("fastpeft::bottleneck_adapter", mutates_args=())
def _bottleneck_op(x: Tensor, residual: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor,
                   b_up: Tensor | None, non_linearity: str, scaling: float) -> tuple[Tensor, Tensor]:
    """(y, S) with S = x W_dᵀ in float32, kept for the backward pass."""
    M, _ = x.shape
    m = w_down.shape[0]
    if _backend(x) == "torch" or M == 0:
        s = (x @ w_down.t().to(x.dtype)).float()
        f, _ = _act_and_grad(s, b_down, non_linearity)
        up = f.to(x.dtype) @ w_up.t().to(x.dtype)
        if b_up is not None:
            up = up + b_up.to(x.dtype)
        return (residual.float() + scaling * up.float()).to(x.dtype), s
    kern = _kernels()
    s = dispatch.new_output((M, m), like=x, dtype=torch.float32)
    kern.shrink(x, w_down.t(), s)
    y = dispatch.new_output(tuple(x.shape), like=x)
    e_rn = w_up.t()  # (m, d)
    bias = (b_up.float() * scaling).to(x.dtype) if b_up is not None else None
    kern.gemm(x[:, :0], e_rn[:0], bias, e_rn, torch.full((m,), float(scaling), device=x.device), y, s=s,
              s_act=KERNEL_ACTIVATIONS[non_linearity], s_bias=b_down.contiguous() if b_down is not None else None,
              residual=residual)
    return y, s


@torch.library.triton_op("fastpeft::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_backward_op(dy: Tensor, x: Tensor, s: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor,
                            non_linearity: str, scaling: float, need_dx: bool
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_d, db_d, dW_u, db_u); dx empty unless need_dx."""
    M, d = dy.shape
    m = w_down.shape[0]
    triton_path = _backend(dy) != "torch" and M > 0
    if triton_path:
        kern = _kernels()
        d_f = dispatch.new_output((M, m), like=dy, dtype=torch.float32)
        kern.shrink(dy, w_up, d_f)  # dY W_u
    else:
        d_f = (dy @ w_up.to(dy.dtype)).float()
    f, d_s = _act_and_grad(s, b_down, non_linearity, d_f * scaling)
    db_down = d_s.sum(0).to(b_down.dtype) if b_down is not None else d_s.new_empty((0,))
    dx = dy.new_empty((0,))
    if triton_path:
        ones = torch.ones((m,), device=dy.device)
        dw_up = dispatch.new_output(tuple(w_up.shape), like=w_up)
        db_up = dispatch.new_output((d,), like=dy, dtype=torch.float32)
        target = _target_programs(dy.device)  # SM count cached: no device query per call
        kern.reduce(dy, f, torch.full((m,), float(scaling), device=dy.device), dw_up, colsum=db_up,
                    splits=kern.reduce_splits(M, d, m, target))
        dw_down = dispatch.new_output(tuple(w_down.shape), like=w_down)
        kern.reduce(x, d_s, ones, dw_down.t(), splits=kern.reduce_splits(M, d, m, target))
        if need_dx:
            dx = dispatch.new_output((M, d), like=dy)
            kern.gemm(dy[:, :0], w_down[:0], None, w_down, ones, dx, s=d_s)
        db_up = db_up * scaling
    else:
        dw_up = (scaling * (dy.float().t() @ f)).to(w_up.dtype)
        db_up = scaling * dy.float().sum(0)
        dw_down = (d_s.t() @ x.float()).to(w_down.dtype)
        if need_dx:
            dx = (d_s @ w_down.float()).to(dy.dtype)
    return dx, dw_down, db_down, dw_up, db_up


def _setup_context(ctx, inputs, output):
    x, _, w_down, b_down, w_up, b_up, non_linearity, scaling = inputs
    ctx.save_for_backward(x, output[1], w_down, b_down, w_up)
    ctx.non_linearity, ctx.scaling = non_linearity, scaling
    ctx.b_up_dtype = b_up.dtype if b_up is not None else None


def _backward(ctx, dy, _ds):
    x, s, w_down, b_down, w_up = ctx.saved_tensors
    need_dx, need_dr, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:6]
    dx, dw_down, db_down, dw_up, db_up = torch.ops.fastpeft.bottleneck_adapter_backward(
        dy, x, s, w_down, b_down, w_up, ctx.non_linearity, ctx.scaling, need_dx)
    return (dx if need_dx else None, dy if need_dr else None, dw_down if need_wd else None,
            db_down if need_bd else None, dw_up if need_wu else None,
            db_up.to(ctx.b_up_dtype) if need_bu else None, None, None)


torch.library.register_autograd("fastpeft::bottleneck_adapter", _backward, setup_context=_setup_context)
