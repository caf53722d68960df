"""Test setup. Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU tensors.

The variable must be set before any @triton.jit decorator runs, so it is set here, before fastpeft.kernels is
imported by anything. Ahead-of-time compile tests load a separate, compiled copy of the kernels (tests/aot.py).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernels run in this session: CUDA, or the CPU through the interpreter."""
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
