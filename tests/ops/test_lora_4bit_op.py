"""Tier 2: fp.ops.lora_linear_4bit, the LoRA linear on a bitsandbytes 4-bit weight, on both GPU strategies.

"fused" forms the 4-bit weight inside the GEMM (kernels/nf4.py) and must never call the library's dequantization
(no 16-bit copy of W); "cublas" dequantizes with bitsandbytes then runs the dense LoRA op. Each case: forward and
every gradient against float64 with outputs poisoned (tests.harness.check_op), the weight quantized by bitsandbytes
(NF4/FP4, blocksize 64/128, with and without double quantization).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastpeft as fp
from fastpeft.errors import InputError
from fastpeft.modules.base_layers import packed_4bit
from tests.harness import check_op, needs_triton

bnb = pytest.importorskip("bitsandbytes")


@dataclasses.dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    R: int
    quant_type: str = "nf4"
    blocksize: int = 64
    nested: bool = False
    bias: bool = True
    dropout_p: float = 0.0


CASES = {
    "nf4": Case(33, 128, 96, 8),
    "nf4-nested-128": Case(20, 256, 72, 16, blocksize=128, nested=True),
    "fp4-rows-span-blocks": Case(7, 200, 96, 4, quant_type="fp4", bias=False),  # K % 64 != 0: blocks span rows
    "fp4-nested-dropout": Case(24, 192, 100, 8, quant_type="fp4", nested=True, dropout_p=0.25),
    "decode-rank1": Case(1, 64, 80, 1, nested=True),
}


def quantized(case: Case, dtype: torch.dtype, calls: list | None = None) -> fp.ops.Packed4bit:
    """W (N, K) quantized by bitsandbytes from `dtype` (its dequantized dtype); `calls` counts dequantizations."""
    g = torch.Generator().manual_seed(case.N * case.K)
    w = (torch.randn(case.N, case.K, generator=g) / case.K ** 0.5).to(dtype)
    data, state = bnb.functional.quantize_4bit(w, blocksize=case.blocksize, quant_type=case.quant_type,
                                               compress_statistics=case.nested)
    weight = packed_4bit(data, state)
    if calls is None:
        return weight

    def counted():
        calls.append("dequantize")
        return weight.dequantize()

    return dataclasses.replace(weight, dequantize=counted)


def make(case: Case, calls: list | None = None):
    def inputs(dtype):
        g = torch.Generator().manual_seed(case.M + case.R)
        return dict(
            x=torch.randn(case.M, case.K, generator=g).to(dtype).requires_grad_(),
            weight=quantized(case, dtype, calls),
            bias=torch.randn(case.N, generator=g).to(dtype).requires_grad_() if case.bias else None,
            lora_a=(torch.randn(case.R, case.K, generator=g) / case.K ** 0.5).requires_grad_(),
            lora_b=torch.randn(case.N, case.R, generator=g).requires_grad_(),
            scale=torch.full((case.R,), 0.5).requires_grad_(),
            dropout_p=case.dropout_p,
            seed=torch.tensor([1234]) if case.dropout_p else None)
    return inputs


@needs_triton
@pytest.mark.parametrize("how", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_float64(case_id, dtype, how):
    calls: list = []
    with fp.ops.use_kernel_options(linear_strategy=how):
        check_op(fp.ops.lora_linear_4bit, make(CASES[case_id], calls), dtype)
    if how == "fused":  # the float64 oracle dequantizes; the fused runs (forward and backward) never do
        assert calls.count("dequantize") == 2 * 2, calls  # the two reference runs, forward and backward each


def test_reference_is_the_library_dequantization():
    """On the CPU (no forced backend) the op is F.linear on bitsandbytes' dequantized W plus the low-rank term."""
    case = CASES["nf4-nested-128"]
    inputs = make(case)(torch.float32)
    y = fp.ops.lora_linear_4bit(**inputs)
    w = inputs["weight"].dequantize()
    expected = torch.nn.functional.linear(inputs["x"], w, inputs["bias"]) + \
        0.5 * (inputs["x"] @ inputs["lora_a"].t()) @ inputs["lora_b"].t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused():
    inputs = make(CASES["nf4"])(torch.float32)
    with pytest.raises(InputError, match=r"x has 127 input features; the 4-bit weight is \(96, 128\)"):
        fp.ops.lora_linear_4bit(**{**inputs, "x": torch.randn(3, 127)})
    with pytest.raises(InputError, match=r"lora_b has shape \(96, 7\)"):
        fp.ops.lora_linear_4bit(**{**inputs, "lora_b": torch.randn(96, 7)})
    with pytest.raises(InputError, match="dropout_p=1.5"):
        fp.ops.lora_linear_4bit(**{**inputs, "dropout_p": 1.5})
