"""Multi-adapter LoRA linear in plain PyTorch: the CPU kernel and the oracle of kernels/multi_lora.py.

    y_m = x_m Wᵀ + b + ((h_m A_aᵀ) ⊙ s_a) B_aᵀ       a = slot of token m (no term when it has none)

One batch, a different adapter per token (Punica/S-LoRA's "segmented gather"): A_a (r_a, K), B_a (N, r_a) and the
per-rank scale s_a (r_a,) of each slot may have any rank. h is the adapter branch's input: x, or x after the
dropout of each token's adapter (the caller drops it). Tokens are visited a segment at a time (all tokens of one
adapter together), so each adapter's matrices are used once per batch. Backward, with T = h Aᵀ and G = dY B per
segment:  dX = dY W,  dH = (G ⊙ s) A,  dA = (G ⊙ s)ᵀ h,  dB = dYᵀ (T ⊙ s)  (the formulas of reference/lora.py).
"""
from __future__ import annotations

import torch

from ._common import as_dtype, base_weight_t, scale_cols


def multi_lora_linear(x2, weight, bias, lora_a, lora_b, scales, segments, fan_in_fan_out: bool, h=None):
    """The formula, differentiable by autograd, on a 2-D x. `segments` yields (slot, token indices); lora_a,
    lora_b, scales are indexed by slot (None: the slot holds no adapter on this layer)."""
    dt = x2.dtype
    h = x2 if h is None else h
    w_t = base_weight_t(weight, fan_in_fan_out)
    y = torch.addmm(as_dtype(bias, dt), x2, w_t) if bias is not None else x2 @ w_t
    for slot, rows in segments:
        a = lora_a[slot] if slot < len(lora_a) else None
        if a is None:
            continue
        rows = rows.to(x2.device)
        t = h.index_select(0, rows) @ as_dtype(a, dt).t()
        ts = scale_cols(t, scales[slot])  # t ⊙ s_a in float32, rounded once
        y.index_add_(0, rows, ts @ as_dtype(lora_b[slot], dt).t())  # in place: addmm's backward does not read y
    return y
