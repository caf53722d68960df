"""Build script. Plain `pip install .` needs no CUDA toolkit and builds nothing native.

`csrc/` CUDA extensions are compiled just in time on first use (torch.utils.cpp_extension + ninja; see
fastpeft/ops/cuda_ext.py), or ahead of time as `fastpeft._cuda` with

    FASTPEFT_BUILD_CUDA=1 pip install --no-build-isolation .      (or -e .)

which needs a CUDA build of torch in the build environment (hence --no-build-isolation), the CUDA toolkit
(nvcc on PATH or CUDA_HOME) and, for a parallel build, ninja (pip install 'fastpeft[cuda]'). It compiles for
sm_80 and sm_90, plus compute_90 PTX so newer GPUs can JIT it.
"""
import glob
import os

from setuptools import setup

BUILD_CUDA = os.environ.get("FASTPEFT_BUILD_CUDA", "").strip().lower() in ("1", "true", "yes", "on")
NVCC_ARCH_FLAGS = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
]


def cuda_extension() -> dict:
    """setup() arguments that build csrc/ as fastpeft._cuda (only with FASTPEFT_BUILD_CUDA=1)."""
    if not BUILD_CUDA:
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(f"FASTPEFT_BUILD_CUDA=1 needs torch in the build environment ({exc}); install torch first "
                         "and run pip with --no-build-isolation.") from exc
    if not torch.version.cuda:
        raise SystemExit(f"FASTPEFT_BUILD_CUDA=1 needs a CUDA build of torch; this one is {torch.__version__}. "
                         "Unset FASTPEFT_BUILD_CUDA to install without the extension (it then compiles on first use "
                         "where CUDA is available).")
    if not CUDA_HOME:
        raise SystemExit("FASTPEFT_BUILD_CUDA=1 needs the CUDA toolkit: put nvcc on PATH or set CUDA_HOME.")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/bindings.cpp"] + sorted(os.path.relpath(p, here)
                                             for p in glob.glob(os.path.join(here, "csrc", "*.cu")))
    ext = CUDAExtension(
        name="fastpeft._cuda",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *NVCC_ARCH_FLAGS]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
