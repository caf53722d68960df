"""Triton launcher of the IA3 linear (oracle: fastpeft/reference/ia3.py).

An IA3 layer is one GEMM: the LoRA GEMM kernel of fastpeft/kernels/lora.py with an empty low-rank term, the
input scale u applied to the X tiles as they are loaded (prologue) and the output scale v in the epilogue. The
backward pass is that GEMM again, dX = ((dY ⊙ v) W) ⊙ u, with the vector gradients reduced inside it.
"""
from __future__ import annotations

from . import lora


def scaled_gemm(x, w_kn, bias, out, **options):
    """out = ((x ⊙ in_scale) @ w_kn (+ bias)) ⊙ out_scale: the LoRA GEMM with no low-rank term. `options` are
    lora.gemm's: in_scale, out_scale, scale_bias, z, in_dot, in_sum, out_dot."""
    empty = x.new_empty((0, w_kn.shape[1]))
    return lora.gemm(x, w_kn, bias, empty, None, out, **options)
