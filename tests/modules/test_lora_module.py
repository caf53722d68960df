"""`LoRALinear` on its own: the base layer kept intact, the forward formula, dropout, merge/unmerge, gradients.

The oracle is the LoRA formula written out in float64,
    y = x Wᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ,
with adapters given non-zero B (init_weights=False) so that the adapter term is really there.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastpeft.modules import LoRALinear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5


def _linear(in_f=16, out_f=12, bias=True, dtype=torch.float32):
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _conv1d(in_f=16, out_f=12):
    layer = Conv1D(out_f, in_f)  # Conv1D(nf=out, nx=in): weight stored (in, out)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whatever its storage layout."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def _formula(x, base: nn.Module, lora: LoRALinear, names) -> torch.Tensor:
    """y = x Wᵀ + b + Σ s·(x Aᵀ) Bᵀ in float64."""
    x = x.double()
    y = x @ _weight_out_in(base).double().t()
    if base.bias is not None:
        y = y + base.bias.double()
    for n in names:
        y = y + lora.scaling[n] * (x @ lora.lora_A[n].double().t()) @ lora.lora_B[n].double().t()
    return y


def _lora(base, *adapters, active=None):
    """LoRALinear around `base` with adapters given as (name, r, alpha[, kwargs]); all active unless told."""
    layer = LoRALinear(base)
    for name, r, alpha, *kw in adapters:
        layer.add_adapter(name, r, alpha, **({"init_weights": False} | (kw[0] if kw else {})))
    layer.active_adapters = list(active if active is not None else layer.adapter_names)
    return layer


# ------------------------------------------------------------------------------------------------ base layer
@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_base_layer_is_the_original_module_untouched(make_base):
    base = make_base()
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    ptr = base.weight.data_ptr()
    layer = _lora(base, ("a", 4, 8))
    assert layer.base_layer is base
    assert layer.weight is base.weight and layer.bias is base.bias
    assert base.weight.data_ptr() == ptr
    assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)
    assert layer.lora_A["a"].shape == (4, 16) and layer.lora_B["a"].shape == (12, 4)
    assert (layer.in_features, layer.out_features) == (16, 12)
    layer(torch.randn(3, 16))
    assert torch.equal(base.weight, weight) and base.weight.data_ptr() == ptr


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_forward_matches_formula_one_adapter(make_base, shape):
    base = make_base()
    layer = _lora(base, ("a", 4, 8)).eval()
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 12)
    assert layer.scaling["a"] == 2.0
    want = _formula(x, base, layer, ["a"])
    torch.testing.assert_close(y.double(), want, atol=ATOL, rtol=RTOL)
    # and the adapter term is really there
    assert (y.double() - _formula(x, base, layer, [])).abs().max() > 1e-2


@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_forward_several_active_adapters_sum(make_base):
    base = make_base()
    layer = _lora(base, ("a", 2, 4), ("b", 5, 3), ("c", 1, 7)).eval()
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["a", "b", "c"]), atol=ATOL, rtol=RTOL)
    layer.active_adapters = ["b"]
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["b"]), atol=ATOL, rtol=RTOL)
    layer.active_adapters = ["c", "a"]
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["a", "c"]), atol=ATOL, rtol=RTOL)
    # the sum of single-adapter deltas is the joint delta
    base_y = _formula(x, base, layer, [])
    deltas = sum(_formula(x, base, layer, [n]) - base_y for n in ("a", "b", "c"))
    layer.active_adapters = ["a", "b", "c"]
    torch.testing.assert_close(layer(x).double() - base_y, deltas, atol=ATOL, rtol=RTOL)


def test_rslora_scaling():
    base = _linear()
    layer = _lora(base, ("a", 4, 8, {"use_rslora": True}), ("b", 9, 6, {"use_rslora": True})).eval()
    assert layer.scaling["a"] == pytest.approx(8 / math.sqrt(4))
    assert layer.scaling["b"] == pytest.approx(6 / 3)
    x = torch.randn(7, 16)
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["a", "b"]), atol=ATOL, rtol=RTOL)
    plain = _lora(_linear(), ("a", 4, 8))
    assert plain.scaling["a"] == 2.0


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_odd_shapes(make_base, r):
    base = make_base(13, 7)
    layer = _lora(base, ("a", r, 5)).eval()
    assert layer.lora_A["a"].shape == (r, 13) and layer.lora_B["a"].shape == (7, r)
    for shape in [(1, 13), (11, 13), (3, 5, 13)]:
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 7)
        torch.testing.assert_close(y.double(), _formula(x, base, layer, ["a"]), atol=ATOL, rtol=RTOL)


def test_no_bias_base():
    base = _linear(bias=False)
    layer = _lora(base, ("a", 3, 6)).eval()
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["a"]), atol=ATOL, rtol=RTOL)


def test_disabled_inactive_and_default_init_give_base_output():
    base = _linear()
    layer = _lora(base, ("a", 4, 8)).eval()
    x = torch.randn(6, 16)
    assert not torch.allclose(layer(x), base(x), atol=1e-3)
    layer.disabled = True
    assert torch.equal(layer(x), base(x))
    layer.disabled = False
    layer.active_adapters = []
    assert torch.equal(layer(x), base(x))
    fresh = LoRALinear(base)
    fresh.add_adapter("z", 4, 8)  # default init: B = 0
    fresh.active_adapters = ["z"]
    assert torch.count_nonzero(fresh.lora_B["z"]) == 0 and torch.count_nonzero(fresh.lora_A["z"]) > 0
    torch.testing.assert_close(fresh(x), base(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ Conv1D layout
def test_conv1d_uses_weight_in_place_and_merge_restores():
    base = _conv1d(13, 7)
    assert base.weight.shape == (13, 7)
    layer = _lora(base, ("a", 3, 6)).eval()
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (13, 7)
    weight = base.weight.detach().clone()
    ptr = base.weight.data_ptr()
    x = torch.randn(2, 5, 13)
    y = layer(x)
    torch.testing.assert_close(y.double(), _formula(x, base, layer, ["a"]), atol=ATOL, rtol=RTOL)
    assert base.weight.data_ptr() == ptr and base.weight.shape == (13, 7)
    layer.merge("a")
    assert base.weight.data_ptr() == ptr and base.weight.shape == (13, 7)
    delta = layer.scaling["a"] * (layer.lora_B["a"] @ layer.lora_A["a"]).t()  # (in, out)
    torch.testing.assert_close(base.weight.detach(), weight + delta, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert base.weight.data_ptr() == ptr
    assert torch.equal(base.weight, weight)


# ------------------------------------------------------------------------------------------------ dropout
def test_dropout_train_is_random_eval_is_deterministic():
    base = _linear()
    layer = _lora(base, ("a", 4, 8, {"dropout": 0.5}))
    x = torch.randn(8, 16)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    assert not torch.allclose(y1, e1)
    torch.testing.assert_close(e1.double(), _formula(x, base, layer, ["a"]), atol=ATOL, rtol=RTOL)


def test_dropout_zero_train_equals_eval():
    layer = _lora(_linear(), ("a", 4, 8, {"dropout": 0.0}), ("b", 2, 2, {"dropout": 0.0}))
    x = torch.randn(8, 16)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_train, y_eval, atol=1e-6, rtol=0)


def test_dropout_adapter_with_plain_adapter():
    """A dropout-free adapter and one with dropout: the plain one's share is deterministic."""
    base = _linear()
    layer = _lora(base, ("plain", 3, 3), ("noisy", 4, 8, {"dropout": 0.3})).train()
    x = torch.randn(8, 16)
    y1, y2 = layer(x), layer(x)
    assert torch.isfinite(y1).all() and not torch.allclose(y1, y2)
    layer.active_adapters = ["plain"]
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["plain"]), atol=ATOL, rtol=RTOL)


def test_two_dropout_adapters_finite_and_grads_flow_to_both():
    base = _linear()
    base.requires_grad_(False)
    layer = _lora(base, ("a", 4, 8, {"dropout": 0.2}), ("b", 2, 4, {"dropout": 0.4})).train()
    x = torch.randn(2, 6, 16)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, layer(x))
    y.square().sum().backward()
    for n in ("a", "b"):
        for table in (layer.lora_A, layer.lora_B):
            g = table[n].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert base.weight.grad is None and base.bias.grad is None
    # eval: both adapters, deterministically, by the formula
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _formula(x, base, layer, ["a", "b"]), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_merge_matches_unmerged_output_fp32(make_base):
    base = make_base()
    layer = _lora(base, ("a", 4, 8)).eval()
    x = torch.randn(5, 16)
    y = layer(x)
    weight = base.weight.detach().clone()
    layer.merge("a")
    assert layer.merged_adapters == ["a"]
    assert not torch.equal(base.weight, weight)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)  # merged adapters are not applied twice
    layer.disabled = True  # merged weights are what the base layer now computes
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.disabled = False
    layer.unmerge()
    assert layer.merged_adapters == []
    assert torch.equal(base.weight, weight)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unmerge_restores_weight_bit_for_bit(dtype):
    base = _linear(dtype=dtype)
    layer = _lora(base, ("a", 4, 8), ("b", 3, 16))
    assert layer.lora_A["a"].dtype == torch.float32  # adapters stay wide on half-precision bases
    weight = base.weight.detach().clone()
    ptr = base.weight.data_ptr()
    layer.merge("a")
    after_a = base.weight.detach().clone()
    assert not torch.equal(after_a, weight)
    want_a = (weight.float() + layer.delta_weight("a")).to(dtype)
    assert torch.equal(after_a, want_a)
    layer.merge("b")
    assert layer.merged_adapters == ["a", "b"]
    want_ab = (weight.float() + layer.delta_weight("a") + layer.delta_weight("b")).to(dtype)
    assert torch.equal(base.weight, want_ab)  # one rounding from the original, not two
    layer.unmerge()
    assert base.weight.dtype == dtype and base.weight.data_ptr() == ptr
    assert torch.equal(base.weight, weight)
    assert layer.merged_adapters == []
    # merge / unmerge cycles do not drift
    for _ in range(3):
        layer.merge("b")
        layer.unmerge()
    assert torch.equal(base.weight, weight)


def test_merged_then_more_active_adapters():
    """A merged adapter is not added again in forward; a non-merged active one still is."""
    base = _linear()
    layer = _lora(base, ("a", 4, 8), ("b", 2, 2)).eval()
    x = torch.randn(5, 16)
    y = layer(x)
    layer.merge("a")
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_gradients_only_for_adapters_and_match_formula(make_base):
    base = make_base()
    base.requires_grad_(False)
    layer = _lora(base, ("a", 4, 8), ("b", 3, 5)).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 12)
    (layer(x) * dy).sum().backward()
    trainable = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert trainable == {"lora_A.a", "lora_B.a", "lora_A.b", "lora_B.b"}
    assert base.weight.grad is None and base.bias.grad is None

    # float64 autograd of the formula
    x64 = x.detach().double().requires_grad_(True)
    params = {f"{t}.{n}": getattr(layer, t)[n].detach().double().requires_grad_(True)
              for t in ("lora_A", "lora_B") for n in ("a", "b")}
    y64 = x64 @ _weight_out_in(base).double().t() + base.bias.double()
    for n in ("a", "b"):
        y64 = y64 + layer.scaling[n] * (x64 @ params[f"lora_A.{n}"].t()) @ params[f"lora_B.{n}"].t()
    (y64 * dy.double()).sum().backward()
    for key, p64 in params.items():
        table, n = key.split(".")
        got = getattr(layer, table)[n].grad
        assert got.abs().sum() > 0
        torch.testing.assert_close(got.double(), p64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)


def test_inactive_adapter_gets_no_gradient():
    base = _linear()
    base.requires_grad_(False)
    layer = _lora(base, ("a", 4, 8), ("b", 3, 5), active=["b"]).train()
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_A["a"].grad is None and layer.lora_B["a"].grad is None
    assert layer.lora_A["b"].grad is not None and layer.lora_B["b"].grad is not None


def test_delete_adapter_removes_everything():
    layer = _lora(_linear(), ("a", 4, 8), ("b", 3, 5))
    layer.delete_adapter("a")
    assert layer.adapter_names == ["b"] and layer.active_adapters == ["b"]
    assert "a" not in layer.r and "a" not in layer.scaling and not hasattr(layer.lora_scale, "a")
    assert {n for n, _ in layer.named_parameters()} == {"base_layer.weight", "base_layer.bias", "lora_A.b",
                                                        "lora_B.b"}
