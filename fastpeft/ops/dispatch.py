"""Which backend runs an op, and why.

Rules (DESIGN.md): CUDA tensors + triton importable + supported dtype -> "triton"; otherwise "torch" (the
reference in fastpeft/reference). `FASTPEFT_BACKEND=torch|triton|cuda` or `with fp.ops.use_backend(...)`
forces one; a forced backend that cannot run the inputs raises `BackendError`, it never falls back silently.
Under `TRITON_INTERPRET=1` a forced "triton" runs the kernels on CPU tensors (how the kernels are tested).

Every option here is a context variable, never a module constant rebound at run time: a block sets it for its own
thread (or asyncio task) only, so two threads serving two requests never see each other's choices.

    with fp.ops.use_backend("triton"): ...                   # force a backend
    with fp.ops.use_kernel_options(fused_shrink=False): ...  # pin a kernel strategy (tests, benchmarks)

A backward pass may run on another thread than its forward (on CUDA the autograd engine runs backward functions
on its own worker threads, which do not see the caller's context variables), so every op saves `snapshot()` of
the forward's state with its autograd context and runs its backward under `with restore(ctx.dispatch):`.
Under torch.compile the state is read once, when the graph is traced (as a constant of the graph).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os

import torch

from ..errors import BackendError, InputError

BACKENDS = ("torch", "triton", "cuda")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastpeft_backend", default=None)
_poison: contextvars.ContextVar[bool] = contextvars.ContextVar("fastpeft_poison_outputs", default=False)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Strategy choices of the kernel paths that a cost model or a provisional threshold otherwise makes.

    fused_shrink: LoRA GEMMs compute the shrink x Aᵀ inside the K loop (True), in its own kernel (False), or as the
        cost model says (None). Ranks above the fused limit and dropout always run the separate shrink.
    decode_max_tokens: multi_lora_linear runs its fused decode kernel for at most this many tokens (0: the segment
        kernels always), the segment kernels above.
    decode_splits: prefix_attention's split-K decode forward cuts the keys into this many chunks (None: about two
        programs per SM).
    linear_strategy: the linear ops' GPU strategy (fastpeft/ops/strategy.py): "fused" (the whole layer in one
        Triton GEMM), "cublas" (the base product on cuBLAS, the adapter's terms in one small kernel), or None (the
        committed table's choice for this device, dtype and row count; "cublas" without an entry).
    """

    fused_shrink: bool | None = None
    linear_strategy: str | None = None
    decode_max_tokens: int = 64  # provisional: not yet timed on a GPU
    decode_splits: int | None = None


_options: contextvars.ContextVar[KernelOptions] = contextvars.ContextVar("fastpeft_kernel_options",
                                                                          default=KernelOptions())


# The reads of the context variables: torch.compile (dynamo) cannot trace ContextVar.get, so it calls these
# when it traces the graph and keeps their result as a constant of the graph.
@torch.compiler.assume_constant_result
def _forced() -> str | None:
    return _backend.get()


@torch.compiler.assume_constant_result
def _poisoned() -> bool:
    return _poison.get()


@torch.compiler.assume_constant_result
def kernel_options() -> KernelOptions:
    """The kernel options in force here (innermost `use_kernel_options`, else the defaults)."""
    return _options.get()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The dispatch state of one thread at one moment: forced backend (None: $FASTPEFT_BACKEND), poisoning,
    kernel options."""

    backend: str | None
    poison: bool
    options: KernelOptions


def snapshot() -> Snapshot:
    """The dispatch state in force here, for `restore` (an op's forward saves it for its backward pass)."""
    return Snapshot(_forced(), _poisoned(), kernel_options())


@contextlib.contextmanager
def restore(state: Snapshot):
    """Inside the block, the dispatch state is `state` (whatever this thread's was), then this thread's again."""
    tokens = (_backend.set(state.backend), _poison.set(state.poison), _options.set(state.options))
    try:
        yield
    finally:
        _options.reset(tokens[2])
        _poison.reset(tokens[1])
        _backend.reset(tokens[0])


@contextlib.contextmanager
def use_kernel_options(**changes):
    """Inside the block, the given KernelOptions fields take these values (the others keep theirs)."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(KernelOptions)})
    if unknown:
        fields = ", ".join(f.name for f in dataclasses.fields(KernelOptions))
        raise InputError(f"use_kernel_options: unknown option(s) {', '.join(unknown)}; the options are {fields}.")
    strategy = changes.get("linear_strategy")
    if strategy is not None and strategy not in ("fused", "cublas"):
        raise InputError(f"use_kernel_options: linear_strategy={strategy!r} is not a strategy; use 'fused', "
                         "'cublas' or None (the strategy table's choice).")
    token = _options.set(dataclasses.replace(_options.get(), **changes))
    try:
        yield _options.get()
    finally:
        _options.reset(token)


def requested_backend() -> str | None:
    """The forced backend (innermost `use_backend`, else $FASTPEFT_BACKEND), or None for automatic choice."""
    name = _forced()
    name = name if name is not None else os.environ.get("FASTPEFT_BACKEND", "").strip().lower()
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
    token = _backend.set(name or "auto")
    try:
        yield
    finally:
        _backend.reset(token)


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
        how, stop = forcing(forced)
        if not has_cuda_kernel:
            raise BackendError(f"{op}: {how}, but {op} has no CUDA C++ kernel; force 'triton' or 'torch' instead, or "
                               f"{stop} (automatic choice).")
        if device.type != "cuda":
            raise BackendError(f"{op}: {how}, but the tensors are on {device.type}; the CUDA C++ kernels run on CUDA "
                               f"tensors: move them to a CUDA device, or {stop}.")
        from . import cuda_ext  # the extension's loader; asking its status never compiles anything

        ok, why = cuda_ext.status()
        if not ok:
            raise BackendError(f"{op}: {how}, but the CUDA C++ extension cannot be used: {why}.")
        return "cuda"
    if forced == "triton":
        if not usable:
            how, stop = forcing(forced)
            raise BackendError(f"{op}: {how}, but {why_not}. {stop[0].upper() + stop[1:]} to use the PyTorch "
                               "reference, or set TRITON_INTERPRET=1 to run the kernels on CPU.")
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"


def forcing(forced: str) -> tuple[str, str]:
    """For messages: how the backend `forced` was forced (fp.ops.use_backend or FASTPEFT_BACKEND), and how to stop."""
    if _forced() is not None:
        return f"fp.ops.use_backend({forced!r})", "leave the use_backend block"
    return f"FASTPEFT_BACKEND={forced}", "unset FASTPEFT_BACKEND"


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
    token = _poison.set(bool(enabled))
    try:
        yield
    finally:
        _poison.reset(token)


def new_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output tensor, or a NaN-filled one under `poison_outputs()`."""
    dtype = dtype or like.dtype
    if _poisoned():
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
