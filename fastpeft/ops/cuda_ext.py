"""The CUDA C++ extension (csrc/): found prebuilt, or compiled just in time on first use.

    status() -> (usable, why)   cheap; never compiles, never initialises CUDA
    load()   -> the module      `fastpeft._cuda` when it was built ahead of time (FASTPEFT_BUILD_CUDA=1 pip install
                                --no-build-isolation .), else torch.utils.cpp_extension.load(SOURCES) into torch's
                                extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions; rebuilt
                                only when the sources or flags change); raises fastpeft.errors.BackendError saying
                                why when neither works
    SOURCES                     the csrc files: bindings.cpp and every csrc/*.cu

`import fastpeft` never imports this module; nothing here runs before status() or load() is called.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path

from ..errors import BackendError

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES: list[str] = ([str(CSRC / "bindings.cpp")] + sorted(str(p) for p in CSRC.glob("*.cu"))
                      if (CSRC / "bindings.cpp").is_file() else [])
JIT_NAME = "fastpeft_cuda"       # TORCH_EXTENSION_NAME of the just-in-time build
PREBUILT = "fastpeft._cuda"      # the ahead-of-time build (setup.py)
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3"]      # torch adds -gencode for the visible GPUs (or $TORCH_CUDA_ARCH_LIST)

_lock = threading.Lock()
_module = None                   # the loaded extension
_where = ""                      # how it was loaded, for status()
_failure: str | None = None      # why load() failed, once it has


def _environment_problem() -> str | None:
    """Why no extension can run here (torch build, device), or None. Never initialises CUDA."""
    import torch

    if not torch.version.cuda:
        kind = f"a ROCm build (HIP {torch.version.hip})" if torch.version.hip else "a CPU-only build"
        return (f"torch {torch.__version__} is {kind} without CUDA support; install a CUDA build of torch to use "
                "the CUDA C++ kernels")
    if not torch.cuda.is_available():  # asks the driver; does not initialise CUDA
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return None


def _prebuilt_spec():
    try:
        return importlib.util.find_spec(PREBUILT)
    except (ImportError, ValueError):
        return None


def _jit_problem() -> str | None:
    """Why a just-in-time build cannot start here (sources, toolkit, ninja), or None."""
    if not SOURCES:
        return (f"the csrc/ sources are not installed (looked in {CSRC}); use a source checkout "
                "(pip install -e .) or build ahead of time with FASTPEFT_BUILD_CUDA=1")
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if not cuda_home:
        return "the CUDA toolkit was not found: put nvcc on PATH or set CUDA_HOME to the toolkit's root"
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return f"nvcc is missing from CUDA_HOME={cuda_home} (expected {cuda_home}/bin/nvcc); set CUDA_HOME"
    if shutil.which("ninja") is None or not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja, or pip install 'fastpeft[cuda]')"
    return None


def status() -> tuple[bool, str]:
    """(usable, why): whether the extension is loaded, prebuilt or can be compiled here, and if not, why not.

    Quick: it never compiles and never initialises CUDA. The reason starts with "built" (loaded or installed
    prebuilt) or "loadable" (compiles on first use) when usable.
    """
    if _module is not None:
        return True, f"built ({_where})"
    if _failure is not None:
        return False, _failure
    problem = _environment_problem()
    if problem:
        return False, problem
    spec = _prebuilt_spec()
    if spec is not None:
        return True, f"built (prebuilt {PREBUILT} at {spec.origin})"
    problem = _jit_problem()
    if problem:
        return False, problem
    return True, (f"loadable (compiled just in time on first use, about a minute, from {CSRC}; cached in torch's "
                  "extension directory)")


def load():
    """The extension module: the prebuilt `fastpeft._cuda`, else a just-in-time build. Raises BackendError."""
    global _module, _where, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise BackendError(f"the fastpeft CUDA extension is not available: {_failure}")
        problem = _environment_problem()
        if problem:  # not recorded: it may change (a device can appear, e.g. CUDA_VISIBLE_DEVICES)
            raise BackendError(f"the fastpeft CUDA extension is not available: {problem}")
        notes = []
        if _prebuilt_spec() is not None:
            try:
                _module, _where = importlib.import_module(PREBUILT), f"prebuilt {PREBUILT}"
                return _module
            except ImportError as exc:  # e.g. built against another torch: fall back to the JIT build
                notes.append(f"prebuilt {PREBUILT} failed to import ({_first_lines(str(exc), 3)})")
        problem = _jit_problem()
        if problem:
            _failure = "; ".join(notes + [problem])
            raise BackendError(f"the fastpeft CUDA extension is not available: {_failure}")
        from torch.utils import cpp_extension

        try:
            module = cpp_extension.load(name=JIT_NAME, sources=SOURCES, extra_cflags=EXTRA_CFLAGS,
                                        extra_cuda_cflags=EXTRA_CUDA_CFLAGS, verbose=False)
        except Exception as exc:  # a compiler error, a link error, a broken cache: say what it was
            _failure = "; ".join(notes + [f"building it failed: {_first_lines(str(exc))}"])
            raise BackendError(f"the fastpeft CUDA extension is not available: {_failure}") from exc
        _module, _where = module, f"just-in-time build {JIT_NAME} from {CSRC}"
        return _module


def _first_lines(text: str, n: int = 8) -> str:
    """The lines of a build log that say what went wrong: those mentioning an error, else the first ones."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    picked = (errors or lines)[:n]
    more = len(errors or lines) - len(picked)
    return " | ".join(picked) + (f" | ... ({more} more lines)" if more > 0 else "")


def _reset_for_tests() -> None:
    """Forget a loaded module or a recorded failure (tests)."""
    global _module, _where, _failure
    _module, _where, _failure = None, "", None
