"""Every csrc/*.cu file compiles with nvcc for sm_80 and sm_90, and csrc/bindings.cpp with the host compiler;
every function bindings.cpp declares is defined, with that signature, by a .cu object (nm).

No GPU needed: nvcc compiles without a device. The files are found with a glob, so a new .cu file is covered
without touching this test. All compiles run at once in parallel processes (one nvcc per .cu file, both archs
in it with --threads 2, and the host compiler beside); the timings and ptxas' register / shared-memory / spill
figures per kernel are written to build/nvcc-report.json. Skipped only when nvcc is not on PATH.

Flags: torch's own for extensions where they matter (TORCH_EXTENSION_NAME, TORCH_API_INCLUDE_EXTENSION_H,
torch.utils.cpp_extension.COMMON_NVCC_FLAGS, the torch include dirs as -isystem, the Python include dir) with
-std=c++17. A CPU build of torch ships the c10/cuda headers but not the header CMake generates for them
(c10/cuda/impl/cuda_cmake_macros.h, which only matters on Windows): C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it there.

The loader (fastpeft/ops/cuda_ext.py) is checked here too, on CPU: its sources, its reasons, no compile without
a device.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.aot import ROOT

CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
BINDINGS = CSRC / "bindings.cpp"
NVCC = shutil.which("nvcc")
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
STD = "-std=c++17"


def _common_flags() -> list[str]:
    from torch.utils import cpp_extension

    flags = ["-DTORCH_EXTENSION_NAME=fastpeft_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    includes = list(cpp_extension.include_paths())
    python_include = sysconfig.get_path("include", scheme="posix_prefix")
    if python_include:
        includes.append(python_include)
    for inc in includes:
        flags += ["-isystem", inc]
    if not any((Path(inc) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for inc in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _nvcc_command(source: Path, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    return [NVCC, STD, *ARCH_FLAGS, "--threads", "2", *_common_flags(), *cpp_extension.COMMON_NVCC_FLAGS,
            "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-c", str(source), "-o", str(out)]


def _cxx_command(source: Path, out: Path) -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    return [cxx, STD, "-Wall", *_common_flags(), "-fPIC", "-c", str(source), "-o", str(out)]


def _run(name: str, cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {"file": name, "rc": proc.returncode, "object": cmd[cmd.index("-o") + 1],
            "seconds": round(time.perf_counter() - start, 1), "output": proc.stdout + proc.stderr,
            "command": " ".join(cmd)}


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers.*?(\d+) bytes smem")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_rows(output: str) -> list[dict]:
    """Per kernel and arch: registers, static shared memory, spill bytes (from -Xptxas -v)."""
    rows, current = [], None
    for line in output.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current.update(registers=int(m.group(1)), shared_bytes=int(m.group(2)))
            rows.append(current)
            current = None
    return rows


def _own_warnings(output: str) -> list[str]:
    """Warnings reported in csrc's own files (those in torch's headers are torch's business)."""
    return [line for line in output.splitlines() if "warning" in line.lower() and "csrc/" in line]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, dict]:
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA toolkit is needed to compile csrc/*.cu")
    out = tmp_path_factory.mktemp("csrc-build")
    jobs = {p.name: _nvcc_command(p, out / f"{p.stem}.o") for p in CU_FILES}
    jobs[BINDINGS.name] = _cxx_command(BINDINGS, out / "bindings.o")
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(jobs, pool.map(lambda item: _run(*item), jobs.items())))
    wall = round(time.perf_counter() - start, 1)
    files = [{k: v for k, v in r.items() if k != "output"} | {"kernels": _ptxas_rows(r["output"])}
             for r in results.values()]
    report = {"wall_seconds": wall, "files": files}
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "nvcc-report.json").write_text(json.dumps(report, indent=1))
    print(f"\ncsrc compiles: {wall} s wall; " + ", ".join(f"{n} {r['seconds']} s" for n, r in results.items()),
          file=sys.stderr)
    return results


def _failure(result: dict) -> str:
    return f"{result['file']} failed to compile (rc {result['rc']}):\n{result['command']}\n{result['output'][-6000:]}"


def test_csrc_has_kernels_and_bindings():
    assert CU_FILES, f"no .cu file in {CSRC}"
    assert BINDINGS.is_file()


@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_file_compiles_for_sm80_and_sm90(builds, source):
    result = builds[source]
    assert result["rc"] == 0, _failure(result)
    assert not _own_warnings(result["output"]), result["output"][-6000:]
    kernels = _ptxas_rows(result["output"])
    assert {row["arch"] for row in kernels} == {"sm_80", "sm_90"}, result["output"][-3000:]
    assert all(row["shared_bytes"] <= 48 * 1024 for row in kernels), kernels  # static shared memory limit


def test_bindings_compile_with_host_compiler(builds):
    result = builds[BINDINGS.name]
    assert result["rc"] == 0, _failure(result)
    assert not _own_warnings(result["output"]), result["output"][-6000:]


def _symbols(obj: str, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-C", *flags, obj], capture_output=True, text=True, check=True).stdout
    rows = (re.match(r"\s*(?:[0-9a-fA-F]+\s+)?[A-Za-z]\s+(.*)", line) for line in out.splitlines())
    return {m.group(1) for m in rows if m and "fastpeft::" in m.group(1)}


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to read the objects' symbols")
def test_bindings_declarations_match_the_definitions(builds):
    """What bindings.cpp declares is what the .cu files define (same signature), or the module would fail to
    import with an undefined symbol, which only a machine with a GPU would see."""
    if any(r["rc"] for r in builds.values()):
        pytest.skip("a compile failed (reported by its own test)")
    needed = _symbols(builds[BINDINGS.name]["object"], "--undefined-only")
    defined = set().union(*(_symbols(builds[p.name]["object"], "--defined-only", "--extern-only") for p in CU_FILES))
    assert needed, "bindings.cpp uses no fastpeft:: function"
    assert needed <= defined, f"declared in bindings.cpp but not defined by any .cu file: {sorted(needed - defined)}"


def test_every_kernel_is_bound():
    """Every function a .cu file exports in namespace fastpeft is declared and bound in bindings.cpp."""
    bindings = BINDINGS.read_text()
    for path in CU_FILES:
        text = path.read_text()
        assert f'm.def("{path.stem}"' in bindings, f"bindings.cpp does not bind {path.stem} ({path.name})"
        assert f"void {path.stem}(" in text, f"{path.name} defines no host function {path.stem}"


# ------------------------------------------------------------------------------------------------------------
# The loader, on CPU
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_ext():
    from fastpeft.ops import cuda_ext

    cuda_ext._reset_for_tests()
    yield cuda_ext
    cuda_ext._reset_for_tests()


def test_loader_sources_are_the_csrc_files(cuda_ext):
    assert cuda_ext.SOURCES == [str(BINDINGS)] + [str(p) for p in CU_FILES]


def test_import_fastpeft_does_not_import_the_loader():
    code = ("import sys, fastpeft, fastpeft.ops; "
            "assert 'fastpeft.ops.cuda_ext' not in sys.modules and 'torch.utils.cpp_extension' not in sys.modules; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a CUDA device")
def test_without_device_status_says_why_quickly_and_load_raises(cuda_ext, monkeypatch):
    from torch.utils import cpp_extension

    from fastpeft.errors import BackendError

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("load() compiled without a device"))
    start = time.perf_counter()
    usable, why = cuda_ext.status()
    assert time.perf_counter() - start < 2.0
    assert not usable and ("CUDA" in why or "device" in why), why
    with pytest.raises(BackendError, match=re.escape(why)):
        cuda_ext.load()


def test_reasons_when_the_toolkit_or_ninja_is_missing(cuda_ext, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cuda_ext, "_environment_problem", lambda: None)  # pretend a CUDA torch and a device
    monkeypatch.setattr(cuda_ext, "_prebuilt_spec", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    usable, why = cuda_ext.status()
    assert not usable and "nvcc" in why and "CUDA_HOME" in why, why

    fake_home = tmp_path / "cuda"
    (fake_home / "bin").mkdir(parents=True)
    (fake_home / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(fake_home))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    usable, why = cuda_ext.status()
    assert not usable and "ninja" in why, why

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cuda_ext.shutil, "which", lambda name: f"/usr/bin/{name}")
    usable, why = cuda_ext.status()
    assert usable and why.startswith("loadable"), why


def test_build_failure_is_reported_with_its_first_error_lines(cuda_ext, monkeypatch):
    from torch.utils import cpp_extension

    from fastpeft.errors import BackendError

    monkeypatch.setattr(cuda_ext, "_environment_problem", lambda: None)
    monkeypatch.setattr(cuda_ext, "_prebuilt_spec", lambda: None)
    monkeypatch.setattr(cuda_ext, "_jit_problem", lambda: None)
    log = ("Error building extension 'fastpeft_cuda': [1/3] nvcc ...\n"
           "csrc/multi_lora_decode.cu(12): error: identifier \"oops\" is undefined\nninja: build stopped")
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError(log)

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(BackendError, match="identifier \"oops\" is undefined"):
        cuda_ext.load()
    assert calls[0]["name"] == "fastpeft_cuda" and calls[0]["sources"] == cuda_ext.SOURCES
    usable, why = cuda_ext.status()
    assert not usable and "building it failed" in why and "oops" in why
    with pytest.raises(BackendError, match="oops"):  # not retried: the failure is remembered
        cuda_ext.load()
    assert len(calls) == 1
