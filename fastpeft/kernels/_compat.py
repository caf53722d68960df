"""Small shims over Triton and torch versions: interpreter mode, traceable launches, dot precision, dtypes."""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}  # torch -> Triton


def interpreting() -> bool:
    """True when @triton.jit builds interpreter functions (TRITON_INTERPRET=1): kernels then run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def launch(kernel):
    """`kernel[grid](...)` made traceable by torch.compile/make_fx (torch.library.wrap_triton) where possible."""
    if interpreting():
        return kernel
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None else wrap(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for float32 operands, following torch's float32 matmul setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _fix_interpreter_bf16() -> None:
    """Make the Triton interpreter (3.2-3.9) compute bfloat16 as the GPU does.

    It multiplies bf16 dot operands as their raw uint16 bits, and rounds float32 -> bf16 casts toward zero.
    Widen dot operands to float32 (exact: bf16 products accumulate in fp32 on tensor cores) and round casts to
    nearest-even. Installed only when interpreting.
    """
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_fastpeft_bf16", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, *rest, **kwargs):
        return original_dot(self, widen(a), widen(b), *rest, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            rounded = np.where(np.isnan(src.data), np.uint32(0x7FC0), rounded).astype(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._fastpeft_bf16 = True


if interpreting():
    _fix_interpreter_bf16()
