"""Tier 2: the public op `fp.ops.lora_linear`, its Triton path (interpreter on CPU) and its torch path.

Numerics go through tests.harness.check_op: the Triton path in each dtype, forward and backward, outputs
poisoned with NaN, against the float64 reference. Kernel launchers are spied on so every case also asserts
which kernel variant ran (fused or separate shrink, split reduction). Then: dispatch, validation, empty inputs,
autocast, dropout determinism and the tensors saved for backward.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

import fastpeft as fp
from fastpeft.kernels.limits import FUSED_SHRINK_MAX_RANK
from fastpeft.ops import dispatch, use_backend
from fastpeft.reference import lora as reference
from fastpeft.reference.dropout import keep_mask
from tests.harness import DEVICE, HAS_TRITON, check_op, needs_triton, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(autouse=True)
def _fused_strategy():
    """These tests pin the fused strategy (the whole layer in one Triton GEMM); the cuBLAS-base strategy, the
    default on a device with no strategy-table entry, is tested in tests/ops/test_cublas_strategy.py."""
    with fp.ops.use_kernel_options(linear_strategy="fused"):
        yield


def dtype_id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@pytest.fixture
def launches(monkeypatch):
    """Records each launcher call of fastpeft/kernels/lora.py as (name, keyword arguments)."""
    calls: list[tuple[str, dict]] = []
    if not HAS_TRITON:
        return calls  # no kernel can run
    kern = importlib.import_module("fastpeft.kernels.lora")

    def spy(name):
        real = getattr(kern, name)

        def wrapper(*args, **kwargs):
            calls.append((name, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(kern, name, wrapper)

    for name in ("gemm", "shrink", "reduce"):
        spy(name)
    return calls


def fused_gemms(calls) -> list[bool]:
    return [kw.get("u_kr") is not None for name, kw in calls if name == "gemm"]


def reduce_splits(calls) -> list[int]:
    return [kw.get("splits", 1) for name, kw in calls if name == "reduce"]


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One call of the op: sizes, options, and which inputs require grad."""
    M: int
    K: int
    N: int
    R: int
    bias: bool = False
    dropout_p: float = 0.0
    fan_in_fan_out: bool = False
    x_shape: tuple | None = None  # N-D input of M rows in all
    scale: str = "tensor"  # "tensor" (R,) with grad, or "float"
    grads: tuple = ("x", "bias", "lora_a", "lora_b", "scale")
    adapter_dtype: torch.dtype | None = None  # A and B in another dtype than x (fp32 adapters on a half model)

    def make(self, dtype: torch.dtype) -> dict:
        """Random non-zero inputs in `dtype` on DEVICE (scale stays float32); a fixed seed when dropout is on."""
        g = torch.Generator().manual_seed(self.M * 7919 + self.K * 31 + self.R)
        M, K, N, R = self.M, self.K, self.N, self.R

        def rnd(*shape, std=1.0):
            return torch.randn(*shape, generator=g, dtype=torch.float64) * std

        w = rnd(N, K, std=K**-0.5)
        inputs = dict(
            x=rnd(*(self.x_shape or (M, K))).to(dtype),
            weight=(w.t().contiguous() if self.fan_in_fan_out else w).to(dtype),
            bias=rnd(N).to(dtype) if self.bias else None,
            lora_a=rnd(R, K, std=K**-0.5).to(self.adapter_dtype or dtype),
            lora_b=rnd(N, R).to(self.adapter_dtype or dtype),
            scale=(torch.rand(R, generator=g, dtype=torch.float64) + 0.5).float() if self.scale == "tensor" else 1.75,
            dropout_p=self.dropout_p,
            seed=torch.tensor(4242 + M, dtype=torch.int64) if self.dropout_p else None,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                inputs[name] = value.to(DEVICE).requires_grad_(name in self.grads and value.is_floating_point())
        return inputs


CASES = {
    "m1_r1": Case(1, 33, 17, 1),
    "bias": Case(37, 29, 41, 3, bias=True),
    "dropout": Case(70, 48, 40, 20, dropout_p=0.3),
    "r70_unfused": Case(33, 40, 150, 70),
    "split_reduce": Case(300, 24, 20, 5, bias=True),
    "split_reduce_dropout": Case(300, 24, 20, 5, dropout_p=0.5),
    "x3d": Case(10, 19, 23, 4, bias=True, x_shape=(2, 5, 19)),
    "fan_in_fan_out": Case(29, 21, 35, 6, bias=True, fan_in_fan_out=True),
}
SPLIT_CASES = {"split_reduce", "split_reduce_dropout"}


def _check_variants(case: Case, calls, fused: bool) -> None:
    """The kernels that ran are the ones this case is meant to cover."""
    assert any(name == "gemm" for name, _ in calls), "the Triton path launched no kernel"
    kinds = fused_gemms(calls)
    if fused and case.R <= 64:
        assert any(kinds), "kernel option fused_shrink=True, but no GEMM fused the shrink"
        if not case.dropout_p:  # without dropout the forward is one fused GEMM
            assert calls[0][0] == "gemm" and fused_gemms(calls[:1]) == [True], "forward did not fuse the shrink"
    else:
        assert not any(kinds), "a GEMM fused the shrink"
        assert any(name == "shrink" for name, _ in calls)


def _grid(cases: dict, dtypes) -> list:
    """(case, dtype, fused) parameters; cases with R > 64 only once (fusing does not apply to them)."""
    return [pytest.param(case_id, dtype, fused,
                         id=f"{case_id}-{dtype_id(dtype)}-{'fused_shrink' if fused else 'separate_shrink'}")
            for case_id, case in cases.items() for dtype in dtypes for fused in (True, False)
            if not (fused and case.R > 64)]


@needs_triton
@pytest.mark.parametrize("case_id,dtype,fused", _grid(CASES, DTYPES))
def test_triton_matches_float64(case_id, dtype, fused, launches):
    """Output and gradients (x, bias, A, B, s) of the Triton path vs float64, both shrink variants."""
    case = CASES[case_id]
    assert FUSED_SHRINK_MAX_RANK == 64, "update _grid"
    with fp.ops.use_kernel_options(fused_shrink=fused):
        errors = check_op(fp.ops.lora_linear, case.make, dtype)
    assert set(errors) == {"output", "dx", "dbias", "dlora_a", "dlora_b", "dscale"} - (
        set() if case.bias else {"dbias"})
    _check_variants(case, launches, fused)
    splits = reduce_splits(launches)
    if case_id in SPLIT_CASES:
        assert max(splits) > 1, f"M={case.M} did not split the dA/dB reduction: {splits}"
    else:
        assert max(splits) == 1


EXTRA_CASES = {
    "r256": Case(20, 24, 28, 256, bias=True),
    "scale_float": Case(37, 29, 41, 3, scale="float", grads=("x", "lora_a", "lora_b")),
    "adapters_only": Case(37, 29, 41, 3, bias=True, grads=("lora_a", "lora_b")),
    "x_only": Case(37, 29, 41, 3, dropout_p=0.2, grads=("x",)),
    "a_and_scale": Case(37, 29, 41, 3, grads=("lora_a", "scale")),
    "bias_only": Case(37, 29, 41, 3, bias=True, grads=("bias",)),
    "fp32_adapters": Case(37, 29, 41, 3, bias=True, dropout_p=0.2, adapter_dtype=torch.float32),
    "fp32_adapters_no_dropout": Case(37, 29, 41, 3, adapter_dtype=torch.float32),
    "weight_grad": Case(37, 29, 41, 3, bias=True, grads=("x", "weight", "lora_a", "lora_b")),
    "weight_grad_fan_in_fan_out": Case(29, 21, 35, 6, fan_in_fan_out=True, dropout_p=0.25,
                                       grads=("x", "weight", "lora_a", "lora_b", "scale")),
}


@needs_triton
@pytest.mark.parametrize("case_id,dtype,fused", _grid(EXTRA_CASES, [torch.float32, torch.bfloat16]))
def test_triton_gradient_subsets(case_id, dtype, fused, launches):
    """r = 256, a float scale, and each subset of trainable inputs (a trainable base weight included)."""
    case = EXTRA_CASES[case_id]
    with fp.ops.use_kernel_options(fused_shrink=fused):
        errors = check_op(fp.ops.lora_linear, case.make, dtype)
    present = {"x", "weight", "lora_a", "lora_b"} | ({"bias"} if case.bias else set()) | (
        {"scale"} if case.scale == "tensor" else set())
    wanted = {f"d{name}" for name in case.grads if name in present}
    assert set(errors) == {"output"} | wanted
    assert launches, "the Triton path launched no kernel"


FORMULA_CASES = {
    "plain": Case(23, 18, 27, 4, bias=True),
    "dropout": Case(23, 18, 27, 4, bias=True, dropout_p=0.3),
    "fan_in_fan_out_3d_dropout": Case(12, 18, 27, 4, bias=True, dropout_p=0.3, fan_in_fan_out=True,
                                      x_shape=(3, 4, 18)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", list(FORMULA_CASES))
def test_op_matches_formula_written_here(case_id, backend):
    """Both backends vs the formula in float64 written in this test: output and every gradient, W included."""
    case = FORMULA_CASES[case_id]
    grads = ("x", "weight", "bias", "lora_a", "lora_b", "scale")
    inputs = Case(**{**case.__dict__, "grads": grads}).make(torch.float32)
    with use_backend(backend):
        y = fp.ops.lora_linear(**inputs)
    leaves = {k: inputs[k].detach().double().requires_grad_() for k in grads}
    x, w, b, a, bb, s = (leaves[k] for k in grads)
    x2 = x.reshape(-1, case.K)
    h = x2
    if case.dropout_p:
        keep = keep_mask(inputs["seed"], case.M, case.K, case.dropout_p)
        assert 0 < keep.sum() < keep.numel()
        h = x2 * keep / (1 - case.dropout_p)
    w_nk = w.t() if case.fan_in_fan_out else w
    y64 = (x2 @ w_nk.t() + b + ((h @ a.t()) * s) @ bb.t()).reshape(*x.shape[:-1], case.N)
    assert y.shape == y64.shape and rel_err(y, y64) < 1e-5
    dy = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE)
    with use_backend(backend):
        got = torch.autograd.grad(y, [inputs[k] for k in grads], dy.float())
    want = torch.autograd.grad(y64, list(leaves.values()), dy)
    for name, g, g64 in zip(grads, got, want):
        assert g.shape == inputs[name].shape and rel_err(g, g64) < 1e-5, name


# ------------------------------------------------------------------------------------------------------------
# Strided bias/scale, backward outside the forward's backend block
# ------------------------------------------------------------------------------------------------------------

def _strided(which: str):
    """lora_linear with bias or scale passed as a non-contiguous (stride 2) view of a leaf."""
    def fn(wide, **kw):
        kw[which] = wide[:, 1]
        return fp.ops.lora_linear(**kw)

    def make(dtype):
        inputs = Case(37, 29, 41, 3, bias=True).make(dtype)
        leaf = inputs.pop(which).detach()
        wide = torch.stack([torch.full_like(leaf, 100.0), leaf], dim=1)  # (n, 2): column 1 is the operand
        inputs["wide"] = wide.requires_grad_()
        return inputs

    return fn, make


@needs_triton
@pytest.mark.parametrize("which", ["bias", "scale"])
def test_triton_strided_bias_and_scale(which):
    """A non-contiguous bias or per-rank scale gives the same result on the Triton path."""
    fn, make = _strided(which)
    check_op(fn, make, torch.float32)


@needs_triton
def test_backward_outside_the_forced_backend_block():
    """Forward under use_backend('triton'), backward after leaving the block (automatic choice: torch)."""
    case = Case(37, 29, 41, 3, scale="float", grads=("x", "lora_a", "lora_b"))  # frozen bias, fixed scale
    inputs = case.make(torch.float32)
    with use_backend("triton"):
        y = fp.ops.lora_linear(**inputs)
    y.square().sum().backward()
    assert inputs["lora_a"].grad is not None and torch.isfinite(inputs["lora_a"].grad).all()


# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------

def _small(dtype=torch.float32, device=DEVICE) -> dict:
    inputs = Case(9, 12, 10, 3, bias=True).make(dtype)
    return {k: (v.detach().to(device).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


def test_cpu_default_is_the_torch_backend(launches):
    """On CPU without FASTPEFT_BACKEND the op runs the reference and says so; no kernel is launched."""
    assert dispatch.requested_backend() is None
    assert fp.ops.explain("cpu")["lora_linear"].startswith("torch (")
    inputs = _small(device="cpu")
    y = fp.ops.lora_linear(**inputs)
    want = reference.lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"],
                                 inputs["scale"], None, 0.0, False)
    assert torch.allclose(y, want, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert launches == []


@needs_triton
def test_forced_triton_runs_the_kernels(monkeypatch, launches):
    """FASTPEFT_BACKEND=triton (interpreter on CPU) launches the kernels; use_backend('torch') overrides it."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    assert dispatch.requested_backend() == "triton"
    assert fp.ops.explain("cpu")["lora_linear"].startswith("triton (forced by FASTPEFT_BACKEND=triton")
    inputs = _small()
    y = fp.ops.lora_linear(**inputs)
    assert [name for name, _ in launches] and all(name in ("gemm", "shrink") for name, _ in launches)
    with use_backend("torch"):
        n = len(launches)
        y_torch = fp.ops.lora_linear(**inputs)
        assert len(launches) == n
    assert rel_err(y, y_torch) < 1e-5


@pytest.mark.parametrize("how", ["env", "context"])
def test_invalid_backend_name(monkeypatch, how):
    """An unknown backend raises BackendError naming it and the valid choices."""
    if how == "env":
        monkeypatch.setenv("FASTPEFT_BACKEND", "gpu")
        with pytest.raises(fp.BackendError, match=r"'gpu'.*torch, triton, cuda"):
            fp.ops.lora_linear(**_small())
    else:
        with pytest.raises(fp.BackendError, match=r"'gpu'.*torch, triton, cuda"):
            with use_backend("gpu"):
                pass


def test_forced_cuda_backend_raises(monkeypatch):
    """lora_linear has no CUDA C++ kernel: forcing one raises instead of falling back."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    with pytest.raises(fp.BackendError, match="no CUDA C\\+\\+ kernel"):
        fp.ops.lora_linear(**_small())


@needs_triton
def test_forced_triton_with_unsupported_dtype_raises():
    """float64 has no Triton kernel: a forced Triton backend raises, naming the dtype and the supported ones."""
    with use_backend("triton"), pytest.raises(fp.BackendError, match=r"float64.*bfloat16, float16, float32"):
        fp.ops.lora_linear(**_small(torch.float64))


@needs_triton
def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    """Without TRITON_INTERPRET, Triton cannot run CPU tensors: BackendError with the two ways out."""
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    with pytest.raises(fp.BackendError, match=r"(?s)on cpu.*CUDA.*Unset FASTPEFT_BACKEND.*TRITON_INTERPRET=1"):
        fp.ops.lora_linear(**_small(device="cpu"))
    assert fp.ops.explain("cpu")["lora_linear"].startswith("error (")


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------

def _valid(M=4, K=6, N=5, R=2) -> dict:
    return dict(x=torch.randn(M, K), weight=torch.randn(N, K), bias=torch.randn(N), lora_a=torch.randn(R, K),
                lora_b=torch.randn(N, R), scale=torch.rand(R) + 0.5)


INVALID = {  # id: (changes, exception, message pattern)
    "wrong_K": (dict(x=torch.randn(4, 7)), ValueError, r"x has 7 input features.*\(5, 6\).*expects 6"),
    "fan_in_fan_out_layout": (dict(fan_in_fan_out=True), ValueError, r"x has 6 input features.*fan_in_fan_out=True"),
    "weight_1d": (dict(weight=torch.randn(30)), ValueError, r"weight must be 2-D"),
    "lora_a_K": (dict(lora_a=torch.randn(2, 7)), ValueError, r"lora_a has shape \(2, 7\); expected \(r, 6\)"),
    "rank_0": (dict(lora_a=torch.randn(0, 6), lora_b=torch.randn(5, 0)), ValueError, r"r >= 1"),
    "lora_b_rank": (dict(lora_b=torch.randn(5, 3)), ValueError, r"lora_b has shape \(5, 3\); expected \(5, 2\)"),
    "lora_b_transposed": (dict(lora_b=torch.randn(2, 5)), ValueError, r"lora_b has shape \(2, 5\); expected \(5, 2\)"),
    "bias_shape": (dict(bias=torch.randn(4)), ValueError, r"bias has shape \(4,\); expected \(5,\)"),
    "scale_shape": (dict(scale=torch.rand(3)), ValueError, r"scale has shape \(3,\); expected \(2,\)"),
    "scale_2d": (dict(scale=torch.rand(1, 2)), ValueError, r"scale has shape \(1, 2\)"),
    "dropout_negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p=-0.1 is outside \[0, 1\)"),
    "dropout_one": (dict(dropout_p=1.0), ValueError, r"dropout_p=1.0 is outside \[0, 1\)"),
    "dtype_mismatch": (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError,
                       r"x is torch.float64 and the base weight is torch.float32"),
    "integer_x": (dict(x=torch.ones(4, 6, dtype=torch.int32), weight=torch.ones(5, 6, dtype=torch.int32)),
                  TypeError, r"x is torch.int32"),
    "integer_lora_a": (dict(lora_a=torch.ones(2, 6, dtype=torch.int64)), TypeError,
                       r"lora_a must be floating point"),
    "lora_a_device": (dict(lora_a=torch.randn(2, 6, device="meta")), ValueError, r"lora_a is on meta but x is on cpu"),
    "weight_device": (dict(weight=torch.randn(5, 6, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
    "bias_device": (dict(bias=torch.randn(5, device="meta")), ValueError, r"bias is on meta"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", list(INVALID))
def test_validation_errors(bad, backend, monkeypatch):
    """Bad inputs raise before any launch, with a message naming the argument and what was expected."""
    changes, exc, pattern = INVALID[bad]
    kwargs = {**_valid(), **changes}
    launched = []
    if backend == "triton":
        kern = importlib.import_module("fastpeft.kernels.lora")
        for name in ("gemm", "shrink", "reduce"):
            monkeypatch.setattr(kern, name, lambda *a, _n=name, **k: launched.append(_n))
    with use_backend(backend), pytest.raises(exc, match=pattern):
        fp.ops.lora_linear(**kwargs)
    assert launched == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["scale", "seed"])
def test_validation_scale_and_seed_device(which, backend):
    """A scale or seed on another device raises ValueError naming it, like the other operands."""
    kwargs = {**_valid(), "dropout_p": 0.2, "seed": torch.tensor(3)}
    kwargs[which] = kwargs[which].to("meta")
    with use_backend(backend), pytest.raises(ValueError, match=rf"{which} is on meta"):
        fp.ops.lora_linear(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# Empty inputs, autocast
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape", [(0, 12), (2, 0, 12)], ids=["2d", "3d"])
def test_empty_input(x_shape, backend):
    """M = 0 gives an empty output of the right shape and zero gradients for the adapter."""
    case = Case(9, 12, 10, 3, bias=True, dropout_p=0.1)
    inputs = case.make(torch.float32)
    inputs["x"] = torch.randn(*x_shape, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = fp.ops.lora_linear(**inputs)
        assert y.shape == (*x_shape[:-1], 10) and y.dtype == torch.float32
        y.sum().backward()
    assert inputs["x"].grad.shape == x_shape
    for name in ("lora_a", "lora_b", "bias", "scale"):
        grad = inputs[name].grad
        assert grad is not None and grad.shape == inputs[name].shape, name
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bfloat16(backend):
    """Under torch.autocast(bfloat16) fp32 inputs give a bf16 output; gradients come back in fp32."""
    inputs = Case(40, 24, 20, 4, bias=True).make(torch.float32)
    x, w, b, a, bb, s = (inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scale"))
    with use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = fp.ops.lora_linear(**inputs)
    assert y.dtype == torch.bfloat16 and y.shape == (40, 20)
    x64, w64, b64, a64, bb64, s64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b, a, bb, s))
    y64 = x64 @ w64.t() + b64 + ((x64 @ a64.t()) * s64) @ bb64.t()
    assert rel_err(y, y64) < 2e-2
    dy = torch.randn(40, 20, dtype=torch.float64, device=DEVICE)
    with use_backend(backend):
        y.backward(dy.to(y.dtype))
    want = torch.autograd.grad(y64, [x64, a64, bb64], dy)
    for t, g64 in zip((x, a, bb), want):
        assert t.grad.dtype == torch.float32 and rel_err(t.grad, g64) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no_dropout", "dropout"])
def test_fp32_adapters_on_bf16_layer_keep_fp32_gradients(backend, dropout_p):
    """Adapters wider than the layer get gradients in their own dtype; the output is in the layer's dtype."""
    inputs = Case(37, 29, 41, 3, bias=True, dropout_p=dropout_p, adapter_dtype=torch.float32).make(torch.bfloat16)
    with use_backend(backend):
        y = fp.ops.lora_linear(**inputs)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    for name, dtype in (("x", torch.bfloat16), ("bias", torch.bfloat16), ("lora_a", torch.float32),
                        ("lora_b", torch.float32), ("scale", torch.float32)):
        grad = inputs[name].grad
        assert grad is not None and grad.dtype == dtype and torch.isfinite(grad).all(), name


# ------------------------------------------------------------------------------------------------------------
# Dropout: determinism, one mask on both backends, forward and backward on the same mask
# ------------------------------------------------------------------------------------------------------------

DROP = Case(45, 26, 30, 5, bias=True, dropout_p=0.4)


def _run(backend, inputs, seed, dy):
    fresh = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
             for k, v in inputs.items()}
    fresh["seed"] = seed
    with use_backend(backend):
        y = fp.ops.lora_linear(**fresh)
        grads = torch.autograd.grad(y, [fresh[k] for k in ("x", "lora_a", "lora_b", "scale")], dy)
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_is_deterministic(backend):
    """The same seed gives bit-identical outputs and gradients; another seed changes them."""
    inputs = DROP.make(torch.float32)
    dy = torch.randn(45, 30, device=DEVICE)
    y1, g1 = _run(backend, inputs, torch.tensor(17, device=DEVICE), dy)
    y2, g2 = _run(backend, inputs, torch.tensor(17, device=DEVICE), dy)
    y3, _ = _run(backend, inputs, torch.tensor(18, device=DEVICE), dy)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert rel_err(y3, y1) > 1e-2


@needs_triton
def test_dropout_triton_uses_the_torch_mask():
    """Same seed: the Triton path and the torch path give the same output and gradients (float32)."""
    inputs = DROP.make(torch.float32)
    dy = torch.randn(45, 30, device=DEVICE)
    y_t, g_t = _run("triton", inputs, torch.tensor(1234, device=DEVICE), dy)
    y_r, g_r = _run("torch", inputs, torch.tensor(1234, device=DEVICE), dy)
    assert rel_err(y_t, y_r) < 1e-5
    for name, a, b in zip(("x", "lora_a", "lora_b", "scale"), g_t, g_r):
        assert rel_err(a, b) < 1e-5, name
    y_other, _ = _run("torch", inputs, torch.tensor(1235, device=DEVICE), dy)  # the comparison can tell masks apart
    assert rel_err(y_t, y_other) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_without_seed_uses_one_mask_for_forward_and_backward(backend):
    """seed=None draws a fresh mask per call, and the backward regenerates the forward's mask.

    With the mask fixed, the low-rank term L = s·(drop(x) Aᵀ) Bᵀ is linear in each of x, A, B, so
    ⟨dY, L⟩ = ⟨dA, A⟩ = ⟨dB, B⟩ = ⟨dX − dY W, x⟩; another mask in the backward breaks these identities.
    """
    case = Case(45, 26, 30, 5, dropout_p=0.5)
    inputs = case.make(torch.float32)
    inputs["seed"] = None
    x, w, a, b = inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    dy = torch.randn(45, 30, device=DEVICE)
    with use_backend(backend):
        y = fp.ops.lora_linear(**inputs)
        dx, da, db = torch.autograd.grad(y, [x, a, b], dy)
        y_again = fp.ops.lora_linear(**inputs)
    assert not torch.equal(y, y_again), "two calls without a seed used the same mask"
    low_rank = (y - x @ w.t()).detach().double()
    inner = (dy.double() * low_rank).sum().item()
    for name, value in (("A", (da.double() * a.double()).sum()), ("B", (db.double() * b.double()).sum()),
                        ("x", ((dx - dy @ w).double() * x.double()).sum())):
        assert abs(value.item() - inner) <= 1e-4 * abs(inner), name


# ------------------------------------------------------------------------------------------------------------
# Saved for backward: x and the M x R intermediate, never a mask or a dropped copy of x
# ------------------------------------------------------------------------------------------------------------

def _saved_violations(fn, inputs: dict, M: int, R: int) -> list[str]:
    """Tensors saved for backward that are neither an input's storage, the (M, R) float32 T, nor tiny."""
    storages = {t.untyped_storage().data_ptr() for t in inputs.values() if isinstance(t, torch.Tensor)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(**inputs)
    bad = []
    for t in saved:
        if t.untyped_storage().data_ptr() in storages and t.numel() > 0:
            continue  # the input itself (x, or a parameter), not a copy
        if tuple(t.shape) == (M, R) and t.dtype == torch.float32:
            continue  # T = drop(x) Aᵀ
        if t.numel() <= R:
            continue  # scale, seed
        bad.append(f"{tuple(t.shape)} {t.dtype}")
    y.sum().backward()  # the saved tensors suffice
    return bad


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_are_x_and_t(backend, dropout_p):
    """No mask and no dropped x is saved: at most x, the M×R T, parameters and the seed/scale."""
    inputs = Case(37, 29, 41, 3, bias=True, dropout_p=dropout_p).make(torch.float32)
    with use_backend(backend):
        assert _saved_violations(fp.ops.lora_linear, inputs, 37, 3) == []
    assert inputs["lora_a"].grad is not None and torch.isfinite(inputs["lora_a"].grad).all()


def test_saved_tensor_check_catches_a_saved_mask():
    """The check above fails for autograd through the formula, which keeps the mask and drop(x)."""
    inputs = Case(37, 29, 41, 3, bias=True, dropout_p=0.3).make(torch.float32)

    def formula(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out):
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, seed, dropout_p, fan_in_fan_out)

    assert _saved_violations(formula, inputs, 37, 3)
