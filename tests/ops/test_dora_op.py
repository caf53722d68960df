"""DoRA: the weight norm without forming W + ΔW (tier 1), and `fp.ops.dora_linear` — the LoRA op with an output
column scale — on the Triton path under the interpreter against the float64 oracle (tier 2)."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import use_backend
from fastpeft.reference import dora as reference
from tests.harness import DEVICE, check_op, needs_triton, rel_err


@pytest.fixture(autouse=True)
def _fused_strategy():
    """These tests pin the fused strategy (the whole layer in one Triton GEMM); the cuBLAS-base strategy, the
    default on a device with no strategy-table entry, is tested in tests/ops/test_cublas_strategy.py."""
    with fp.ops.use_kernel_options(linear_strategy="fused"):
        yield


def _make(M, K, N, R, *, bias=True, fan_in_fan_out=False, grads=("x", "bias", "lora_a", "lora_b", "magnitude")):
    def make(dtype):
        g = torch.Generator().manual_seed(M * 13 + K * 7 + R)

        def rnd(*shape, std=1.0):
            return torch.randn(*shape, generator=g, dtype=torch.float64) * std

        w = rnd(N, K, std=K**-0.5)
        inputs = dict(
            x=rnd(M, K).to(dtype),
            weight=(w.t().contiguous() if fan_in_fan_out else w).to(dtype),
            bias=rnd(N).to(dtype) if bias else None,
            lora_a=rnd(R, K, std=K**-0.5).float(),  # float32 adapters, as on a half-precision model
            lora_b=rnd(N, R, std=0.3).float(),
            scale=torch.full((R,), 1.5),
            magnitude=(torch.rand(N, generator=g, dtype=torch.float64) + 0.5).float(),
            fan_in_fan_out=fan_in_fan_out,
        )
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                inputs[name] = value.to(DEVICE).requires_grad_(name in grads)
        return inputs
    return make


@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_weight_norm_matches_the_formed_matrix(dtype, fif):
    t = _make(1, 37, 29, 5, fan_in_fan_out=fif)(dtype)
    w_nk = t["weight"].t() if fif else t["weight"]
    formed = w_nk.double() + (t["lora_b"].double() * 1.5) @ t["lora_a"].double()
    want = torch.linalg.vector_norm(formed, dim=1)
    got = fp.ops.dora_weight_norm(t["weight"], t["lora_a"], t["lora_b"], 1.5, fan_in_fan_out=fif)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and not got.requires_grad
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-6)
    cached = reference.weight_sq_norm(t["weight"], fif)
    assert torch.equal(fp.ops.dora_weight_norm(t["weight"], t["lora_a"], t["lora_b"], 1.5, fan_in_fan_out=fif,
                                               weight_sq_norm=cached), got)


def _dora(**kw):
    return fp.ops.dora_linear(**kw)


CASES = {
    "m1_r1": (1, 33, 17, 1, {}),
    "bias": (37, 29, 41, 4, {}),
    "r70_unfused": (33, 40, 50, 70, {}),
    "fan_in_fan_out": (29, 21, 35, 6, {"fan_in_fan_out": True}),
    "no_bias_many_rows": (100, 24, 20, 5, {"bias": False}),
}


GRID = [pytest.param(case_id, dtype, fused, id=f"{case_id}-{str(dtype)[6:]}-{'fused' if fused else 'separate'}")
        for case_id, case in CASES.items() for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for fused in (True, False) if not (fused and case[3] > 64)]  # ranks above 64 never fuse the shrink


@needs_triton
@pytest.mark.parametrize("case_id, dtype, fused", GRID)
def test_triton_matches_reference(case_id, dtype, fused):
    M, K, N, R, kw = CASES[case_id]
    with fp.ops.use_kernel_options(fused_shrink=fused):
        errors = check_op(_dora, _make(M, K, N, R, **kw), dtype)
    assert {"output", "dx", "dlora_a", "dlora_b", "dmagnitude"} <= set(errors)


@needs_triton
@pytest.mark.parametrize("grads", [("magnitude",), ("lora_b",), ("x", "magnitude"), ("bias",)])
def test_subsets_of_trainable_inputs(grads):
    errors = check_op(_dora, _make(21, 18, 26, 3, grads=grads), torch.float32)
    assert set(errors) == {"output"} | {f"d{g}" for g in grads}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_matches_the_formed_oracle_and_peft_gradient_trick(backend):
    """The norm is a constant for autograd: dm = Σ dY ⊙ Z / ‖·‖, and A, B get no gradient through the norm."""
    t = _make(9, 12, 10, 3)(torch.float64 if backend == "torch" else torch.float32)
    with use_backend(backend):
        y = fp.ops.dora_linear(**t)
        grads = torch.autograd.grad(y.sum(), [t["lora_a"], t["lora_b"], t["magnitude"]])
    leaves = {k: v.detach().double().requires_grad_() for k, v in t.items() if isinstance(v, torch.Tensor)}
    y64 = reference.dora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
                                1.5, leaves["magnitude"], False)
    want = torch.autograd.grad(y64.sum(), [leaves["lora_a"], leaves["lora_b"], leaves["magnitude"]])
    assert rel_err(y, y64) < 1e-5
    for got, ref in zip(grads, want):
        assert rel_err(got, ref) < 1e-5


def test_bad_magnitude():
    t = _make(3, 8, 6, 2)(torch.float32)
    t["magnitude"] = torch.ones(5)
    with pytest.raises(ValueError, match="magnitude has shape"):
        fp.ops.dora_linear(**t)
