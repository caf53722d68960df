"""The correctness check of a benchmark row: its outputs against a reference computed in a wider dtype."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # flags a row, never fails the run


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative error a row of this dtype may show before it is flagged MISMATCH."""
    return TOLERANCE.get(dtype, 1e-2)


def max_rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Largest relative Frobenius error of outs against refs (nan if any output is nan)."""
    errs = []
    for o, r in zip(outs, refs):
        o = o.detach().reshape(r.shape).to(r.dtype)  # e.g. PEFT's IA3 vector gradient is (N, 1) or (1, K)
        errs.append(float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)))
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)
