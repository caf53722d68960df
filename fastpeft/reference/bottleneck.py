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


def bottleneck_size(d: int, reduction_factor: float) -> int:
    """AdapterHub's bottleneck width: d // reduction_factor, at least 1."""
    return max(1, int(d // reduction_factor))
