"""`fp.ops.bottleneck_adapter`: the bottleneck adapter block (math: fastpeft/reference/bottleneck.py).

    h = x, or LN_before(x) = x̂ ⊙ γ + β with x̂ = (x − μ) · rstd
    y = r + s ⊙ (f(h W_dᵀ + b_d) W_uᵀ + b_u)       s: a number, or a (1,) or (d,) tensor (learned / channel)
    (with ln_after: y = LN_after(s ⊙ (...) + r), or LN_after(s ⊙ (...)) + r)

`fastpeft::bottleneck_adapter` returns (y, S, stats, astats): S = h W_dᵀ (float32, M x m) and the rows' (μ, rstd)
of the layer norms before and after, kept for the backward pass (nothing else is saved but x, the parameters and,
when it is added before the layer norm after, the residual). With the layer norm after, dY is first taken through
its backward, ẑ = (z − μ_a) rstd_a recomputed from S (z = s ⊙ (F W_uᵀ + b_u) (+ r)):
    dz = rstd_a · (γ_a ⊙ dY − mean_k(γ_a ⊙ dY) − ẑ · mean_k(γ_a ⊙ dY ⊙ ẑ)),  dγ_a = Σ dY ⊙ ẑ,  dβ_a = Σ dY
and dz replaces dY below (dz = dY without it):
    dF = (dz ⊙ s) W_u,   dS = dF ⊙ f'(S + b_d),   dh = dS W_d,   dx = dh, or through the layer norm
    dx = rstd · (γ ⊙ dh − mean_k(γ ⊙ dh) − x̂ · mean_k(γ ⊙ dh ⊙ x̂))
    dW_u = s ⊙ dzᵀ F (F = f(S + b_d)),  db_u = s ⊙ Σ dz,  ds = Σ dz ⊙ (F W_uᵀ + b_u) (summed to s's shape)
    dW_d = dSᵀ h,  db_d = Σ dS,  dγ = Σ dh ⊙ x̂,  dβ = Σ dh,  dr = dz (dY when r is added after the norm)
With the layer norm before, all three come from one reduction over x, Q = (dS ⊙ rstd)ᵀ x − (dS ⊙ rstd)ᵀ μ
(= Σ_rows dS ⊗ x̂, d x m):  dW_d = (γ ⊙ Q + β ⊗ Σ dS)ᵀ,  dγ = Σ_j W_dᵀ ⊙ Q,  dβ = (Σ dS) W_d.
On CUDA (m <= 256) one kernel does the forward in one pass over x and r (the layer norm after fused in: its row
statistics accumulated as the pre-norm output is written, then a pass over the row block's own, L2-resident
output normalizes it), and one kernel the row-wise backward (dz, dF, dS, dx, and the 16-row partial sums of
dγ_a, dβ_a); the weight gradients are the deterministic split reductions of fastpeft/kernels/lora.py
(fastpeft/kernels/bottleneck.py has the formulas). Wider bottlenecks run the two-kernel path on the LoRA kernels
(shrink S = x W_dᵀ, then the GEMM kernel with no base product, f(S + b_d) and the residual in its epilogue), with
PyTorch's layer norm after on that output. Gating (a mean over the sequence, across rows) and dropout > 0 run the
reference. Which path runs is listed in the registry note (`fastpeft info`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import ACTIVATIONS, BOTTLENECK_MAX_WIDTH, EPILOGUE_ACTIVATIONS, TRITON_DTYPES
from ..reference import bottleneck as reference
from . import dispatch, registry
from ._common import TINY_M, check_device, dense, rows_backend, target_programs

registry.describe(
    "bottleneck_adapter", dtypes=TRITON_DTYPES, doc="y = r + s (f(LN?(x) Wd^T + bd) Wu^T + bu), LN after optional",
    note=(f"fused single-pass kernels (forward and backward) for bottleneck width m <= {BOTTLENECK_MAX_WIDTH}, with "
          "ln_before and ln_after (residual before or after it) fused, scaling a number or a (1,)/(d,) tensor; "
          f"m > {BOTTLENECK_MAX_WIDTH}: LoRA shrink + expand kernels (numeric scaling, no ln_before; ln_after: "
          f"PyTorch's layer norm on their output); gating, dropout > 0, and ln_before or tensor scaling with "
          f"m > {BOTTLENECK_MAX_WIDTH} run the reference; inputs of at most {TINY_M} rows run the reference"))


def _kernels():
    from ..kernels import bottleneck, lora  # imported on first CUDA call only: `import fastpeft` never loads triton

    return bottleneck, lora


# ------------------------------------------------------------------------------------------------------------
# Public functional op
# ------------------------------------------------------------------------------------------------------------

def activation(name: str):
    """The non-linearity AdapterHub's `non_linearity` names (through transformers' ACT2FN), case-insensitive, as a
    function of a tensor; ValueError for a name fastpeft does not compute."""
    return reference.activation(name)


def bottleneck_adapter(x: Tensor, residual: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor,
                       b_up: Tensor | None, *, non_linearity: str = "relu", scaling: float | Tensor = 1.0,
                       ln_before=None, ln_after=None, gate=None, adapter_residual_before_ln: bool = False,
                       dropout: float = 0.0, eps: float = 1e-5) -> Tensor:
    """The bottleneck adapter block for x and residual of shape (..., d); w_down (m, d), w_up (d, m).

    scaling: a number, or a tensor of 1 or d elements (AdapterHub's "learned" and "channel"); ln_before,
    ln_after, gate: (weight, bias) pairs or None; dropout: AdapterHub's dropout on s · up (pass 0.0 in eval).
    """
    _check(x, residual, w_down, b_down, w_up, b_up, scaling, dropout)
    try:
        activation(non_linearity)
    except ValueError as exc:  # an unknown name: say where
        raise InputError(f"bottleneck_adapter: {exc}") from None
    act = non_linearity.lower()
    d, m = x.shape[-1], w_down.shape[0]
    wide = m > BOTTLENECK_MAX_WIDTH
    scale = scaling.reshape(-1) if isinstance(scaling, Tensor) else None
    kernel_ok = gate is None and dropout == 0.0 and not (wide and (ln_before is not None or scale is not None))
    x2, r2 = x.reshape(-1, d), residual.reshape(-1, d)
    if not kernel_ok or (rows_backend("bottleneck_adapter", x2) == "torch" and not torch.compiler.is_compiling()):
        return reference.bottleneck_adapter(x, residual, w_down, b_down, w_up, b_up, non_linearity=non_linearity,
                                            scaling=scaling, ln_before=ln_before, ln_after=ln_after, gate=gate,
                                            adapter_residual_before_ln=adapter_residual_before_ln, dropout=dropout,
                                            eps=eps)
    ln_w = ln_b = la_w = la_b = None
    if ln_before is not None:
        ln_w, ln_b = ln_before
        ln_w = ln_w if ln_w is not None else torch.ones(d, device=x.device, dtype=x.dtype)
    fuse_after = ln_after is not None and not wide  # the wide path applies PyTorch's layer norm to its output
    if fuse_after:
        la_w, la_b = ln_after
        la_w = la_w if la_w is not None else torch.ones(d, device=x.device, dtype=x.dtype)
        la_b = la_b if la_b is not None else torch.zeros(d, device=x.device, dtype=x.dtype)
    params = (x, w_down, b_down, w_up, b_up, scale, ln_w, ln_b, la_w, la_b, r2 if fuse_after else None)
    need_s = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    residual_in = r2 if ln_after is None or adapter_residual_before_ln or fuse_after else None
    y = torch.ops.fastpeft.bottleneck_adapter(x2, residual_in, w_down, b_down, w_up, b_up, scale,
                                              float(scaling) if scale is None else 1.0, ln_w, ln_b, la_w, la_b,
                                              bool(adapter_residual_before_ln), act, float(eps), need_s)[0]
    if ln_after is not None and not fuse_after:
        y = F.layer_norm(y, (d,), *ln_after, eps=eps)
        if not adapter_residual_before_ln:
            y = y + r2
    return y.reshape(x.shape)


def _check(x, residual, w_down, b_down, w_up, b_up, scaling, dropout) -> None:
    where = "bottleneck_adapter"
    d = x.shape[-1]
    m = w_down.shape[0]
    if residual.shape != x.shape:
        raise InputError(f"{where}: residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}; they must match "
                         "(pass the sub-layer's input as the residual, or zeros for none).")
    if w_down.dim() != 2 or w_down.shape[1] != d or w_up.shape != (d, m):
        raise InputError(f"{where}: w_down {tuple(w_down.shape)} and w_up {tuple(w_up.shape)} must be "
                         f"(m, {d}) and ({d}, m) for inputs of {d} features; pass the down and up projections' "
                         "weights in nn.Linear's (out, in) layout.")
    for name, t, n in (("b_down", b_down, m), ("b_up", b_up, d)):
        if t is not None and t.shape != (n,):
            raise InputError(f"{where}: {name} has shape {tuple(t.shape)}; expected ({n},) (or None).")
    if isinstance(scaling, Tensor):
        if scaling.numel() not in (1, d) or (scaling.numel() == d and scaling.shape[-1] != d):
            raise InputError(f"{where}: scaling has shape {tuple(scaling.shape)}; use a number, a "
                             f"1-element tensor (scaling='learned') or a ({d},) tensor (scaling='channel').")
        residual_tensors = (("scaling", scaling),)
    else:
        residual_tensors = ()
    if not 0.0 <= float(dropout) < 1.0:
        raise InputError(f"{where}: dropout={dropout} is outside [0, 1); use a probability such as 0.1, or 0.0 "
                         "(always 0.0 in eval).")
    for name, t in (("residual", residual), ("w_down", w_down), ("w_up", w_up), ("b_down", b_down), ("b_up", b_up),
                    *residual_tensors):
        check_device(t, name, x, where)
    if not x.dtype.is_floating_point:
        raise InputError(f"{where}: x is {x.dtype}; pass floating-point hidden states, e.g. x.float().")
    if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts the weights itself
        for name, t in (("w_down", w_down), ("w_up", w_up), ("b_down", b_down), ("b_up", b_up)):
            if t is not None and t.dtype != x.dtype:
                raise InputError(f"{where}: {name} is {t.dtype} but x is {x.dtype}; cast the adapter's weights to "
                                 f"x's dtype ({name}.to(x.dtype)), or run under torch.autocast.")


def _ln_vectors(w_down: Tensor, ln_w: Tensor, ln_b: Tensor | None) -> tuple[Tensor, Tensor]:
    """γ W_dᵀ and β W_dᵀ (float32 m-vectors) for the layer norm folded into the down projection."""
    wd = w_down.float()
    gwd = wd @ ln_w.float()
    bwd = wd @ ln_b.float() if ln_b is not None else torch.zeros_like(gwd)
    return gwd, bwd


# ------------------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------------------

@torch.library.triton_op("fastpeft::bottleneck_adapter", mutates_args=())
def _bottleneck_op(x: Tensor, residual: Tensor | None, w_down: Tensor, b_down: Tensor | None, w_up: Tensor,
                   b_up: Tensor | None, scale: Tensor | None, scale_value: float, ln_weight: Tensor | None,
                   ln_bias: Tensor | None, ln_after_weight: Tensor | None, ln_after_bias: Tensor | None,
                   residual_before_ln: bool, non_linearity: str, eps: float, need_s: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, S, stats, astats): S = h W_dᵀ (M x m float32), stats = (μ, rstd) per row (M x 2, with a layer norm
    before) and astats the same for the layer norm after, when need_s; empty otherwise. No residual: y is the
    adapter's output alone (then through the layer norm after, when given: both its weight and bias, or neither);
    with one, it is added before that norm when residual_before_ln, after it otherwise."""
    M, _ = x.shape
    m = w_down.shape[0]
    if rows_backend("bottleneck_adapter", x) == "torch" or M == 0:
        return reference.bottleneck_adapter_fwd(x, residual, w_down, b_down, w_up, b_up, scale, scale_value,
                                                ln_weight, ln_bias, ln_after_weight, ln_after_bias, residual_before_ln,
                                                non_linearity, eps, need_s)
    kern, lora = _kernels()
    b_down, b_up, ln_weight, ln_bias, ln_after_weight, ln_after_bias = (
        dense(t) for t in (b_down, b_up, ln_weight, ln_bias, ln_after_weight, ln_after_bias))
    y = dispatch.new_output(tuple(x.shape), like=x)
    s = dispatch.new_output((M, m), like=x, dtype=torch.float32) if need_s else _empty(x)
    if m <= BOTTLENECK_MAX_WIDTH:
        ln = stats = ln_after = astats = None
        if ln_weight is not None:
            ln = (ln_weight, *_ln_vectors(w_down, ln_weight, ln_bias))
            stats = dispatch.new_output((M, 2), like=x, dtype=torch.float32) if need_s else None
        if ln_after_weight is not None:
            ln_after = (ln_after_weight, ln_after_bias)
            astats = dispatch.new_output((M, 2), like=x, dtype=torch.float32) if need_s else None
        kern.forward(x, residual, w_down, b_down, w_up, b_up, y, act=ACTIVATIONS[non_linearity],
                     scale=scale, scale_value=scale_value, ln=ln, eps=eps, s=s if need_s else None, stats=stats,
                     ln_after=ln_after, residual_after_ln=not residual_before_ln, astats=astats)
        return (y, s, stats if stats is not None else _empty(x), astats if astats is not None else _empty(x))
    if ln_after_weight is not None:
        raise ValueError(f"bottleneck_adapter: the fused layer norm after needs m <= {BOTTLENECK_MAX_WIDTH} "
                         "(fp.ops.bottleneck_adapter applies PyTorch's layer norm to the wide path's output)")
    if ln_weight is not None or scale is not None:
        raise ValueError(f"bottleneck_adapter: a layer norm before the adapter or a tensor scaling needs m <= "
                         f"{BOTTLENECK_MAX_WIDTH} on the Triton path (fp.ops.bottleneck_adapter routes it to the "
                         "reference)")
    if not need_s:
        s = dispatch.new_output((M, m), like=x, dtype=torch.float32)
    lora.shrink(x, w_down.t(), s)  # the two-kernel path: S, then the GEMM kernel with f(S + b_d) in its epilogue
    code = ACTIVATIONS[non_linearity]
    s_in, s_bias = s, dense(b_down)
    if code >= EPILOGUE_ACTIVATIONS:  # an activation this path forms here, not in the LoRA epilogue
        s_in, s_bias, code = reference.activation_and_grad(s, b_down, non_linearity)[0], None, 0
    e_rn = w_up.t()  # (m, d)
    bias = (b_up.float() * scale_value).to(x.dtype) if b_up is not None else None
    lora.gemm(x[:, :0], e_rn[:0], bias, e_rn, torch.full((m,), float(scale_value), device=x.device), y, s=s_in,
              s_act=code, s_bias=s_bias, residual=residual)
    return y, s if need_s else _empty(x), _empty(x), _empty(x)


def _empty(like: Tensor) -> Tensor:
    """A fresh empty float32 output (outputs of a custom op must not alias one another)."""
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.triton_op("fastpeft::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_backward_op(dy: Tensor, x: Tensor, residual: Tensor | None, s: Tensor, stats: Tensor,
                            astats: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                            scale: Tensor | None, scale_value: float, ln_weight: Tensor | None,
                            ln_bias: Tensor | None, ln_after_weight: Tensor | None, non_linearity: str,
                            need_dx: bool, need_dz: bool, need_wd: bool, need_bd: bool, need_wu: bool, need_bu: bool,
                            need_scale: bool, need_lnw: bool, need_lnb: bool, need_law: bool, need_lab: bool
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                       Tensor]:
    """(dx, dz, dW_d, db_d, dW_u, db_u, ds, dγ, dβ, dγ_after, dβ_after); each empty unless asked for. With the
    layer norm after (ln_after_weight and the forward's astats), dY is first taken through its backward:
    dz = rstd_a · (γ_a ⊙ dY − mean_k(γ_a ⊙ dY) − ẑ · mean_k(γ_a ⊙ dY ⊙ ẑ)), ẑ recomputed from S (and the
    residual, given when it was added before that norm); dz (the residual's gradient in that case) then replaces
    dY in the formulas of the module docstring."""
    args = (dy, x, residual, s, stats, astats, w_down, b_down, w_up, b_up, scale, scale_value, ln_weight, ln_bias,
            ln_after_weight, non_linearity, (need_dx, need_dz, need_wd, need_bd, need_wu, need_bu, need_scale,
                                             need_lnw, need_lnb, need_law, need_lab))
    if rows_backend("bottleneck_adapter", dy) == "torch" or dy.shape[0] == 0:
        return reference.bottleneck_adapter_bwd(*args)
    return _triton_backward(*args)


def _triton_backward(dy, x, residual, s, stats, astats, w_down, b_down, w_up, b_up, scale, scale_value, ln_w, ln_b,
                     la_w, act, needs):
    need_dx, need_dz, need_wd, need_bd, need_wu, need_bu, need_scale, need_lnw, need_lnb, need_law, need_lab = needs
    M, d = dy.shape
    m = w_down.shape[0]
    kern, lora = _kernels()
    b_down, ln_w, la_w = dense(b_down), dense(ln_w), dense(la_w)
    out = [dy.new_empty((0,)) for _ in range(11)]
    target = target_programs(dy.device)  # SM count cached: no device query per call
    splits = lora.reduce_splits(M, d, m, target)
    ones = torch.ones((m,), device=dy.device)
    scalar_scale = scale is not None and scale.numel() == 1
    need_f = need_wu or (need_scale and not scalar_scale)
    need_ds = need_wd or need_bd or need_lnw or need_lnb
    if m <= BOTTLENECK_MAX_WIDTH:
        ln = None
        if ln_w is not None:
            ln = (ln_w, *_ln_vectors(w_down, ln_w, ln_b))
        f = dispatch.new_output((M, m), like=dy, dtype=torch.float32) if need_f else None
        ds = dispatch.new_output((M, m), like=dy, dtype=torch.float32) if need_ds else None
        dsr = dispatch.new_output((M, m), like=dy, dtype=torch.float32) if need_ds and ln is not None else None
        dx = dispatch.new_output((M, d), like=dy) if need_dx else None
        rowdot = dispatch.new_output((M,), like=dy, dtype=torch.float32) if need_scale and scalar_scale else None
        dz = part = None
        if la_w is not None:  # dz for the upward gradients and the residual's; 16-row sums for dγ_after, dβ_after
            if need_wu or need_bu or need_scale or need_dz:
                dz = dispatch.new_output((M, d), like=dy)
            if need_law or need_lab:
                part = dispatch.new_output(((M + 15) // 16, 2, d), like=dy, dtype=torch.float32)
        if need_f or need_ds or need_dx or rowdot is not None or dz is not None or part is not None:
            kern.backward(dy, s, w_down, b_down, w_up, act=ACTIVATIONS[act], scale=scale,
                          scale_value=scale_value, f=f, ds=ds, dx=dx, x=x, ln=ln, stats=stats if ln else None,
                          dsr=dsr, rowdot=rowdot, ln_after=la_w, b_up=dense(b_up), residual=residual,
                          astats=astats if la_w is not None else None, dz=dz, part=part)
        out[0] = dx if need_dx else out[0]
        if part is not None:
            col = part.sum(0)
            out[9], out[10] = (c.to(la_w.dtype, copy=True) for c in col)  # copies: outputs may not alias
        if dz is not None:
            out[1] = dz if need_dz else out[1]
            dy = dz  # the gradient of the pre-norm output, from here on
    else:  # the two-kernel path: G = dY W_u by the shrink kernel, dS here, dx by the GEMM kernel with K = 0
        assert la_w is None, "the layer norm after is fused for m <= BOTTLENECK_MAX_WIDTH only"
        ln = None
        g = dispatch.new_output((M, m), like=dy, dtype=torch.float32)
        lora.shrink(dy, w_up, g)
        f, ds = reference.activation_and_grad(s, b_down, act, g * scale_value)
        if need_dx:
            out[0] = dispatch.new_output((M, d), like=dy)
            lora.gemm(dy[:, :0], w_down[:0], None, w_down, ones, out[0], s=ds)
    if need_wu or need_bu or need_scale:
        sc = reference.scale_of(scale, scale_value)
        need_colsum = need_bu or (need_scale and b_up is not None)
        if need_scale and scalar_scale:  # Σ dY ⊙ (F W_uᵀ + b_u): the kernel's row sums, plus the bias term
            up_bias = dy.sum(0, dtype=torch.float32) @ b_up.float() if b_up is not None else 0.0
            out[6] = reference.fit_scale(rowdot.sum() + up_bias, scale)
            need_colsum = need_bu
        colsum = dispatch.new_output((d,), like=dy, dtype=torch.float32) if need_colsum and need_f else None
        if need_f:
            dyt_f = dispatch.new_output((d, m), like=dy, dtype=torch.float32)  # dYᵀ F, unscaled
            lora.reduce(dy, f, ones, dyt_f, colsum=colsum, splits=splits)
            if need_wu:
                out[4] = (dyt_f * (sc[:, None] if scale is not None else sc)).to(w_up.dtype)
            if need_scale and not scalar_scale:
                per_channel = (w_up.float() * dyt_f).sum(1)
                per_channel = per_channel + b_up.float() * colsum if b_up is not None else per_channel
                out[6] = reference.fit_scale(per_channel, scale)
        elif need_colsum:
            colsum = dy.sum(0, dtype=torch.float32)
        if need_bu:
            out[5] = (colsum * sc).to(b_up.dtype)
    if need_ds:
        col_ds = ds.sum(0)
        if need_bd:
            out[3] = col_ds.to(b_down.dtype)
        if ln is None and need_wd:
            out[2] = dispatch.new_output(tuple(w_down.shape), like=w_down)
            lora.reduce(x, ds, ones, out[2].t(), splits=splits)
        elif ln is not None and (need_wd or need_lnw):
            # Σ_i dS_ij x̂_ik = (dS ⊙ rstd)ᵀ x − (dS ⊙ rstd)ᵀ μ; the reduction rounds dS ⊙ rstd to the input dtype,
            # so the μ term uses the same rounded values (the difference then cancels exactly).
            p_dm = dispatch.new_output((d, m), like=dy, dtype=torch.float32)
            lora.reduce(x, dsr, ones, p_dm, splits=splits)
            q_dm = p_dm - (stats[:, 0] @ dsr.to(x.dtype).float())[None, :]
            if need_wd:
                dw_t = q_dm * ln_w.float()[:, None]
                if ln_b is not None:
                    dw_t = dw_t + ln_b.float()[:, None] * col_ds[None, :]
                out[2] = dw_t.t().to(w_down.dtype)
            if need_lnw:
                out[7] = (w_down.float().t() * q_dm).sum(1).to(ln_w.dtype)
        if need_lnb:
            out[8] = (col_ds @ w_down.float()).to(ln_b.dtype)
    return tuple(out)


def _setup_context(ctx, inputs, output):
    (x, residual, w_down, b_down, w_up, b_up, scale, scale_value, ln_w, ln_b, la_w, la_b, residual_before_ln,
     non_linearity, _, _) = inputs
    z_residual = residual if la_w is not None and residual_before_ln else None  # part of ẑ, recomputed
    ctx.save_for_backward(x, z_residual, output[1], output[2], output[3], w_down, b_down, w_up, b_up, scale, ln_w,
                          ln_b, la_w, la_b)
    ctx.scale_value, ctx.non_linearity = scale_value, non_linearity
    ctx.residual_before_ln = residual_before_ln
    ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state


def _backward(ctx, dy, _ds, _dstats, _dastats):
    x, z_residual, s, stats, astats, w_down, b_down, w_up, b_up, scale, ln_w, ln_b, la_w, la_b = ctx.saved_tensors
    (need_dx, need_r, need_wd, need_bd, need_wu, need_bu, need_scale, _, need_lnw, need_lnb, need_law,
     need_lab) = ctx.needs_input_grad[:12]
    need_dz = need_r and la_w is not None and ctx.residual_before_ln  # dr = dz; otherwise dr = dY
    with dispatch.restore(ctx.dispatch):
        grads = torch.ops.fastpeft.bottleneck_adapter_backward(
            dy, x, z_residual, s, stats, astats, w_down, b_down, w_up, b_up, scale, ctx.scale_value, ln_w, ln_b,
            la_w, ctx.non_linearity, need_dx, need_dz, need_wd, need_bd, need_wu, need_bu, need_scale, need_lnw,
            need_lnb, need_law, need_lab)
    dx, dz, dw_down, db_down, dw_up, db_up, dscale, dln_w, dln_b, dla_w, dla_b = (
        g if need else None for g, need in zip(grads, (need_dx, need_dz, need_wd, need_bd, need_wu, need_bu,
                                                       need_scale, need_lnw, need_lnb, need_law, need_lab)))
    dr = dz if need_dz else (dy if need_r else None)
    dla_b = dla_b.to(la_b.dtype) if dla_b is not None else None
    return (dx, dr, dw_down, db_down, dw_up, db_up, dscale, None, dln_w, dln_b, dla_w, dla_b, None, None, None,
            None)


torch.library.register_autograd("fastpeft::bottleneck_adapter", _backward, setup_context=_setup_context)
