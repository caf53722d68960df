"""IA3 linear in plain PyTorch: the CPU kernel and the oracle of the IA3 path in kernels/lora.py.

    y = ((x ⊙ u) Wᵀ + b) ⊙ v                  (Liu et al. 2022, "(IA)³", as PEFT applies it)

x: (M, K); W: (N, K), or (K, N) when `fan_in_fan_out` (GPT-2 Conv1D); b: (N,); u: (K,) input scale
(feed-forward layers: the layer after the activation), v: (N,) output scale (attention keys and values);
either may be None (= ones). Several IA3 adapters on one layer multiply their vectors. The scales are applied
in float32 and the result rounded to x's dtype once, as PEFT does with float32 vectors.

Backward, with Z = (x ⊙ u) Wᵀ + b (the output before v) and H = (dY ⊙ v) W (the input gradient before u):
    dX = H ⊙ u        du = Σ_m H ⊙ x        dv = Σ_m dY ⊙ Z        db = Σ_m dY ⊙ v
"""
from __future__ import annotations

import torch

from .lora import _acc_dtype, _as, _base_weight_t


def _scaled(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """t ⊙ scale along the last dim, computed in float32 (float64 for the oracle), rounded to t's dtype."""
    if scale is None:
        return t
    acc = _acc_dtype(t.dtype)
    return _as(_as(t, acc) * _as(scale, acc), t.dtype)


def ia3_linear(x, weight, bias, in_scale, out_scale, fan_in_fan_out: bool):
    """The formula, differentiable by autograd, for inputs of shape (..., K)."""
    h = _scaled(x, in_scale)
    z = h @ _base_weight_t(weight, fan_in_fan_out)
    if bias is not None:
        z = z + bias
    return _scaled(z, out_scale)


def ia3_linear_fwd(x2, weight, bias, in_scale, out_scale, fan_in_fan_out: bool, need_z: bool):
    """Forward on a 2-D x. Returns (y, Z); Z (the output before v) is kept only when need_z, else empty."""
    h = _scaled(x2, in_scale)
    w_t = _base_weight_t(weight, fan_in_fan_out)
    z = torch.addmm(_as(bias, x2.dtype), h, w_t) if bias is not None else h @ w_t
    y = _scaled(z, out_scale)
    return y, (z if need_z and out_scale is not None else x2.new_empty((0,)))


def ia3_linear_bwd(dy, x2, weight, in_scale, out_scale, z, fan_in_fan_out: bool,
                   needs: tuple[bool, bool, bool, bool]):
    """Backward on 2-D tensors. `needs` = which of (dx, du, dv, db) to compute; the others come back empty."""
    need_dx, need_du, need_dv, need_db = needs
    dx, du, dv, db = (dy.new_empty((0,)) for _ in range(4))
    acc = _acc_dtype(dy.dtype)
    dz = _scaled(dy, out_scale)
    if need_dx or need_du:
        w = weight.t() if fan_in_fan_out else weight  # (N, K)
        h = dz @ w
        if need_dx:
            dx = _scaled(h, in_scale)
        if need_du:
            du = _as((_as(h, acc) * _as(x2, acc)).sum(0), in_scale.dtype)
    if need_dv:
        dv = _as((_as(dy, acc) * _as(z, acc)).sum(0), out_scale.dtype)
    if need_db:
        db = _as(dz, acc).sum(0)
    return dx, du, dv, db
