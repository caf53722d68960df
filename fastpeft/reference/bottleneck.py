"""The bottleneck adapter block in plain PyTorch, as AdapterHub's `Adapter.forward` computes it: the oracle of the
fused adapter kernel (fastpeft/kernels/bottleneck.py), and the CPU path.

    h   = LN_before(x)                      (ln_before; otherwise h = x)
    up  = s · (f(h W_dᵀ + b_d) W_uᵀ + b_u)   s: a number, a learned scalar or a learned vector (channel)
    up  = dropout_p(up)                     (training only: the caller passes p = 0 in eval mode)
    up  = up ⊙ mean_t σ(x W_gᵀ + b_g)        (use_gating: one gate per sequence, from the adapter's input x)
    out = LN_after(up + r)                  (adapter_residual_before_ln), or LN_after(up) + r, or up + r

(Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2021 for the scaling.) x: (..., d); W_d: (m, d); W_u: (d, m);
r: the residual input, same shape as x. Dropout sits where AdapterHub puts it: on s · up, before the gate and
the residual (`dropout(up * scaling)`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # erf form, transformers' "gelu"
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "leaky_relu": F.leaky_relu,
    "linear": lambda t: t,
}


def activation(name: str):
    """The non-linearity AdapterHub's `non_linearity` names (through transformers' ACT2FN), case-insensitive."""
    fn = ACTIVATIONS.get(name.lower() if isinstance(name, str) else name)
    if fn is None:
        raise ValueError(f"non_linearity {name!r} is not supported; use one of {', '.join(sorted(ACTIVATIONS))}.")
    return fn


def bottleneck_adapter(x, residual, w_down, b_down, w_up, b_up, *, non_linearity: str = "relu", scaling=1.0,
                       ln_before=None, ln_after=None, gate=None, adapter_residual_before_ln: bool = False,
                       dropout: float = 0.0, eps: float = 1e-5):
    """The formula above; ln_before / ln_after / gate are (weight, bias) pairs or None; scaling a number or a
    tensor that broadcasts over the features (1 element, or d); dropout the probability (applied whenever > 0)."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), *ln_before, eps=eps) if ln_before is not None else x
    up = F.linear(activation(non_linearity)(F.linear(h, w_down, b_down)), w_up, b_up)
    up = up * scaling
    if dropout > 0.0:
        up = F.dropout(up, p=dropout, training=True)
    if gate is not None:
        g = torch.sigmoid(F.linear(x, *gate))                      # (batch, seq, 1)
        up = up * g.mean(dim=1, keepdim=True) if x.dim() == 3 else up * g
    if adapter_residual_before_ln:
        up = up + residual
    if ln_after is not None:
        up = F.layer_norm(up, (d,), *ln_after, eps=eps)
    return up if adapter_residual_before_ln else up + residual


# ------------------------------------------------------------------------------------------------------------
# The op's PyTorch path (fastpeft::bottleneck_adapter and its backward on the CPU, and wherever no kernel runs):
# the formulas written out in float32, as op bodies run below autograd.
# ------------------------------------------------------------------------------------------------------------

def activation_and_grad(s: Tensor, b_down: Tensor | None, name: str, d_f: Tensor | None = None):
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
    elif name == "tanh":
        f = torch.tanh(z)
        slope = 1.0 - f * f
    elif name == "sigmoid":
        f = torch.sigmoid(z)
        slope = f * (1.0 - f)
    else:  # leaky relu, slope 0.01
        f = torch.where(z > 0, z, 0.01 * z)
        slope = torch.where(z > 0, 1.0, 0.01)
    return f, (d_f * slope if d_f is not None else None)


def scale_of(scale: Tensor | None, scale_value: float):
    """s as something that broadcasts over (..., d) in float32."""
    return scale.float() if scale is not None else scale_value


def bottleneck_adapter_fwd(x, residual, w_down, b_down, w_up, b_up, scale, scale_value, ln_w, ln_b, la_w, la_b,
                           residual_before_ln, act, eps, need_s):
    """The forward of `fastpeft::bottleneck_adapter` on a 2-D x: (y, S, stats, astats) as the op returns them."""
    dt = x.dtype
    stats, astats = _empty(x), _empty(x)
    h = x
    if ln_w is not None:
        xf = x.float()
        mean = xf.mean(1)
        rstd = torch.rsqrt(xf.var(1, unbiased=False) + eps)
        h = (xf - mean[:, None]) * rstd[:, None] * ln_w.float()
        h = (h + ln_b.float() if ln_b is not None else h).to(dt)
        stats = torch.stack([mean, rstd], 1)
    s = (h @ w_down.t().to(dt)).float()
    f, _ = activation_and_grad(s, b_down, act)
    up = (f.to(dt) @ w_up.t().to(dt)).float()
    if b_up is not None:
        up = up + b_up.float()
    up = up * scale_of(scale, scale_value)
    if residual is not None and (la_w is None or residual_before_ln):
        up = up + residual.float()
    if la_w is not None:
        mean = up.mean(1)
        rstd = torch.rsqrt(up.var(1, unbiased=False) + eps)
        up = (up - mean[:, None]) * rstd[:, None] * la_w.float() + la_b.float()
        astats = torch.stack([mean, rstd], 1)
        if residual is not None and not residual_before_ln:
            up = up + residual.float()
    return (up.to(dt), (s if need_s else _empty(x)), (stats if need_s else _empty(x)),
            (astats if need_s else _empty(x)))


def ln_after_backward(dy, s, astats, b_down, w_up, b_up, scale, scale_value, residual, la_w, act):
    """dz (float32) through the layer norm after, ẑ recomputed from S as the forward formed it; and ẑ."""
    f, _ = activation_and_grad(s, b_down, act)
    up = (f.to(dy.dtype) @ w_up.t().to(dy.dtype)).float()
    up = (up + b_up.float() if b_up is not None else up) * scale_of(scale, scale_value)
    up = up + residual.float() if residual is not None else up
    zhat = (up - astats[:, :1]) * astats[:, 1:]
    gdy = dy.float() * la_w.float()
    dz = astats[:, 1:] * (gdy - gdy.mean(1, keepdim=True) - zhat * (gdy * zhat).mean(1, keepdim=True))
    return dz, zhat


def bottleneck_adapter_bwd(dy, x, residual, s, stats, astats, w_down, b_down, w_up, b_up, scale, scale_value, ln_w,
                           ln_b, la_w, act, needs):
    """The backward of `fastpeft::bottleneck_adapter` (the formulas of fastpeft/ops/bottleneck.py's docstring): the
    11 gradients of `fastpeft::bottleneck_adapter_backward`, each empty unless `needs` asks for it."""
    need_dx, need_dz, need_wd, need_bd, need_wu, need_bu, need_scale, need_lnw, need_lnb, need_law, need_lab = needs
    out = [dy.new_empty((0,)) for _ in range(11)]
    if la_w is not None:
        dz, zhat = ln_after_backward(dy, s, astats, b_down, w_up, b_up, scale, scale_value, residual, la_w, act)
        if need_law:
            out[9] = (dy.float() * zhat).sum(0).to(la_w.dtype)
        if need_lab:
            out[10] = dy.float().sum(0).to(la_w.dtype)
        if need_dz:
            out[1] = dz.to(dy.dtype)
        dyf = dz
    else:
        dyf = dy.float()
    dys = dyf * scale_of(scale, scale_value)
    f, ds = activation_and_grad(s, b_down, act, dys @ w_up.float())
    h = xhat = None
    if ln_w is not None:
        xhat = (x.float() - stats[:, :1]) * stats[:, 1:]
        h = xhat * ln_w.float() + (ln_b.float() if ln_b is not None else 0.0)
    dh = ds @ w_down.float() if (need_dx or need_lnw or need_lnb) else None
    if need_dx:
        if ln_w is None:
            out[0] = dh.to(dy.dtype)
        else:
            gdh = dh * ln_w.float()
            dx = stats[:, 1:] * (gdh - gdh.mean(1, keepdim=True) - xhat * (gdh * xhat).mean(1, keepdim=True))
            out[0] = dx.to(dy.dtype)
    if need_wd:
        out[2] = (ds.t() @ (h if h is not None else x.float())).to(w_down.dtype)
    if need_bd:
        out[3] = ds.sum(0).to(b_down.dtype)
    if need_wu:
        out[4] = (dys.t() @ f).to(w_up.dtype)
    if need_bu:
        out[5] = dys.sum(0).to(b_up.dtype)
    if need_scale:
        up = f @ w_up.float().t() + (b_up.float() if b_up is not None else 0.0)
        out[6] = fit_scale((dyf * up).sum(0), scale)
    if need_lnw:
        out[7] = (dh * xhat).sum(0).to(ln_w.dtype)
    if need_lnb:
        out[8] = dh.sum(0).to(ln_b.dtype)
    return tuple(out)


def fit_scale(ds_per_channel: Tensor, scale: Tensor) -> Tensor:
    """The per-channel gradient Σ_m dY ⊙ up summed to the shape of s ((1,) or (d,))."""
    g = ds_per_channel.sum().reshape(1) if scale.numel() == 1 else ds_per_channel
    return g.to(scale.dtype)


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty float32 output (outputs of a custom op must not alias one another)."""
    return like.new_empty((0,), dtype=torch.float32)


def bottleneck_size(d: int, reduction_factor: float) -> int:
    """AdapterHub's bottleneck width: d // reduction_factor, at least 1."""
    return max(1, int(d // reduction_factor))
