"""PHM (parameterized hypercomplex multiplication) linear in plain PyTorch, the oracle: it forms the weight.

    H = Σ_i A_i ⊗ W_i  (in x out),    y = x H + b                 (Zhang et al. 2021; Compacter, Mahabadi 2021)

A: (n, n, n) the "rule" matrices, W_i: (in/n, out/n), or W_i = L_i R_i with L: (n, in/n, k), R: (n, k, out/n)
(Compacter's factorized weights). fastpeft/ops/phm.py computes the same without forming H.
"""
from __future__ import annotations

import torch


def phm_weight(rule: torch.Tensor, w: torch.Tensor, w_right: torch.Tensor | None = None) -> torch.Tensor:
    """H = Σ_i kron(A_i, W_i), (in, out); W_i = L_i R_i when `w_right` (R) is given and `w` is L."""
    blocks = w if w_right is None else w @ w_right  # (n, p, q)
    n, p, q = blocks.shape
    # kron(A, B)[a p + d, b q + c] = A[a, b] B[d, c]
    return torch.einsum("iab,idc->adbc", rule, blocks).reshape(n * p, n * q)


def phm_linear(x, rule, w, bias=None, w_right=None):
    """y = x (Σ_i A_i ⊗ W_i) + b for x of shape (..., in), differentiable by autograd."""
    y = x @ phm_weight(rule, w, w_right).to(x.dtype)
    return y + bias if bias is not None else y
