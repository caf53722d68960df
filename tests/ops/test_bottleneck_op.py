"""`fp.ops.bottleneck_adapter`: its Triton path (interpreter on CPU) against the float64 reference, forward and
every gradient, each dtype and kernel activation, odd shapes, outputs poisoned; the PyTorch op body under
torch.compile; the reference fallback for layer norms and gating; and input checks."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fastpeft as fp
from fastpeft.ops.bottleneck import KERNEL_ACTIVATIONS
from fastpeft.reference import bottleneck as reference
from tests.harness import check_op, rel_err

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)


def _make(M, d, m, *, act="relu", scaling=0.7, bias=True, x_shape=None):
    def make(dtype):
        g = torch.Generator().manual_seed(M * 17 + d + m)

        def rnd(*shape, std=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(DEVICE)

        t = dict(x=rnd(*(x_shape or (M, d))).to(dtype), residual=rnd(*(x_shape or (M, d))).to(dtype),
                 w_down=rnd(m, d, std=d ** -0.5).to(dtype), b_down=rnd(m).to(dtype) if bias else None,
                 w_up=rnd(d, m, std=m ** -0.5).to(dtype), b_up=rnd(d).to(dtype) if bias else None)
        t = {k: v.requires_grad_() if v is not None else None for k, v in t.items()}
        return {**t, "non_linearity": act, "scaling": scaling}
    return make


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "swish", "tanh", "linear"])
def test_triton_matches_reference_per_activation(act, dtype):
    errors = check_op(fp.ops.bottleneck_adapter, _make(37, 24, 5, act=act), dtype)
    assert set(errors) == {"output", "dx", "dresidual", "dw_down", "db_down", "dw_up", "db_up"}


@needs_triton
@pytest.mark.parametrize("M, d, m, kw", [
    (1, 16, 1, {}), (70, 40, 3, {"bias": False}), (300, 24, 70, {"scaling": 4.0}),
    (10, 19, 4, {"x_shape": (2, 5, 19)}),
], ids=["m1_r1", "no_bias", "many_rows_wide_bottleneck", "x3d"])
def test_triton_odd_shapes(M, d, m, kw):
    errors = check_op(fp.ops.bottleneck_adapter, _make(M, d, m, **kw), torch.float32)
    assert "dx" in errors and "dw_up" in errors


def test_layer_norms_and_gating_run_the_reference():
    t = _make(6, 8, 2)(torch.float32)
    x, r = t.pop("x").reshape(2, 3, 8), t.pop("residual").reshape(2, 3, 8)
    opts = dict(ln_before=(torch.rand(8) + 0.5, torch.randn(8)), ln_after=(torch.rand(8) + 0.5, torch.randn(8)),
                gate=(torch.randn(1, 8), torch.randn(1)), adapter_residual_before_ln=True)
    y = fp.ops.bottleneck_adapter(x, r, **t, **opts)
    assert torch.equal(y, reference.bottleneck_adapter(x, r, **t, **opts))
    assert not torch.allclose(y, fp.ops.bottleneck_adapter(x, r, **t))  # the options do change the result


def test_compiled_op_body_matches_eager():
    t = _make(9, 12, 3, act="gelu")(torch.float32)
    fn = torch.compile(fp.ops.bottleneck_adapter, fullgraph=True, backend="aot_eager")
    y = fn(**t)
    grads = torch.autograd.grad(y.sum(), [t["x"], t["w_down"], t["w_up"]])
    t2 = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    y2 = reference.bottleneck_adapter(**t2)
    grads2 = torch.autograd.grad(y2.sum(), [t2["x"], t2["w_down"], t2["w_up"]])
    assert rel_err(y, y2) < 1e-6
    for a, b in zip(grads, grads2):
        assert rel_err(a, b) < 1e-5


def test_every_kernel_activation_is_a_reference_activation():
    for name in KERNEL_ACTIVATIONS:
        reference.activation(name)


@pytest.mark.parametrize("change, match", [
    (dict(residual=torch.randn(4, 7)), "residual has shape"),
    (dict(w_up=torch.randn(8, 3)), "must be"),
    (dict(b_down=torch.randn(3)), "b_down has shape"),
    (dict(non_linearity="softsign"), "non_linearity"),
])
def test_bad_input(change, match):
    t = dict(x=torch.randn(4, 8), residual=torch.randn(4, 8), w_down=torch.randn(2, 8), b_down=torch.randn(2),
             w_up=torch.randn(8, 2), b_up=torch.randn(8))
    t.update(change)
    with pytest.raises(ValueError, match=match):
        fp.ops.bottleneck_adapter(**t)
