"""Counter-based dropout masks that every backend regenerates bit for bit from a seed.

keep[m, k] = mix32(k ^ mix32(m ^ mix32(seed))) >= t(p),   t(p) = round(p * 2^32) - 2^31

`mix32` is a 32-bit integer finaliser (xor-shift / multiply, "lowbias32"). Rows and columns index the
2-D view of the activation, so a mask never has to be stored: the forward and the backward pass of the
Triton kernels and of this reference all compute the same bits (kernels/dropout.py is the Triton twin).
Arithmetic is int32 with wrap-around; right shifts are masked so they act as logical shifts.
"""
from __future__ import annotations

import torch

_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # the same 32 bits as a signed int32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mixer on int32 tensors (wrapping multiply, logical shifts)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MUL1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _MUL2
    return h ^ ((h >> 16) & 0xFFFF)


def keep_threshold(p: float) -> int:
    """The signed int32 threshold t with P(hash >= t) = 1 - p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * 2**32)) - 2**31, 2**31 - 1)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (rows, cols) mask of kept elements for dropout probability p and an integer seed tensor."""
    device = seed.device if device is None else device
    seed32 = (seed.to(device=device, dtype=torch.int64) & 0x7FFFFFFF).to(torch.int32)
    row_key = mix32(torch.arange(rows, device=device, dtype=torch.int32) ^ mix32(seed32))
    col = torch.arange(cols, device=device, dtype=torch.int32)
    return mix32(col[None, :] ^ row_key[:, None]) >= keep_threshold(p)


def dropout(x2d: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """x * keep / (1 - p) for a 2-D x; the identity when p == 0."""
    if p == 0.0 or seed is None:
        return x2d
    keep = keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))
