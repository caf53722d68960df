"""`PHMLinear` / `PHMShared` on their own: AdapterHub's parameter names and shapes, forward and gradients vs a
float64 kron-sum reference for every option combination, `dense_weight()`, initialisations, seeding, errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastpeft.config import BnConfig
from fastpeft.errors import ConfigError
from fastpeft.modules.phm import PHMLinear, PHMShared


def _cfg(**kw) -> BnConfig:
    return BnConfig(phm_layer=True, **kw)


def _build(cfg: BnConfig, hidden: int, bottleneck: int):
    shared = PHMShared(cfg, hidden, bottleneck) if PHMShared.needed(cfg) else None
    return shared, PHMLinear(hidden, bottleneck, cfg, "down", shared), PHMLinear(bottleneck, hidden, cfg, "up", shared)


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---- names and shapes (AdapterHub 1.3.0 checkpoints: hidden 32) ----

def test_names_shapes_defaults():
    shared, down, up = _build(_cfg(reduction_factor=8), 32, 4)
    assert _shapes(shared) == {"phm_rule": (4, 4, 4)}
    assert _shapes(down) == {"W_left": (4, 8, 1), "W_right": (4, 1, 1), "b": (4,)}
    assert _shapes(up) == {"W_left": (4, 1, 1), "W_right": (4, 1, 8), "b": (32,)}


def test_names_shapes_custom_unshared_factorized_rule():
    cfg = _cfg(reduction_factor=4, shared_phm_rule=False, factorized_phm_rule=True, factorized_phm_W=False,
               phm_bias=False, phm_dim=2)
    shared, down, up = _build(cfg, 32, 8)
    assert shared is None and not PHMShared.needed(cfg)
    assert _shapes(down) == {"W": (2, 16, 4), "phm_rule_left": (2, 2, 1), "phm_rule_right": (2, 1, 2)}
    assert _shapes(up) == {"W": (2, 4, 16), "phm_rule_left": (2, 2, 1), "phm_rule_right": (2, 1, 2)}
    assert down.b is None and "b" not in dict(down.named_parameters())


def test_names_shapes_shared_w():
    shared, down, up = _build(_cfg(reduction_factor=8, shared_W_phm=True, phm_rank=2), 32, 4)
    assert _shapes(shared) == {"phm_rule": (4, 4, 4), "W_down_left": (4, 8, 2), "W_down_right": (4, 2, 1),
                               "W_up_left": (4, 1, 2), "W_up_right": (4, 2, 8)}
    assert _shapes(down) == {"b": (4,)} and _shapes(up) == {"b": (32,)}
    assert [n for n, _ in down.named_parameters()] == ["b"]  # the shared module is not a submodule
    assert down.shared is shared and up.shared is shared


def test_shared_unfactorized_w_and_factorized_rule():
    shared, _, _ = _build(_cfg(shared_W_phm=True, factorized_phm_W=False, factorized_phm_rule=True), 32, 8)
    assert _shapes(shared) == {"W_down": (4, 8, 2), "W_up": (4, 2, 8), "phm_rule_left": (4, 4, 1),
                               "phm_rule_right": (4, 1, 4)}
    w, w_right = shared.weights("up")
    assert w is shared.W_up and w_right is None
    assert shared.rule().shape == (4, 4, 4)


def test_shared_accessors_when_not_shared():
    shared = PHMShared(_cfg(shared_W_phm=False), 32, 8)
    assert shared.weights("down") is None and shared.rule() is not None
    shared = PHMShared(_cfg(shared_phm_rule=False, shared_W_phm=True), 32, 8)
    assert shared.rule() is None and shared.weights("down") is not None
    assert len(list(PHMShared(_cfg(shared_phm_rule=False), 32, 8).parameters())) == 0
    with pytest.raises(ConfigError, match="position"):
        shared.weights("sideways")


# ---- forward and gradients vs float64 kron reference ----

def _H(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i kron(A_i, W_i) with torch.kron, independent of the module's einsums."""
    return sum(torch.kron(rule[i], w[i]) for i in range(rule.shape[0]))


def _reference_tensors(layer: PHMLinear):
    """(rule, W, bias) built from the raw parameters with explicit matmuls, plus the leaves they come from."""
    shared, pos = layer.shared, layer.position
    src = shared if layer.shared_rule else layer
    if layer.factorized_rule:
        left, right = src.phm_rule_left, src.phm_rule_right
        rule, rule_leaves = torch.stack([left[i] @ right[i] for i in range(left.shape[0])]), [left, right]
    else:
        rule = src.phm_rule
        rule_leaves = [rule]
    if layer.shared_W:
        names = [f"W_{pos}_left", f"W_{pos}_right"] if layer.factorized_W else [f"W_{pos}"]
        w_leaves = [getattr(shared, n) for n in names]
    else:
        w_leaves = [layer.W_left, layer.W_right] if layer.factorized_W else [layer.W]
    w = torch.stack([w_leaves[0][i] @ w_leaves[1][i] for i in range(w_leaves[0].shape[0])]) \
        if layer.factorized_W else w_leaves[0]
    return rule, w, layer.b, rule_leaves + w_leaves + ([layer.b] if layer.b is not None else [])


COMBOS = list(itertools.product([True, False], repeat=5))


@pytest.mark.parametrize("shared_rule,fact_rule,shared_w,fact_w,bias", COMBOS)
def test_forward_and_grads_match_dense_float64(shared_rule, fact_rule, shared_w, fact_w, bias):
    cfg = _cfg(shared_phm_rule=shared_rule, factorized_phm_rule=fact_rule, shared_W_phm=shared_w,
               factorized_phm_W=fact_w, phm_bias=bias, phm_rank=2, phm_dim=2, reduction_factor=2)
    shared, down, up = _build(cfg, 12, 6)
    gen = torch.Generator().manual_seed(1)
    for module in (shared, down, up):
        if module is None:
            continue
        module.double()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    for layer, shape in ((down, (3, 5, 12)), (up, (1, 6)), (down, (1, 12)), (up, (2, 1, 6))):
        x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        g = torch.randn(*shape[:-1], layer.out_features, generator=gen, dtype=torch.float64)
        rule, w, b, leaves = _reference_tensors(layer)
        H = _H(rule, w)
        assert H.shape == (layer.in_features, layer.out_features)
        ref = x @ H + (b if b is not None else 0)
        y = layer(x)
        assert y.shape == ref.shape and y.dtype == torch.float64
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        inputs = [x] + leaves
        got = torch.autograd.grad((y * g).sum(), inputs)
        want = torch.autograd.grad((ref * g).sum(), inputs)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        # dense_weight: Hᵀ in nn.Linear layout, with gradients reaching the rule and the factors
        dense = layer.dense_weight()
        H = _H(*_reference_tensors(layer)[:2])  # a fresh graph (the one above was consumed)
        assert dense.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(dense, H.t(), rtol=1e-10, atol=1e-10)
        gd = torch.randn(dense.shape, generator=gen, dtype=torch.float64)
        wleaves = leaves[:-1] if b is not None else leaves
        got = torch.autograd.grad((dense * gd).sum(), wleaves)
        want = torch.autograd.grad((H.t() * gd).sum(), wleaves)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_factors_rule_shape_and_float32_forward():
    cfg = _cfg(shared_phm_rule=False, factorized_phm_rule=True, phm_c_init="uniform")
    _, down, _ = _build(cfg, 16, 8)
    rule, w, w_right, b = down.factors()
    assert rule.shape == (4, 4, 4) and w is down.W_left and w_right is down.W_right and b is down.b
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(down(x), x @ down.dense_weight().t() + down.b, rtol=1e-5, atol=1e-6)
    assert "phm_dim=4" in repr(down) and "position='down'" in repr(down)


# ---- initialisation ----

def _w_blocks(layer: PHMLinear) -> list[torch.Tensor]:
    return [layer.W_left, layer.W_right] if layer.factorized_W else [layer.W]


@pytest.mark.parametrize("factorized", [True, False])
def test_glorot_uniform_bounds(factorized):
    cfg = _cfg(hypercomplex_nonlinearity="glorot-uniform", factorized_phm_W=factorized, phm_rank=3)
    _, down, up = _build(cfg, 64, 16)
    for layer in (down, up):
        for t in _w_blocks(layer):
            rows, cols = t.shape[1:]
            bound = (6.0 / (rows + cols)) ** 0.5
            assert t.abs().max() <= bound + 1e-6
            assert t.abs().max() > 0.5 * bound  # actually uniform over the bound, not something tiny


def test_glorot_normal_std():
    _, down, _ = _build(_cfg(hypercomplex_nonlinearity="glorot-normal", factorized_phm_W=False), 256, 64)
    rows, cols = down.W.shape[1:]
    std = (2.0 / (rows + cols)) ** 0.5
    assert abs(down.W.std().item() / std - 1) < 0.15


def test_normal_w_init_std():
    cfg = _cfg(hypercomplex_nonlinearity="normal", phm_init_range=0.05, factorized_phm_W=False,
               shared_W_phm=True, reduction_factor=4)
    shared, down, _ = _build(cfg, 128, 32)
    for t in (shared.W_down, shared.W_up):
        assert abs(t.std().item() / 0.05 - 1) < 0.15 and abs(t.mean().item()) < 0.01


def test_rule_inits():
    cfg = _cfg(shared_phm_rule=False, factorized_phm_rule=False, phm_c_init="uniform", phm_dim=8)
    _, down, _ = _build(cfg, 32, 16)
    assert down.phm_rule.abs().max() <= 0.01 and down.phm_rule.abs().max() > 0.005
    shared = PHMShared(_cfg(phm_c_init="uniform", phm_dim=8), 32, 16)
    assert shared.phm_rule.abs().max() <= 1.0 and shared.phm_rule.abs().max() > 0.5
    _, down, _ = _build(_cfg(shared_phm_rule=False, phm_c_init="normal", phm_dim=8), 32, 16)
    assert abs(down.phm_rule.std().item() / 0.01 - 1) < 0.2
    shared = PHMShared(_cfg(phm_c_init="normal", phm_init_range=0.1, phm_dim=8), 32, 16)
    assert abs(shared.phm_rule.std().item() / 0.1 - 1) < 0.2
    _, down, _ = _build(_cfg(shared_phm_rule=False, factorized_phm_rule=True, phm_c_init="uniform"), 32, 16)
    for t in (down.phm_rule_left, down.phm_rule_right):
        assert t.abs().max() <= 0.01
    _, down, _ = _build(_cfg(phm_bias=True), 32, 16)
    assert torch.equal(down.b, torch.zeros(16))


@pytest.mark.parametrize("shared_rule,fact_rule", list(itertools.product([True, False], repeat=2)))
def test_learn_phm_false_freezes_rules(shared_rule, fact_rule):
    cfg = _cfg(learn_phm=False, shared_phm_rule=shared_rule, factorized_phm_rule=fact_rule)
    shared, down, _ = _build(cfg, 32, 8)
    owner = shared if shared_rule else down
    rules = [p for n, p in owner.named_parameters() if n.startswith("phm_rule")]
    assert len(rules) == (2 if fact_rule else 1)
    assert all(not p.requires_grad for p in rules)
    assert all(p.requires_grad for n, p in down.named_parameters() if not n.startswith("phm_rule"))


def test_seed_reproducible_and_global_rng_untouched():
    kw = dict(shared_phm_rule=False, factorized_phm_rule=True, shared_W_phm=False, init_weights_seed=7)
    state = torch.get_rng_state()
    _, a, _ = _build(_cfg(**kw), 32, 8)
    assert torch.equal(torch.get_rng_state(), state)
    _, b, _ = _build(_cfg(**kw), 32, 8)
    _, c, _ = _build(_cfg(**{**kw, "init_weights_seed": 8}), 32, 8)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.W_left, c.W_left)
    s1 = PHMShared(_cfg(shared_W_phm=True, init_weights_seed=3), 32, 8)
    s2 = PHMShared(_cfg(shared_W_phm=True, init_weights_seed=3), 32, 8)
    assert all(torch.equal(v, s2.state_dict()[k]) for k, v in s1.state_dict().items())


# ---- errors ----

def test_phm_dim_must_divide():
    with pytest.raises(ConfigError, match=r"phm_dim.*in_features=30"):
        PHMLinear(30, 8, _cfg(shared_phm_rule=False), "down")
    with pytest.raises(ConfigError, match=r"phm_dim.*out_features=6"):
        PHMLinear(32, 6, _cfg(shared_phm_rule=False), "down")
    with pytest.raises(ConfigError, match=r"phm_dim.*bottleneck=6"):
        PHMShared(_cfg(), 32, 6)


def test_shared_required_and_checked():
    with pytest.raises(ConfigError, match=r"shared_phm_rule.*PHMShared"):
        PHMLinear(32, 8, _cfg(), "down")
    with pytest.raises(ConfigError, match=r"shared_W_phm.*PHMShared"):
        PHMLinear(32, 8, _cfg(shared_phm_rule=False, shared_W_phm=True), "down")
    cfg = _cfg(shared_W_phm=True)
    with pytest.raises(ConfigError, match="shared_W_phm"):
        PHMLinear(32, 8, cfg, "down", PHMShared(cfg, 32, 16))
    with pytest.raises(ConfigError, match="position"):
        PHMLinear(32, 8, _cfg(shared_phm_rule=False), "middle")
