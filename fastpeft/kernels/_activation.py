"""The non-linearities of the bottleneck adapter in Triton, on float32 tiles (oracle: the PyTorch functions of
fastpeft/reference/bottleneck.py), by the constexpr codes of fastpeft/kernels/limits.py ACTIVATIONS. Used by the
fused bottleneck kernels and by the LoRA GEMM's epilogue (the wide bottleneck path)."""
from __future__ import annotations

from ._compat import tl, triton


@triton.jit
def activation(z, ACT: tl.constexpr):
    """f(z) on a float32 tile (code 0: the identity)."""
    if ACT == 1:
        f = tl.maximum(z, 0.0)
    elif ACT == 2:
        f = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        f = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))  # 0.5 (1 + tanh(u)) = sigmoid(2u)
    elif ACT == 4:
        f = z * tl.sigmoid(z)
    elif ACT == 5:
        f = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == 6:
        f = tl.sigmoid(z)
    elif ACT == 7:
        f = tl.where(z > 0, z, 0.01 * z)
    else:
        f = z
    return f


@triton.jit
def activation_slope(z, f, ACT: tl.constexpr):
    """f'(z), given f = f(z) (torch's conventions at the kinks: relu'(0) = 0, leaky_relu'(0) = 0.01)."""
    if ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        sg = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))  # (1 + t) / 2
        t = 2.0 * sg - 1.0
        g = sg + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 4:
        sg = tl.sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 5:
        g = 1.0 - f * f
    elif ACT == 6:
        g = f * (1.0 - f)
    elif ACT == 7:
        g = tl.where(z > 0, 1.0, 0.01)
    else:
        g = tl.full(z.shape, 1.0, tl.float32)
    return g
