"""Triton twin of fastpeft/reference/dropout.py: the same keep-mask bits from the same seed.

keep[m, k] = mix32(k ^ mix32(m ^ mix32(seed))) >= threshold, in uint32 arithmetic (wrapping multiply,
logical shifts), compared as int32. Kernels hoist the row keys out of their K loops.
"""
from ._compat import tl, triton


@triton.jit
def mix32(h):
    """Bijective 32-bit mixer (lowbias32) on uint32 values."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def row_keys(seed_ptr, rows):
    """Per-row keys for the int32 row indices `rows`, from the int64 seed stored at seed_ptr."""
    seed = (tl.load(seed_ptr) & 0x7FFFFFFF).to(tl.uint32)
    return mix32(rows.to(tl.uint32) ^ mix32(seed))


@triton.jit
def keep_tile(row_key, cols, threshold):
    """Boolean (len(row_key), len(cols)) tile of kept elements."""
    h = mix32(cols.to(tl.uint32)[None, :] ^ row_key[:, None])
    return h.to(tl.int32, bitcast=True) >= threshold
