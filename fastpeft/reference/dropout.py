"""Counter-based dropout masks that every backend regenerates bit for bit from a seed.

keep[m, k] = mix32(k ^ mix32(m ^ mix32(seed))) >= t(p),   t(p) = round(p * 2^32) - 2^31

`mix32` is a 32-bit integer finaliser (xor-shift / multiply, "lowbias32"). Rows and columns index the
2-D view of the activation, so a mask never has to be stored: the forward and the backward pass of the
Triton kernels and of this reference all compute the same bits (kernels/dropout.py is the Triton twin).
Arithmetic is int32 with wrap-around; right shifts are masked so they act as logical shifts.

Each keep element is a Bernoulli(1 − p) draw of a hash; the drop is applied as x ⊙ (keep / (1 − p)). The (rows,
cols) hashes are computed in place in one int32 buffer (a dozen passes, no temporaries per step: this is the CPU
path, cheaper than drawing the mask with torch.bernoulli), and `keep_scale` turns them into the factor the input is
multiplied by, so that applying the dropout is one multiplication.
"""
from __future__ import annotations

import torch

from ._common import acc_dtype

_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # the same 32 bits as a signed int32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mixer on int32 tensors (wrapping multiply, logical shifts)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MUL1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _MUL2
    return h ^ ((h >> 16) & 0xFFFF)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """mix32 in place on an int32 tensor (one scratch buffer for the shifts); returns h."""
    t = torch.empty_like(h)
    for shift, mask, mul in ((16, 0xFFFF, _MUL1), (15, 0x1FFFF, _MUL2), (16, 0xFFFF, None)):
        torch.bitwise_right_shift(h, shift, out=t)
        t.bitwise_and_(mask)
        h.bitwise_xor_(t)
        if mul is not None:
            h.mul_(mul)
    return h


def keep_threshold(p: float) -> int:
    """The signed int32 threshold t with P(hash >= t) = 1 - p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * 2**32)) - 2**31, 2**31 - 1)


def mask_hashes(seed: torch.Tensor, rows: int, cols: int, device=None) -> torch.Tensor:
    """The (rows, cols) int32 hashes mix32(k ^ mix32(m ^ mix32(seed & 0x7FFFFFFF))) that the mask compares."""
    device = seed.device if device is None else device
    seed32 = (seed.to(device=device, dtype=torch.int64) & 0x7FFFFFFF).to(torch.int32)
    row_key = _mix32_(torch.arange(rows, device=device, dtype=torch.int32).bitwise_xor_(mix32(seed32)))
    col = torch.arange(cols, device=device, dtype=torch.int32)
    return _mix32_(torch.bitwise_xor(col[None, :], row_key[:, None]))


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (rows, cols) mask of kept elements for dropout probability p and an integer seed tensor."""
    return mask_hashes(seed, rows, cols, device) >= keep_threshold(p)


def keep_scale(seed: torch.Tensor, rows: int, cols: int, p: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """keep / (1 - p) as a (rows, cols) tensor of `dtype`: 1 / (1 - p) where kept, 0 where dropped. Multiplying by
    it gives the same values as x ⊙ keep · (1 / (1 - p)) (1 · s = s exactly, and x · 0 is what x ⊙ keep gives)."""
    hashes = mask_hashes(seed, rows, cols, device)
    # float32 is written over the int32 hashes it is computed from (same element size, element by element)
    scale = hashes.view(dtype) if dtype == torch.float32 else torch.empty(hashes.shape, dtype=dtype,
                                                                            device=hashes.device)
    torch.ge(hashes, keep_threshold(p), out=scale)
    return scale.mul_(1.0 / (1.0 - p))


def dropout(x2d: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """x * keep / (1 - p) for a 2-D x, keep from the seed; the identity when p == 0."""
    if p == 0.0 or seed is None:
        return x2d
    scale = keep_scale(seed, x2d.shape[0], x2d.shape[1], p, acc_dtype(x2d.dtype), x2d.device)
    return apply_keep(x2d, scale, last_use=True)


def apply_keep(t: torch.Tensor, scale: torch.Tensor, *, last_use: bool = False) -> torch.Tensor:
    """t ⊙ keep_scale, in t's dtype: the product is taken in the scale's (float32 or float64) precision and rounded
    once, as t * keep * (1 / (1 - p)) is for a half-precision t. `last_use`: the scale is not needed afterwards, so
    the product may be written into it (same values: the product commutes) when t has its dtype and no gradient."""
    if last_use and t.dtype == scale.dtype and not (t.requires_grad and torch.is_grad_enabled()):
        return scale.mul_(t)
    out = t * scale
    return out if out.dtype == t.dtype else out.to(t.dtype)
