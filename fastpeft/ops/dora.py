"""`fp.ops.dora_linear`: DoRA as the LoRA op with an output column scale.

    y = c ⊙ (x Wᵀ + s drop(x) Aᵀ Bᵀ) + b,   c = m / ‖W + s B A‖ (the norm a constant for autograd, as PEFT)

The norm is computed from ‖W_n‖², W Aᵀ and A Aᵀ (fastpeft/reference/dora.py) without forming W + s B A; on CUDA
W Aᵀ comes from the LoRA shrink kernel (float32 out, W read once). Then one `lora_linear` call with
out_scale = c: the scale sits in the GEMM epilogue, and dm = Σ_m dY ⊙ Z / ‖·‖ is reduced inside the dX GEMM.
Differences from PEFT: with dropout in training, fastpeft drops only the adapter branch's input (PEFT also runs
the base product a second time on the dropped input); eval outputs and dropout-free training are the same.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import TRITON_DTYPES
from ..reference import dora as reference
from . import dispatch, registry
from ._common import autocast, check_device, check_floating, check_vector
from .lora import check_lora, lora_linear

registry.describe("dora_weight_norm", dtypes=TRITON_DTYPES, doc="||W + s B A|| per row, without forming it")


def dora_weight_sq_norm(weight: Tensor, *, fan_in_fan_out: bool = False) -> Tensor:
    """‖W_n‖² per output row (N,), float32: what `weight_sq_norm` caches while W is frozen."""
    with torch.no_grad():
        return reference.weight_sq_norm(weight, fan_in_fan_out)


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float | Tensor, *,
                     fan_in_fan_out: bool = False, weight_sq_norm: Tensor | None = None) -> Tensor:
    """‖W + B diag(s) A‖ per output row (N,), float32, never differentiated. `weight_sq_norm` (‖W_n‖², e.g.
    cached while W is frozen) saves a pass over W."""
    with torch.no_grad():
        R = lora_a.shape[0]
        if not isinstance(scale, Tensor):
            scale = torch.full((R,), float(scale), device=weight.device, dtype=torch.float32)
        w_at = None
        backend = dispatch.choose("dora_weight_norm", weight.device, weight.dtype, triton_dtypes=TRITON_DTYPES)
        if backend == "triton" and weight.numel():
            from ..kernels import lora as kern

            w_nk = weight.t() if fan_in_fan_out else weight
            w_at = torch.empty((w_nk.shape[0], R), device=weight.device, dtype=torch.float32)
            kern.shrink(w_nk, lora_a.t(), w_at)
        return reference.weight_norm(weight, lora_a, lora_b, scale, fan_in_fan_out, w_sq=weight_sq_norm, w_at=w_at)


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scale: float | Tensor, magnitude: Tensor, *, dropout_p: float = 0.0, seed: Tensor | None = None,
                fan_in_fan_out: bool = False, weight_sq_norm: Tensor | None = None,
                weight_norm: Tensor | None = None) -> Tensor:
    """y = m / ‖W + s B A‖ ⊙ (x Wᵀ + s drop(x) Aᵀ Bᵀ) + b for x of shape (..., K); magnitude m: (N,).

    weight_norm: ‖W + s B A‖ (N,) when already known (unchanged W, A, B since it was computed); else computed,
    with `weight_sq_norm` (‖W_n‖²) saving the pass over W.
    """
    _, N = check_lora(*autocast(x, weight, bias), lora_a, lora_b, fan_in_fan_out, "dora_linear")  # before any work
    if magnitude.shape != (N,):
        raise InputError(f"dora_linear: magnitude has shape {tuple(magnitude.shape)}; expected ({N},), one entry per "
                         "output feature (the layer's lora_magnitude_vector).")
    check_device(magnitude, "magnitude", x, "dora_linear")
    check_floating(magnitude, "magnitude", "dora_linear")
    check_vector(weight_norm, "weight_norm", N, "‖W + s B A‖ per output feature", x, "dora_linear")
    norm = weight_norm if weight_norm is not None else dora_weight_norm(
        weight, lora_a, lora_b, scale, fan_in_fan_out=fan_in_fan_out, weight_sq_norm=weight_sq_norm)
    return lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p, seed=seed,
                       fan_in_fan_out=fan_in_fan_out, out_scale=magnitude / norm.to(magnitude.dtype))
