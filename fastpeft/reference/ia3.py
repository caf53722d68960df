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

from ._common import acc_dtype, as_dtype, base_weight_t, scale_cols


def ia3_linear(x, weight, bias, in_scale, out_scale, fan_in_fan_out: bool):
    """The formula, differentiable by autograd, for inputs of shape (..., K)."""
    h = scale_cols(x, in_scale)
    z = h @ base_weight_t(weight, fan_in_fan_out)
    if bias is not None:
        z = z + bias
    return scale_cols(z, out_scale)


def ia3_linear_fwd(x2, weight, bias, in_scale, out_scale, fan_in_fan_out: bool, need_z: bool):
    """Forward on a 2-D x. Returns (y, Z); Z (the output before v) is kept only when need_z, else empty."""
    h = scale_cols(x2, in_scale)
    w_t = base_weight_t(weight, fan_in_fan_out)
    z = torch.addmm(as_dtype(bias, x2.dtype), h, w_t) if bias is not None else h @ w_t
    y = scale_cols(z, out_scale)
    return y, (z if need_z and out_scale is not None else x2.new_empty((0,)))


def ia3_linear_bwd(dy, x2, weight, in_scale, out_scale, z, fan_in_fan_out: bool,
                   needs: tuple[bool, bool, bool, bool]):
    """Backward on 2-D tensors. `needs` = which of (dx, du, dv, db) to compute; the others come back empty."""
    need_dx, need_du, need_dv, need_db = needs
    dx, du, dv, db = (dy.new_empty((0,)) for _ in range(4))
    acc = acc_dtype(dy.dtype)
    dz = scale_cols(dy, out_scale)
    if need_dx or need_du:
        w = weight.t() if fan_in_fan_out else weight  # (N, K)
        h = dz @ w
        if need_dx:
            dx = scale_cols(h, in_scale)
        if need_du:
            du = as_dtype((as_dtype(h, acc) * as_dtype(x2, acc)).sum(0), in_scale.dtype)
    if need_dv:
        dv = as_dtype((as_dtype(dy, acc) * as_dtype(z, acc)).sum(0), out_scale.dtype)
    if need_db:
        db = as_dtype(dz, acc).sum(0)
    return dx, du, dv, db
