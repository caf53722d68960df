"""LoRA linear in plain PyTorch: the CPU kernel and the oracle of kernels/lora.py.

    y = x Wᵀ + b + ((drop(x) Aᵀ) ⊙ s) Bᵀ                       (Hu et al. 2021, "LoRA")

x: (M, K); W: (N, K), or (K, N) when `fan_in_fan_out` (GPT-2 Conv1D); A: (R, K); B: (N, R);
s: (R,) per-rank scale (alpha/r, or alpha/sqrt(r) for rsLoRA, repeated over each adapter's ranks);
drop: dropout with probability p, mask regenerated from `seed` (reference/dropout.py; once in the forward,
once in the backward for both dX and dA).
Several adapters on one layer are their A, B and s concatenated along R.

An optional output column scale c (N,) multiplies everything but the bias (DoRA: c = m / ‖W + s B A‖):
    y = (x Wᵀ + ((drop(x) Aᵀ) ⊙ s) Bᵀ) ⊙ c + b
Backward, with T = drop(x) Aᵀ, dY' = dY ⊙ c, G = dY' B and Z = y - b before c:
    dX = dY' W + ((G ⊙ s) A) ⊙ keep / (1 - p)
    dA = (G ⊙ s)ᵀ drop(x)     dB = dY'ᵀ (T ⊙ s)     ds = Σ_m T ⊙ G     db = Σ_m dY     dc = Σ_m dY ⊙ Z
"""
from __future__ import annotations

import torch

from ._common import acc_dtype, as_dtype, base_weight_t, scale_cols
from .dropout import apply_keep, dropout, keep_scale


def lora_linear(x, weight, bias, lora_a, lora_b, scale, seed, dropout_p: float, fan_in_fan_out: bool,
                out_scale=None):
    """The formula, differentiable by autograd, for inputs of shape (..., K)."""
    x2 = x.reshape(-1, x.shape[-1])
    dt = x.dtype
    y = x2 @ base_weight_t(weight, fan_in_fan_out)
    t = dropout(x2, seed, dropout_p) @ lora_a.to(dt).t()
    y = y + (t * scale.to(t.dtype)).to(dt) @ lora_b.to(dt).t()
    if out_scale is not None:
        y = scale_cols(y, out_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def lora_linear_fwd(x2, weight, bias, lora_a, lora_b, scale, seed, dropout_p: float, fan_in_fan_out: bool,
                    need_t: bool, out_scale=None, need_z: bool = False):
    """Forward on a 2-D x. Returns (y, T, Z): T = drop(x) Aᵀ kept in float32 (empty unless need_t), and Z, the
    output before the column scale and the bias (empty unless need_z and there is a column scale)."""
    dt, acc = x2.dtype, acc_dtype(x2.dtype)
    w_t = base_weight_t(weight, fan_in_fan_out)
    h = dropout(x2, seed, dropout_p) if dropout_p > 0.0 else x2
    t = as_dtype(h @ as_dtype(lora_a, dt).t(), acc)
    ts = as_dtype(t * as_dtype(scale, acc), dt)
    empty_t = x2.new_empty((0,), dtype=acc)
    if out_scale is None:
        y = torch.addmm(as_dtype(bias, dt), x2, w_t) if bias is not None else x2 @ w_t
        y.addmm_(ts, as_dtype(lora_b, dt).t())
        return y, (t if need_t else empty_t), x2.new_empty((0,))
    z = torch.addmm(x2 @ w_t, ts, as_dtype(lora_b, dt).t())
    y = scale_cols(z, out_scale)
    if bias is not None:
        y = y + as_dtype(bias, dt)
    return y, (t if need_t else empty_t), (z if need_z else x2.new_empty((0,)))


def lora_linear_bwd(dy, x2, weight, lora_a, lora_b, scale, t, seed, dropout_p: float, fan_in_fan_out: bool,
                    needs: tuple[bool, ...], out_scale=None, z=None):
    """Backward on 2-D tensors. `needs` = which of (dx, dA, dB, ds, dbias[, dc]) to compute; the others (and dc
    when not asked for) come back empty."""
    need_dx, need_da, need_db, need_ds, need_dbias, need_dc = (*needs, False)[:6]
    dt, acc = dy.dtype, acc_dtype(dy.dtype)
    s = as_dtype(scale, acc)
    dx, da, db, ds, dbias, dc = (dy.new_empty((0,)) for _ in range(6))  # distinct: op outputs may not alias
    if need_dbias:
        dbias = as_dtype(dy, acc).sum(0)
    if need_dc:
        dc = as_dtype((as_dtype(dy, acc) * as_dtype(z, acc)).sum(0), out_scale.dtype)
    if out_scale is not None:
        dy = scale_cols(dy, out_scale)
    g = gs = None
    if need_dx or need_da or need_ds:
        g = as_dtype(dy @ as_dtype(lora_b, dt), acc)  # (M, R)
        gs = as_dtype(g * s, dt)
    drop = None  # keep / (1 - p), made once for dX and dA
    if dropout_p > 0.0 and seed is not None and (need_dx or need_da):
        drop = keep_scale(seed, x2.shape[0], x2.shape[1], dropout_p, acc, device=dy.device)
    if need_dx:
        w = weight.t() if fan_in_fan_out else weight  # (N, K)
        lora_dx = gs @ as_dtype(lora_a, dt)
        if drop is not None:
            lora_dx = lora_dx.mul_(drop) if lora_dx.dtype == drop.dtype else apply_keep(lora_dx, drop)
        dx = torch.addmm(lora_dx, dy, w)
    if need_da:  # accumulated in the parameter's dtype when it is wider (fp32 adapters on a half model)
        pa = lora_a.dtype
        h = apply_keep(x2, drop, last_use=True) if drop is not None else x2
        da = as_dtype(gs, pa).t() @ as_dtype(h, pa)
    if need_db:
        pb = lora_b.dtype
        db = as_dtype(dy, pb).t() @ as_dtype(as_dtype(t * s, dt), pb)
    if need_ds:
        ds = as_dtype((t * g).sum(0), scale.dtype)
    return dx, da, db, ds, dbias, dc
