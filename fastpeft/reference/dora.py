"""DoRA in plain PyTorch: the weight norm without forming W + ΔW, and the formula (the oracle).

    y = m ⊙ (x Wᵀ + s drop(x) Aᵀ Bᵀ) / ‖W + s B A‖ + b        (Liu et al. 2024, "DoRA", as PEFT computes it)

‖·‖ is the L2 norm of each output row (N,), treated as a constant in the backward pass (PEFT, and section 4.3
of the paper). With ΔW = B diag(s) A it expands to
    ‖W_n + ΔW_n‖² = ‖W_n‖² + 2 Σ_r B_nr s_r (W Aᵀ)_nr + Σ_rr' (B diag(s))_nr (A Aᵀ)_rr' (B diag(s))_nr'
which needs W Aᵀ (N x R), A Aᵀ (R x R) and the row norms of W, never an N x K temporary.
"""
from __future__ import annotations

import torch

from ._common import acc_dtype, base_weight_t


def weight_sq_norm(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """‖W_n‖² per output row, accumulated in float32 (float64 for float64 weights)."""
    acc = acc_dtype(weight.dtype)
    return torch.linalg.vector_norm(base_weight_t(weight, fan_in_fan_out), dim=0, dtype=acc) ** 2


def weight_norm(weight, lora_a, lora_b, scale, fan_in_fan_out: bool, *, w_sq=None, w_at=None) -> torch.Tensor:
    """‖W + B diag(s) A‖ per output row (N,), float32. `w_sq` (‖W_n‖²) and `w_at` (W Aᵀ, N x R, float32) may be
    given when computed elsewhere (cached, or by a kernel)."""
    acc = acc_dtype(weight.dtype)
    a, bs = lora_a.to(acc), lora_b.to(acc) * scale.to(acc)
    if w_sq is None:
        w_sq = weight_sq_norm(weight, fan_in_fan_out)
    if w_at is None:
        w_at = (a @ base_weight_t(weight, fan_in_fan_out).to(acc)).t()  # (A Wᵀ)ᵀ: the faster order on CPU
    sq = w_sq.to(acc) + 2.0 * (bs * w_at.to(acc)).sum(1) + ((bs @ (a @ a.t())) * bs).sum(1)
    return sq.clamp_min(0.0).sqrt()


def dora_linear(x, weight, bias, lora_a, lora_b, scale, magnitude, fan_in_fan_out: bool):
    """The formula with W + ΔW formed explicitly (the oracle; no dropout), differentiable by autograd."""
    w_nk = base_weight_t(weight, fan_in_fan_out).t()
    delta = (lora_b * scale) @ lora_a
    norm = torch.linalg.vector_norm(w_nk + delta.to(w_nk.dtype), dim=1).detach()
    y = (x @ w_nk.t() + ((x @ lora_a.t()) * scale) @ lora_b.t()) * (magnitude / norm)
    return y + bias if bias is not None else y
