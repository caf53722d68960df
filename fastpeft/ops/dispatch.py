"""Which backend runs an op, and why.

Rules (DESIGN.md): CUDA tensors + triton importable + supported dtype -> "triton"; otherwise "torch" (the
reference in fastpeft/reference). `FASTPEFT_BACKEND=torch|triton|cuda` or `with fp.ops.use_backend(...)`
forces one; a forced backend that cannot run the inputs raises `BackendError`, it never falls back silently.
Under `TRITON_INTERPRET=1` a forced "triton" runs the kernels on CPU tensors (how the kernels are tested).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from ..errors import BackendError

BACKENDS = ("torch", "triton", "cuda")
_override: list[str] = []
_poison: list[bool] = []


def requested_backend() -> str | None:
    """The forced backend (innermost `use_backend`, else $FASTPEFT_BACKEND), or None for automatic choice."""
    name = _override[-1] if _override else os.environ.get("FASTPEFT_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise BackendError(f"FASTPEFT_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)} or auto.")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend ("torch", "triton", "cuda", or None/"auto") inside the block."""
    if name is not None and name != "auto" and name not in BACKENDS:
        raise BackendError(f"use_backend({name!r}): expected one of {', '.join(BACKENDS)} or 'auto'.")
    _override.append(name or "auto")
    try:
        yield
    finally:
        _override.pop()


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """TRITON_INTERPRET=1, read once like Triton itself does (it decides at kernel definition time)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, why) for Triton, without importing it into a process that does not need it."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break `import fastpeft`
        return False, f"triton failed to import: {exc}"
    return True, f"triton {triton.__version__}"


def choose(op: str, device: torch.device, dtype: torch.dtype, *, triton_dtypes, has_cuda_kernel: bool = False,
           triton_ok: tuple[bool, str] = (True, "")) -> str:
    """Pick the backend for one call of `op` on tensors of `device`/`dtype`. Raises if a forced one cannot run."""
    forced = requested_backend()
    if forced == "torch" or (forced is None and device.type != "cuda"):
        return "torch"
    usable, why_not = _triton_can_run(device, dtype, triton_dtypes, triton_ok)
    if forced == "cuda":
        if not has_cuda_kernel:
            raise BackendError(f"{op}: FASTPEFT_BACKEND=cuda, but {op} has no CUDA C++ kernel; "
                               "use FASTPEFT_BACKEND=triton or torch.")
        if device.type != "cuda":
            raise BackendError(f"{op}: FASTPEFT_BACKEND=cuda, but the tensors are on {device.type}; the CUDA C++ "
                               "kernels run on CUDA tensors.")
        from . import cuda_ext  # the extension's loader; asking its status never compiles anything

        ok, why = cuda_ext.status()
        if not ok:
            raise BackendError(f"{op}: FASTPEFT_BACKEND=cuda, but the CUDA C++ extension cannot be used: {why}.")
        return "cuda"
    if forced == "triton":
        if not usable:
            raise BackendError(f"{op}: FASTPEFT_BACKEND=triton, but {why_not}. Unset FASTPEFT_BACKEND to use the "
                               "PyTorch reference, or set TRITON_INTERPRET=1 to run the kernels on CPU.")
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"


def _triton_can_run(device, dtype, triton_dtypes, triton_ok) -> tuple[bool, str]:
    ok, why = triton_status()
    if not ok:
        return False, why
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return False, f"the tensors are on {device.type}, and Triton kernels run on CUDA devices"
    if dtype not in triton_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in triton_dtypes)
        return False, f"dtype {str(dtype).replace('torch.', '')} is not supported by the kernel ({names})"
    if not triton_ok[0]:
        return False, triton_ok[1]
    return True, ""


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Inside the block, op outputs are allocated filled with NaN (tests: unwritten elements then fail)."""
    _poison.append(enabled)
    try:
        yield
    finally:
        _poison.pop()


def new_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output tensor, or a NaN-filled one under `poison_outputs()`."""
    dtype = dtype or like.dtype
    if _poison and _poison[-1]:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def explain(device: str | None = None) -> dict[str, str]:
    """Backend per op for inputs on `device` (default: cuda if available, else cpu), with the reason."""
    from . import registry

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {}
    for name, spec in registry.OPS.items():
        dtype = spec["dtypes"][0] if spec["dtypes"] else torch.float32
        try:
            backend = choose(name, dev, dtype, triton_dtypes=spec["dtypes"], has_cuda_kernel=spec["cuda"])
            _, why = _triton_can_run(dev, dtype, spec["dtypes"], (True, ""))
            if requested_backend():
                reason = f"forced by FASTPEFT_BACKEND={requested_backend()}"
            elif backend == "triton":
                reason = "CUDA tensors and Triton available" + (f"; {spec['note']}" if spec.get("note") else "")
            else:
                reason = why or "automatic choice runs Triton on CUDA tensors only"
        except BackendError as exc:
            backend, reason = "error", str(exc)
        report[name] = f"{backend} ({reason})"
    return report
