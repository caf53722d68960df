"""Multi-adapter IA3 linear in plain PyTorch: the CPU kernel and the oracle of kernels/multi_ia3.py.

    output scaling (attention targets):   y_m = (x_m Wᵀ + b) ⊙ l_a          a = adapter of token m
    input scaling (feed-forward targets): y_m = (x_m ⊙ l_a) Wᵀ + b          (no adapter: y_m = x_m Wᵀ + b)

The vectors are applied in float32 and rounded once (reference/ia3.py). Tokens are visited a segment at a time.
"""
from __future__ import annotations

import torch

from ._common import as_dtype, base_weight_t, scale_cols


def multi_ia3_linear(x2, weight, bias, vectors, segments, feedforward: bool, fan_in_fan_out: bool):
    """The formula, differentiable by autograd, on a 2-D x. `segments` yields (slot, token indices); `vectors` is
    indexed by slot (None: no adapter in that slot on this layer)."""
    w_t = base_weight_t(weight, fan_in_fan_out)
    pieces = [(vectors[slot], rows.to(x2.device)) for slot, rows in segments
              if slot < len(vectors) and vectors[slot] is not None]
    h = x2.clone() if feedforward and pieces else x2
    if feedforward:
        for vector, rows in pieces:  # in place on the copy: rows of different segments are disjoint
            h.index_copy_(0, rows, scale_cols(x2.index_select(0, rows), vector))
    y = torch.addmm(as_dtype(bias, h.dtype), h, w_t) if bias is not None else h @ w_t
    if not feedforward:
        for vector, rows in pieces:  # in place: addmm's backward does not read y
            y.index_copy_(0, rows, scale_cols(y.index_select(0, rows), vector))
    return y


def multi_ia3_scale(t2, vectors, segments):
    """t_m ⊙ l_a per token, differentiable by autograd."""
    for slot, rows in segments:
        if slot < len(vectors) and vectors[slot] is not None:
            rows = rows.to(t2.device)
            t2 = t2.index_copy(0, rows, scale_cols(t2.index_select(0, rows), vectors[slot]))
    return t2
