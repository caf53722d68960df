"""fp.ops.multi_ia3_linear: the reference against a per-token float64 loop; the Triton kernels (interpreter on CPU)
against the float64 reference, forward (fused GEMM with per-row vectors, or cuBLAS + row scale at decode sizes) and
backward, output and input scaling, float32 vectors on half inputs, tokens without an adapter, empty slots."""
from __future__ import annotations

import pytest
import torch

from fastpeft.ops import IA3Bank, multi_ia3_linear, multi_ia3_scale
from fastpeft.ops._common import TINY_M
from tests.harness import DEVICE, check_op, needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _make(M, K, N, slots, *, n_slots=3, feedforward=False, grad=True, vector_dtype=None, empty=(), bias=True):
    size = K if feedforward else N

    def make(dtype):
        inputs = {"x": torch.randn(M, K, device=DEVICE, dtype=dtype).requires_grad_(grad),
                  "weight": (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype),
                  "bias": torch.randn(N, device=DEVICE, dtype=dtype).requires_grad_(grad) if bias else None,
                  "index": torch.tensor(slots, dtype=torch.int32)}
        for i in range(n_slots):
            if i not in empty:
                v = (1 + 0.3 * torch.randn(size, device=DEVICE)).to(vector_dtype or dtype)
                inputs[f"v{i}"] = v.requires_grad_(grad and i in slots)
        return inputs
    return make


def _fn(n_slots, feedforward=False):
    def fn(x, weight, bias, index, **vs):
        return multi_ia3_linear(x, weight, bias, [vs.get(f"v{i}") for i in range(n_slots)], index,
                                feedforward=feedforward)
    return fn


def _slots(M, n, seed=0):
    return torch.randint(-1, n, (M,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("feedforward", [False, True])
def test_reference_matches_a_per_token_loop(feedforward):
    M, K, N = 13, 10, 12
    inputs = _make(M, K, N, _slots(M, 3), feedforward=feedforward, grad=False)(torch.float64)
    y = _fn(3, feedforward)(**inputs)
    for m in range(M):
        s = int(inputs["index"][m])
        x = inputs["x"][m] * (inputs[f"v{s}"] if feedforward and s >= 0 else 1)
        expect = x @ inputs["weight"].t() + inputs["bias"]
        expect = expect * (inputs[f"v{s}"] if not feedforward and s >= 0 else 1)
        torch.testing.assert_close(y[m], expect, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("feedforward", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "train"])
def test_kernels(dtype, feedforward, grad):
    M, K, N = 37, 40, 24  # > TINY_M: the fused GEMM when no gradient is needed
    check_op(_fn(3, feedforward), _make(M, K, N, _slots(M, 3), feedforward=feedforward, grad=grad), dtype)


@needs_triton
@pytest.mark.parametrize("feedforward", [False, True], ids=["out", "in"])
def test_decode_sizes_and_float32_vectors(feedforward):
    M = TINY_M - 5
    check_op(_fn(3, feedforward), _make(M, 24, 40, _slots(M, 3, seed=4), feedforward=feedforward, grad=False,
                                        vector_dtype=torch.float32), torch.bfloat16)


@needs_triton
def test_empty_slots_all_none_and_per_row_index():
    M = 21
    check_op(_fn(3), _make(M, 24, 16, _slots(M, 3, seed=1), empty=(1,)), torch.float32)
    check_op(_fn(3), _make(M, 24, 16, [-1] * M, grad=False), torch.float32)
    v = [torch.rand(16) + 0.5, torch.rand(16) + 0.5]
    x, w = torch.randn(2, 5, 24), torch.randn(16, 24)
    per_row = multi_ia3_linear(x, w, None, v, torch.tensor([1, -1]))
    per_token = multi_ia3_linear(x, w, None, v, torch.tensor([[1] * 5, [-1] * 5]))
    torch.testing.assert_close(per_row, per_token)


def test_validation():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="needs 6"):
        multi_ia3_linear(x, w, None, [torch.ones(8)], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs 8"):
        multi_ia3_linear(x, w, None, [torch.ones(6)], torch.zeros(4, dtype=torch.int64), feedforward=True)
    with pytest.raises(ValueError, match="out of range"):
        multi_ia3_linear(x, w, None, [torch.ones(6)], torch.tensor([0, 3, 0, 0]))
    with pytest.raises(ValueError, match="one size, dtype and device"):
        IA3Bank([torch.ones(6), torch.ones(5)])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_row_scale_alone_forward_and_backward(dtype):
    """fp.ops.multi_ia3_scale (IA3 around a LoRA layer): t_m ⊙ l_a, gradients of t and of the used vectors."""
    M, D = 19, 40
    slots = _slots(M, 3, seed=8)

    def make(dt):
        inputs = {"t": torch.randn(M, D, device=DEVICE, dtype=dt, requires_grad=True),
                  "index": torch.tensor(slots, dtype=torch.int32)}
        for i in range(3):
            inputs[f"v{i}"] = (1 + 0.3 * torch.randn(D, device=DEVICE)).requires_grad_(i in slots)
        return inputs

    def fn(t, index, **vs):
        return multi_ia3_scale(t, [vs[f"v{i}"] for i in range(3)], index)
    check_op(fn, make, dtype)
