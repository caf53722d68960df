"""Helpers the reference implementations share (and the ops, for the few formulas they compute themselves)."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the small M x R intermediates are kept: float32, or float64 for float64 inputs (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype (a no-op cast costs a microsecond of Python per call; these paths run per layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


def base_weight_t(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The (K, N) view of the base weight, whatever its storage layout."""
    return weight if fan_in_fan_out else weight.t()


def scale_cols(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """t ⊙ scale along the last dim, computed in float32 (float64 for the oracle), rounded to t's dtype once; t
    itself when scale is None (IA3's vectors, DoRA's column scale)."""
    if scale is None:
        return t
    acc = acc_dtype(t.dtype)
    return as_dtype(as_dtype(t, acc) * as_dtype(scale, acc), t.dtype)
