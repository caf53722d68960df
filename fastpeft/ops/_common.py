"""What the op families share: autocast of the base product, the tiny-M dispatch rule, the device's SM count, and
the base layer of the linear ops (its validation and its product)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import TRITON_DTYPES
from ..reference._common import base_weight_t
from . import dispatch

# At decode sizes a 16-row GEMM tile leaves most SMs idle while cuBLAS's GEMV streams W at full bandwidth, so
# unless a backend is forced, M <= TINY_M runs the reference (provisional threshold: not yet timed on a GPU).
TINY_M = 16


def rows_backend(op: str, x2: Tensor) -> str:
    """The backend of `op` for a call on the 2-D input x2: dispatch's choice, except that a Triton choice becomes
    the reference (cuBLAS) for at most TINY_M rows on CUDA, unless a backend is forced."""
    backend = dispatch.choose(op, x2.device, x2.dtype, triton_dtypes=TRITON_DTYPES)
    tiny = x2.device.type == "cuda" and x2.shape[0] <= TINY_M
    if backend == "triton" and tiny and not dispatch.requested_backend():
        return "torch"
    return backend


def autocast(x: Tensor, weight: Tensor, bias: Tensor | None):
    """Under torch.autocast, run the base product in the autocast dtype (as nn.Linear does)."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return x, weight, bias


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device (cached: no device query per call); 1 for any other device."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(device: torch.device) -> int:
    """How many programs a split reduction aims for: two per SM on CUDA, 4 elsewhere (the interpreter)."""
    return 2 * sm_count(device) if device.type == "cuda" else 4


def dense(t: Tensor | None) -> Tensor | None:
    """A vector the kernels index densely (biases, scales, layer-norm weights); a no-op when it already is."""
    return t.contiguous() if t is not None else None


def check_base(x: Tensor, weight: Tensor, fan_in_fan_out: bool, where: str) -> tuple[int, int]:
    """A linear op's base layer and input: a 2-D floating-point weight, x with its input features and dtype.
    Returns (K, N)."""
    if weight.dim() != 2:
        raise InputError(f"{where}: weight must be 2-D, got shape {tuple(weight.shape)}; pass the base layer's "
                         "weight matrix, (out, in) (or (in, out) with fan_in_fan_out=True).")
    K, N = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
    layout = "(in, out) since fan_in_fan_out=True" if fan_in_fan_out else "(out, in)"
    if x.dim() < 1 or x.shape[-1] != K:
        raise InputError(f"{where}: x has {x.shape[-1] if x.dim() else 0} input features, but the base weight "
                         f"{tuple(weight.shape)} read as {layout} expects {K}; pass x of shape (..., {K}), or "
                         "set fan_in_fan_out to the weight's layout.")
    check_input_dtype(x, weight, where)
    return K, N


def check_linear(x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool, where: str) -> tuple[int, int]:
    """Host-side validation of a multi-adapter op's base layer before any launch. Returns (K, N)."""
    K, N = check_base(x, weight, fan_in_fan_out, where)
    check_vector(bias, "bias", N, "one entry per output feature", x, where)
    check_device(weight, "weight", x, where)
    return K, N


def check_vector(t: Tensor | None, name: str, n: int, what: str, x: Tensor, where: str) -> None:
    """An optional (n,) floating-point vector on x's device (a bias, a scale)."""
    if t is None:
        return
    if tuple(t.shape) != (n,):
        raise InputError(f"{where}: {name} has shape {tuple(t.shape)}; expected ({n},), {what} (or None).")
    check_device(t, name, x, where)
    check_floating(t, name, where)


def check_input_dtype(x: Tensor, weight: Tensor, where: str) -> None:
    """x must be floating point, in the base weight's dtype (a floating-point one)."""
    if x.dtype.is_floating_point:
        check_floating(weight, "weight", where)
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        cast = f"x.to({weight.dtype})" if weight.dtype.is_floating_point else "x.float() and weight.float()"
        raise InputError(f"{where}: x is {x.dtype} and the base weight is {weight.dtype}; they must match, in a "
                         f"floating-point dtype: cast it with {cast} (or run under torch.autocast).")


def check_device(t: Tensor | None, name: str, x: Tensor, where: str, x_name: str = "x") -> None:
    """Every tensor of a call on x's device (a meta tensor beside real ones included)."""
    if t is not None and t.device != x.device:
        raise InputError(f"{where}: {name} is on {t.device} but {x_name} is on {x.device}; move them together "
                         f"({name}.to({x_name}.device)).")


def check_floating(t: Tensor | None, name: str, where: str) -> None:
    if t is not None and not t.dtype.is_floating_point:
        raise InputError(f"{where}: {name} must be floating point, got {t.dtype}; cast it, e.g. {name}.float().")


def base_product(x2: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool) -> Tensor:
    """x2 Wᵀ + b on cuBLAS (W read in place, (N, K) or (K, N) with fan_in_fan_out)."""
    w_t = base_weight_t(weight, fan_in_fan_out)
    return torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
