"""GPU tier: the compiled multi-adapter kernels (LoRA decode and segment kernels, the CUDA C++ decode kernel, IA3's
per-row GEMM) on CUDA tensors against the float64 reference, at Llama-sized shapes with many adapters of mixed
ranks (1 to 256), duplicates and rows without an adapter (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from fastpeft.ops import cuda_ext, kernel_options, multi_ia3_linear, multi_lora_linear, use_backend
from tests.harness import check_op

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RANKS = (1, 8, 16, 16, 64, 7, 128, 256)


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _make(M, K, N, *, grad, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, len(RANKS), (M,), generator=g).tolist()

    def make(dtype):
        ad = adapter_dtype or dtype
        inputs = {"x": torch.randn(M, K, device="cuda", dtype=dtype).requires_grad_(grad),
                  "weight": (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype),
                  "index": torch.tensor(slots, dtype=torch.int32)}
        for i, r in enumerate(RANKS):
            used = grad and i in slots
            inputs[f"a{i}"] = (torch.randn(r, K, device="cuda") / K ** 0.5).to(ad).requires_grad_(used)
            inputs[f"b{i}"] = (torch.randn(N, r, device="cuda") / r ** 0.5).to(ad).requires_grad_(used)
        return inputs
    return make


def _fn(x, weight, index, **ab):
    n = len(RANKS)
    return multi_lora_linear(x, weight, None, [ab[f"a{i}"] for i in range(n)], [ab[f"b{i}"] for i in range(n)],
                             [1.0 + 0.1 * i for i in range(n)], index.to(x.device))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M", [1, 37, 64], ids=lambda m: f"M{m}")
def test_decode_kernel(dtype, M):
    assert M <= kernel_options().decode_max_tokens
    check_op(_fn, _make(M, 4096, 4096, grad=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_segment_kernels_training(dtype):
    check_op(_fn, _make(1000, 4096, 11008, grad=True), dtype)
    check_op(_fn, _make(3000, 11008, 4096, grad=True, adapter_dtype=torch.float32, seed=1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cuda_extension_decode(dtype):
    ok, why = cuda_ext.status()
    if not ok:
        pytest.skip(f"CUDA extension unavailable: {why}")
    with use_backend("cuda"):
        check_op(_fn, _make(64, 4096, 4096, grad=False, seed=2), dtype, backend="cuda")


@pytest.mark.parametrize("feedforward", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("M", [5, 2048], ids=lambda m: f"M{m}")
def test_ia3_kernels(feedforward, M):
    K, N = 4096, 11008
    slots = torch.randint(-1, 6, (M,), generator=torch.Generator().manual_seed(3)).tolist()

    def make(dtype):
        inputs = {"x": torch.randn(M, K, device="cuda", dtype=dtype),
                  "weight": (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype),
                  "index": torch.tensor(slots, dtype=torch.int32)}
        for i in range(6):
            inputs[f"v{i}"] = 1 + 0.3 * torch.randn(K if feedforward else N, device="cuda")
        return inputs

    def fn(x, weight, index, **vs):
        return multi_ia3_linear(x, weight, None, [vs[f"v{i}"] for i in range(6)], index.to(x.device),
                                feedforward=feedforward)
    for dtype in DTYPES:
        check_op(fn, make, dtype)
