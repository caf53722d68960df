"""Tier 2: the public op `fp.ops.ia3_linear`, its Triton path (interpreter on CPU) and its torch path.

Numerics go through tests.harness.check_op (forward and backward, outputs poisoned, float64 oracle). The
kernel launcher is spied on so each case also asserts that one GEMM ran per pass with the reductions fused in.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import use_backend
from fastpeft.reference import ia3 as reference
from tests.harness import DEVICE, HAS_TRITON, check_op, needs_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fused_strategy():
    """These tests pin the fused strategy (the whole layer in one Triton GEMM); the cuBLAS-base strategy, the
    default on a device with no strategy-table entry, is tested in tests/ops/test_cublas_strategy.py."""
    with fp.ops.use_kernel_options(linear_strategy="fused"):
        yield


@pytest.fixture
def gemms(monkeypatch):
    """Records the keyword arguments of each GEMM launch of fastpeft/kernels/lora.py."""
    calls: list[dict] = []
    if not HAS_TRITON:
        return calls
    kern = importlib.import_module("fastpeft.kernels.lora")
    real = kern.gemm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kern, "gemm", spy)
    return calls


@dataclass
class Case:
    M: int
    K: int
    N: int
    mode: str  # "in" (feed-forward), "out" (attention), "both"
    bias: bool = True
    fan_in_fan_out: bool = False
    x_shape: tuple | None = None
    grads: tuple = ("x", "bias", "in_scale", "out_scale")

    def make(self, dtype: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(self.M * 31 + self.K)

        def rnd(*shape, std=1.0):
            return torch.randn(*shape, generator=g, dtype=torch.float64) * std

        w = rnd(self.N, self.K, std=self.K**-0.5)
        inputs = dict(
            x=rnd(*(self.x_shape or (self.M, self.K))).to(dtype),
            weight=(w.t().contiguous() if self.fan_in_fan_out else w).to(dtype),
            bias=rnd(self.N).to(dtype) if self.bias else None,
            in_scale=(torch.rand(self.K, generator=g, dtype=torch.float64) + 0.5).float()
            if self.mode in ("in", "both") else None,
            out_scale=(torch.rand(self.N, generator=g, dtype=torch.float64) + 0.5).float()
            if self.mode in ("out", "both") else None,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                inputs[name] = value.to(DEVICE).requires_grad_(name in self.grads)
        return inputs


CASES = {
    "out_m1": Case(1, 33, 17, "out"),
    "in_m1": Case(1, 33, 17, "in"),
    "out": Case(37, 29, 41, "out"),
    "in": Case(37, 29, 41, "in"),
    "both_no_bias": Case(40, 50, 24, "both", bias=False),
    "out_many_row_blocks": Case(100, 24, 20, "out"),
    "in_x3d": Case(10, 19, 23, "in", x_shape=(2, 5, 19)),
    "out_fan_in_fan_out": Case(29, 21, 35, "out", fan_in_fan_out=True),
    "in_fan_in_fan_out": Case(29, 21, 35, "in", fan_in_fan_out=True),
}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_matches_reference(case_id, dtype, gemms):
    case = CASES[case_id]
    errors = check_op(fp.ops.ia3_linear, case.make, dtype)
    want = {"output", "dx", "dbias", "din_scale", "dout_scale"}
    want -= {"dbias"} if not case.bias else set()
    want -= {"din_scale"} if case.mode == "out" else set()
    want -= {"dout_scale"} if case.mode == "in" else set()
    assert set(errors) == want
    assert len(gemms) == 2, "one GEMM forward, one backward"
    fwd, bwd = gemms
    assert fwd.get("e_rn") is None and (fwd.get("z") is not None) == (case.mode != "in")
    assert (bwd.get("in_dot") is not None) == (case.mode != "in"), "dv not reduced inside the dX GEMM"
    assert (bwd.get("out_dot") is not None) == (case.mode != "out"), "du not reduced inside the dX GEMM"
    assert (bwd.get("in_sum") is not None) == case.bias


@needs_triton
@pytest.mark.parametrize("grads", [("out_scale",), ("in_scale",), ("bias", "out_scale"), ("x",), ()])
def test_subsets_of_trainable_inputs(grads, gemms):
    """E.g. the first layer's input (embeddings) needs no gradient; only the vector does."""
    case = Case(21, 18, 26, "both", grads=grads)
    errors = check_op(fp.ops.ia3_linear, case.make, torch.float32)
    assert set(errors) == {"output"} | {f"d{g}" for g in grads}


def test_torch_path_is_the_reference():
    t = Case(9, 8, 7, "both").make(torch.float32)
    y = fp.ops.ia3_linear(**t)
    want = reference.ia3_linear(t["x"], t["weight"], t["bias"], t["in_scale"], t["out_scale"], False)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@needs_triton
def test_empty_input(gemms):
    t = Case(0, 8, 7, "both").make(torch.float32)
    with use_backend("triton"):
        y = fp.ops.ia3_linear(**t)
        y.sum().backward()
    assert y.shape == (0, 7) and t["out_scale"].grad.abs().sum() == 0 and t["in_scale"].grad.abs().sum() == 0


@pytest.mark.parametrize("bad, match", [
    (dict(in_scale=torch.ones(5)), "in_scale has shape"),
    (dict(out_scale=torch.ones(3)), "out_scale has shape"),
    (dict(out_scale=torch.ones(7, dtype=torch.int64)), "floating point"),
    (dict(x=torch.randn(4, 9)), "input features"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), "must match"),
    (dict(bias=torch.ones(6)), "bias has shape"),
])
def test_bad_input(bad, match):
    t = dict(x=torch.randn(4, 8), weight=torch.randn(7, 8), bias=torch.zeros(7), in_scale=torch.ones(8),
             out_scale=torch.ones(7))
    t.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fp.ops.ia3_linear(**t)


def test_compiles_without_graph_breaks():
    t = Case(6, 8, 5, "both").make(torch.float32)
    fn = torch.compile(fp.ops.ia3_linear, fullgraph=True, backend="aot_eager")
    y = fn(**t)
    y.sum().backward()
    assert t["in_scale"].grad is not None and t["out_scale"].grad is not None
    torch.testing.assert_close(y, reference.ia3_linear(t["x"], t["weight"], t["bias"], t["in_scale"],
                                                       t["out_scale"], False), rtol=1e-6, atol=1e-6)
