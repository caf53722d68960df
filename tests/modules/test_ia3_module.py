"""`IA3Linear` on its own: the base layer kept intact, both scaling modes vs float64, several adapters
multiplying, merge/unmerge bit for bit, and gradients that reach only the vectors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpeft.modules import IA3Linear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _base(kind="linear", in_f=16, out_f=12, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = Conv1D(out_f, in_f)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.2)
        return layer.to(dtype)
    return nn.Linear(in_f, out_f).to(dtype)


def _w_out_in(layer):
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def _formula(x, base, vector, feedforward):
    x = x.double()
    w, b = _w_out_in(base).double(), base.bias.double()
    if feedforward:
        return (x * vector.double()) @ w.t() + b
    return (x @ w.t() + b) * vector.double()


def _ia3(base, feedforward, *names):
    layer = IA3Linear(base, is_feedforward=feedforward)
    for n in names:
        layer.add_adapter(n, init_weights=False)
    layer.active_adapters = list(names)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_forward_matches_formula(kind, feedforward):
    base = _base(kind)
    layer = _ia3(base, feedforward, "a")
    assert layer.base_layer is base
    size = 16 if feedforward else 12
    assert layer.ia3_l["a"].shape == (size,)
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == (2, 5, 12)
    torch.testing.assert_close(y.double(), _formula(x, base, layer.ia3_l["a"], feedforward), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_init_is_identity_and_disabled_is_base(feedforward):
    base = _base()
    layer = IA3Linear(base, is_feedforward=feedforward)
    layer.add_adapter("a")
    layer.active_adapters = ["a"]
    assert torch.equal(layer.ia3_l["a"], torch.ones_like(layer.ia3_l["a"]))
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), base(x))
    layer.ia3_l["a"].data.mul_(3.0)
    assert not torch.allclose(layer(x), base(x))
    layer.disabled = True
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_several_adapters_multiply(feedforward):
    base = _base()
    layer = _ia3(base, feedforward, "a", "b", "c")
    x = torch.randn(7, 16)
    product = layer.ia3_l["a"] * layer.ia3_l["b"] * layer.ia3_l["c"]
    torch.testing.assert_close(layer(x).double(), _formula(x, base, product, feedforward), atol=1e-5, rtol=1e-5)
    layer.active_adapters = ["b"]
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer.ia3_l["b"], feedforward), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_merge_then_unmerge_is_bit_exact(feedforward, kind, dtype):
    base = _base(kind, dtype=dtype)
    layer = _ia3(base, feedforward, "a", "b")
    assert layer.ia3_l["a"].dtype == torch.float32  # vectors stay wide on half-precision bases
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(6, 16, dtype=dtype)
    y = layer(x)
    layer.merge("a")
    layer.merge("b")
    assert layer.merged_adapters == ["a", "b"]
    assert not torch.equal(base.weight, weight)
    assert torch.equal(base.bias, bias) == feedforward  # only output scaling changes the bias
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x).float(), y.float(), atol=tol, rtol=tol)  # merged: not applied twice
    product = (layer.ia3_l["a"] * layer.ia3_l["b"]).float()
    along = product[:, None] if feedforward == isinstance(base, Conv1D) else product[None, :]
    assert torch.equal(base.weight, (weight.float() * along).to(dtype))  # one rounding from the original
    layer.unmerge()
    assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias) and layer.merged_adapters == []


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_gradients_reach_only_the_active_vectors(feedforward):
    base = _base()
    base.requires_grad_(False)
    layer = _ia3(base, feedforward, "a", "b")
    layer.active_adapters = ["a"]
    x = torch.randn(5, 16, requires_grad=True)
    dy = torch.randn(5, 12)
    (layer(x) * dy).sum().backward()
    assert layer.ia3_l["b"].grad is None and base.weight.grad is None
    v64 = layer.ia3_l["a"].detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    (_formula(x64, base, v64, feedforward) * dy.double()).sum().backward()
    torch.testing.assert_close(layer.ia3_l["a"].grad.double(), v64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)


def test_delete_adapter():
    layer = _ia3(_base(), False, "a", "b")
    layer.delete_adapter("a")
    assert layer.adapter_names == ["b"] and layer.active_adapters == ["b"]
    assert {n for n, _ in layer.named_parameters()} == {"base_layer.weight", "base_layer.bias", "ia3_l.b"}
