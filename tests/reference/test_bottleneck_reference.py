"""Tier 1: the bottleneck adapter reference against AdapterHub's block written out here step by step in float64
(the module-level composition: LayerNorm, Linear, activation, Linear, scaling, gating, residual, LayerNorm)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpeft.reference import bottleneck as ref

transformers = pytest.importorskip("transformers")
from transformers.activations import get_activation  # noqa: E402


def _block(d, m, *, ln_before, ln_after, gating, scaling, non_linearity, residual_before_ln):
    """The pieces of AdapterHub's `Adapter` as torch modules with random (non-identity) values, float64."""
    torch.manual_seed(0)
    mods = dict(down=nn.Linear(d, m), up=nn.Linear(m, d), ln_b=nn.LayerNorm(d), ln_a=nn.LayerNorm(d),
                gate=nn.Linear(d, 1))
    for mod in mods.values():
        for p in mod.parameters():
            nn.init.normal_(p, std=0.5)
    mods = {k: v.double() for k, v in mods.items()}
    act = nn.functional.leaky_relu if non_linearity == "leakyrelu" else get_activation(non_linearity)

    def module_forward(x, r):
        h = mods["ln_b"](x) if ln_before else x
        up = mods["up"](act(mods["down"](h))) * scaling
        if gating:
            up = up * torch.mean(torch.sigmoid(mods["gate"](x)), dim=1).unsqueeze(-1)
        if residual_before_ln:
            up = up + r
        if ln_after:
            up = mods["ln_a"](up)
        return up if residual_before_ln else up + r

    def pair(mod):
        return (mod.weight, mod.bias)

    kwargs = dict(non_linearity=non_linearity, scaling=scaling, ln_before=pair(mods["ln_b"]) if ln_before else None,
                  ln_after=pair(mods["ln_a"]) if ln_after else None, gate=pair(mods["gate"]) if gating else None,
                  adapter_residual_before_ln=residual_before_ln)
    return module_forward, (mods["down"].weight, mods["down"].bias, mods["up"].weight, mods["up"].bias), kwargs


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "gelu_new", "swish", "tanh", "leakyrelu"])
@pytest.mark.parametrize("ln_before, ln_after, gating, residual_before_ln", [
    (False, False, False, True), (True, False, False, False), (False, True, False, True), (True, True, True, False),
])
def test_reference_matches_the_module_composition(non_linearity, ln_before, ln_after, gating, residual_before_ln):
    d, m = 12, 5
    module_forward, weights, kwargs = _block(d, m, ln_before=ln_before, ln_after=ln_after, gating=gating,
                                             scaling=0.7, non_linearity=non_linearity,
                                             residual_before_ln=residual_before_ln)
    x = torch.randn(2, 7, d, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 7, d, dtype=torch.float64)
    got = ref.bottleneck_adapter(x, r, *weights, **kwargs)
    want = module_forward(x, r)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), [x, *weights])
    g_want = torch.autograd.grad(want.sum(), [x, *weights])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_learned_channel_scaling_broadcasts():
    d, m = 8, 2
    _, weights, kwargs = _block(d, m, ln_before=False, ln_after=False, gating=False, scaling=1.0,
                                non_linearity="relu", residual_before_ln=True)
    scale = torch.rand(d, dtype=torch.float64, requires_grad=True)
    x, r = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    y = ref.bottleneck_adapter(x, r, *weights, **{**kwargs, "scaling": scale})
    up = torch.relu(x @ weights[0].t() + weights[1]) @ weights[2].t() + weights[3]
    torch.testing.assert_close(y, up * scale + r)
    assert torch.autograd.grad(y.sum(), scale)[0].shape == (d,)


@pytest.mark.parametrize("d, factor, want", [(768, 16, 48), (32, 64, 1), (10, 3, 3), (8, float("inf"), 1)])
def test_bottleneck_size(d, factor, want):
    assert ref.bottleneck_size(d, factor) == want


def test_unknown_non_linearity():
    with pytest.raises(ValueError, match="non_linearity 'softsign'.*relu"):
        ref.activation("softsign")
