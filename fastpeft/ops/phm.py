"""`fp.ops.phm_linear`: y = x (Σ_i A_i ⊗ W_i) + b without forming the in x out weight (math: reference/phm.py).

With x_m viewed as an n x p matrix X_m (p = in/n), (A ⊗ W) acts as X_m ↦ Aᵀ X_m W, so
    Y_m = Σ_i A_iᵀ X_m W_i                     (n x q, q = out/n; y_m is Y_m flattened)
computed right to left in two small contractions. With Compacter's factorized weights W_i = L_i R_i
(L: p x k, R: k x q) the products go X_m L_i, then A_iᵀ (·), then (·) R_i: O(M n k (in + out) + M n² k)
work instead of O(M in out), which is what this op does when `w_right` is given. Autograd through the
contractions gives the gradients of x, the rules and the factors; nothing of size in x out is ever made.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._common import check_device, check_floating


def phm_linear(x: Tensor, rule: Tensor, w: Tensor, bias: Tensor | None = None, *,
               w_right: Tensor | None = None) -> Tensor:
    """y = x (Σ_i A_i ⊗ W_i) + b for x of shape (..., in).

    rule: (n, n, n); w: (n, in/n, out/n), or with `w_right` (n, k, out/n) the left factor (n, in/n, k).
    """
    n, p, q = _check(x, rule, w, w_right, bias)
    dt = x.dtype
    xs = x.reshape(-1, n, p)                                    # X_m: (M, n, p)
    a = rule.to(dt)
    if w_right is None:
        t = torch.einsum("map,ipq->miaq", xs, w.to(dt))          # X_m W_i           (M, n_i, n, q)
        y = torch.einsum("iab,miaq->mbq", a, t)                  # Σ_i A_iᵀ (X_m W_i)
    else:
        s = torch.einsum("map,ipk->miak", xs, w.to(dt))          # X_m L_i           (M, n_i, n, k)
        v = torch.einsum("iab,miak->mibk", a, s)                 # A_iᵀ X_m L_i      (M, n_i, n, k)
        y = torch.einsum("mibk,ikq->mbq", v, w_right.to(dt))     # Σ_i (·) R_i       (M, n, q)
    y = y.reshape(*x.shape[:-1], n * q)
    return y + bias.to(dt) if bias is not None else y


def _check(x, rule, w, w_right, bias) -> tuple[int, int, int]:
    """(n, p, q) after host-side validation."""
    where = "phm_linear"
    if rule.dim() != 3 or rule.shape[0] != rule.shape[1] or rule.shape[1] != rule.shape[2]:
        raise InputError(f"{where}: rule must be (n, n, n), got {tuple(rule.shape)}; pass the n rule matrices A_i "
                         "(n x n each) stacked, n = phm_dim.")
    n = rule.shape[0]
    if w.dim() != 3 or w.shape[0] != n:
        raise InputError(f"{where}: w must be (n={n}, in/n, out/n) (or the left factor (n, in/n, k)), got "
                         f"{tuple(w.shape)}; pass one weight block per rule matrix.")
    p = w.shape[1]
    if w_right is not None and (w_right.dim() != 3 or w_right.shape[0] != n or w_right.shape[1] != w.shape[2]):
        raise InputError(f"{where}: w_right must be (n={n}, k={w.shape[2]}, out/n) to match w "
                         f"{tuple(w.shape)}, got {tuple(w_right.shape)}; pass the right factor of the same rank k.")
    q = (w_right if w_right is not None else w).shape[2]
    if x.dim() < 1 or x.shape[-1] != n * p:
        raise InputError(f"{where}: x has {x.shape[-1] if x.dim() else 0} features, but n * in/n = {n * p} "
                         f"(phm_dim n={n} must divide the input size; the weights are sized for {n * p}); pass x "
                         f"of shape (..., {n * p}).")
    if bias is not None and bias.shape != (n * q,):
        raise InputError(f"{where}: bias has shape {tuple(bias.shape)}; expected ({n * q},) (or None).")
    if not x.dtype.is_floating_point:
        raise InputError(f"{where}: x is {x.dtype}; pass floating-point inputs, e.g. x.float() (the rule and "
                         "weights are computed in x's dtype).")
    for name, t in (("rule", rule), ("w", w), ("w_right", w_right), ("bias", bias)):
        check_device(t, name, x, where)
        check_floating(t, name, where)
    return n, p, q
