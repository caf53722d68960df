"""GPU tier: the compiled Triton kernels of LoRA, IA3 and DoRA on CUDA tensors against the float64 reference
(skipped without CUDA).

The same comparison as the interpreter tests, on shapes where autotuning picks the large tiles: LLaMA-sized
linears, several token counts including partial tiles, ranks around the fused-shrink limit, dropout, Conv1D.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.ops._common import TINY_M, rows_backend
from tests.harness import check_op

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CASES = [  # M, K, N, R, bias, dropout_p, fan_in_fan_out
    (17, 4096, 4096, 8, False, 0.0, False),        # just above the tiny-M rule: Triton
    (1000, 4096, 11008, 16, True, 0.0, False),     # partial row tile, bias
    (4096, 11008, 4096, 64, False, 0.0, False),    # largest fused-shrink rank
    (2048, 1024, 3000, 65, False, 0.0, False),     # past the fused limit: separate shrink
    (3000, 768, 2304, 16, True, 0.1, True),        # GPT-2 Conv1D layout with dropout
]


def _inputs(M, K, N, R, bias, dropout_p, fan_in_fan_out):
    def make(dtype):
        x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
        w = w.t().contiguous() if fan_in_fan_out else w
        return dict(
            x=x, weight=w,
            bias=torch.randn(N, device="cuda", dtype=dtype, requires_grad=True) if bias else None,
            lora_a=(torch.randn(R, K, device="cuda") / K ** 0.5).requires_grad_(),
            lora_b=(torch.randn(N, R, device="cuda") / R ** 0.5).requires_grad_(),
            scale=torch.full((R,), 2.0, device="cuda", requires_grad=True),
            seed=torch.tensor(1234, device="cuda"), dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out)
    return make


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}_K{}_N{}_r{}".format(*c[:4]))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_kernels_match_reference_on_cuda(case, dtype, fused):
    with fp.ops.use_kernel_options(fused_shrink=fused):
        check_op(fp.ops.lora_linear, _inputs(*case), dtype)


def test_automatic_dispatch_on_cuda():
    """CUDA tensors run Triton, except tiny M (decode), which runs the reference."""
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    assert rows_backend("lora_linear", x) == "triton"
    assert rows_backend("lora_linear", x[:TINY_M]) == "torch"
    with fp.ops.use_backend("triton"):
        assert rows_backend("lora_linear", x[:1]) == "triton"


IA3_CASES = [(17, 4096, 4096, "out"), (1000, 4096, 11008, "in"), (3000, 11008, 4096, "both")]  # M, K, N, mode


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", IA3_CASES, ids=lambda c: "M{}_K{}_N{}_{}".format(*c))
def test_ia3_kernels_match_reference_on_cuda(case, dtype):
    M, K, N, mode = case

    def make(dt):
        return dict(
            x=torch.randn(M, K, device="cuda", dtype=dt, requires_grad=True),
            weight=torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5,
            bias=torch.randn(N, device="cuda", dtype=dt, requires_grad=True),
            in_scale=(torch.rand(K, device="cuda") + 0.5).requires_grad_() if mode != "out" else None,
            out_scale=(torch.rand(N, device="cuda") + 0.5).requires_grad_() if mode != "in" else None)
    check_op(fp.ops.ia3_linear, make, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "M{}_K{}_N{}_r{}".format(*c[:4]))
def test_dora_kernels_match_reference_on_cuda(case, dtype):
    M, K, N, R, bias, _, _ = case
    make_lora = _inputs(M, K, N, R, bias, 0.0, False)

    def make(dt):
        inputs = make_lora(dt)
        for key in ("seed", "dropout_p"):
            inputs.pop(key)
        inputs["magnitude"] = (torch.rand(N, device="cuda") + 0.5).requires_grad_()
        return inputs
    check_op(fp.ops.dora_linear, make, dtype)
