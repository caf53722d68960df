"""Invertible adapters on their own: AdapterHub's parameter names and shapes, exact inverses for every
non-linearity, NICE against a float64 formula, GLOW's log-determinant against autograd, gradients, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fastpeft.errors import ConfigError
from fastpeft.modules.invertible import GLOWCoupling, NICECoupling, make_invertible, subnet

NON_LINEARITIES = ["relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "swish", "silu", "tanh", "sigmoid",
                   "leakyrelu", "leaky_relu", "linear", "ReLU"]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub" / "llama"


def _randomize(block: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Overwrite every parameter with randn * scale (0.5: far from the near-identity init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return block


def _shapes(block: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in block.state_dict().items()}


def test_nice_state_dict_matches_adapterhub():
    assert _shapes(make_invertible("nice", 32, "relu", 2)) == {
        "F.0.weight": (8, 16), "F.0.bias": (8,), "F.2.weight": (16, 8), "F.2.bias": (16,),
        "G.0.weight": (8, 16), "G.0.bias": (8,), "G.2.weight": (16, 8), "G.2.bias": (16,)}
    # odd dim: d1 = 16, d2 = 17; F = subnet(d2, d1), G = subnet(d1, d2)
    assert _shapes(NICECoupling(33, reduction_factor=4)) == {
        "F.0.weight": (4, 17), "F.0.bias": (4,), "F.2.weight": (16, 4), "F.2.bias": (16,),
        "G.0.weight": (4, 16), "G.0.bias": (4,), "G.2.weight": (17, 4), "G.2.bias": (17,)}


def test_glow_state_dict_matches_adapterhub():
    # s1 = subnet(d1, 2 * d2), s2 = subnet(d2, 2 * d1)
    assert _shapes(make_invertible("glow", 32, "relu", 2)) == {
        "s1.0.weight": (8, 16), "s1.0.bias": (8,), "s1.2.weight": (32, 8), "s1.2.bias": (32,),
        "s2.0.weight": (8, 16), "s2.0.bias": (8,), "s2.2.weight": (32, 8), "s2.2.bias": (32,)}
    assert _shapes(GLOWCoupling(33, reduction_factor=2)) == {
        "s1.0.weight": (8, 16), "s1.0.bias": (8,), "s1.2.weight": (34, 8), "s1.2.bias": (34,),
        "s2.0.weight": (8, 17), "s2.0.bias": (8,), "s2.2.weight": (32, 8), "s2.2.bias": (32,)}


def test_subnet_layout_and_no_activation_parameters():
    net = subnet(16, 5, "gelu", 2)
    assert isinstance(net[0], nn.Linear) and isinstance(net[2], nn.Linear) and len(net) == 3
    assert (net[0].in_features, net[0].out_features, net[2].out_features) == (16, 8, 5)
    assert list(net[1].parameters()) == []
    assert subnet(16, 5, "relu", 3)[0].out_features == 5  # int(16 // 3)


@pytest.mark.skipif(not (FIXTURES / "seq_bn_inv").is_dir(), reason="AdapterHub fixtures not present")
def test_adapterhub_nice_checkpoint_loads_strictly():
    sd = torch.load(FIXTURES / "seq_bn_inv" / "adapter" / "pytorch_adapter.bin", weights_only=True)
    prefix = "model.invertible_adapters.fixture."
    inv = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    assert inv
    block = make_invertible("nice", 32, "relu", 2)
    block.load_state_dict(inv, strict=True)


def test_init_is_adapterhub_bert_init():
    torch.manual_seed(0)
    for kind in ("nice", "glow"):
        block = make_invertible(kind, 256, "relu", 2)
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 4
        weights = torch.cat([m.weight.flatten() for m in linears])
        assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
        assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002


@pytest.mark.parametrize("non_linearity", NON_LINEARITIES)
@pytest.mark.parametrize("cls", [NICECoupling, GLOWCoupling])
@pytest.mark.parametrize("shape", [(2, 5, 32), (3, 33)])
def test_exact_inverse(cls, non_linearity, shape):
    block = _randomize(cls(shape[-1], non_linearity, 2), seed=len(non_linearity)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        assert y.shape == x.shape
        assert (y - x).abs().max() > 0.1  # far from identity
        # 1e-12 per unit of the largest value carried (GLOW with a linear subnet reaches |y| ~ 200 here)
        tol = 1e-12 * max(1.0, y.abs().max().item())
        torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=tol)
        torch.testing.assert_close(block(block.inverse(x)), x, rtol=0, atol=tol)
        # float32: at scale 0.5 GLOW's scales reach e^±3.4 and the subnets' gains compound float32 rounding to
        # ~1e-3 (float64 above shows the inverse itself is exact); at 0.25 the block is still far from identity
        block32 = _randomize(cls(shape[-1], non_linearity, 2), seed=len(non_linearity), scale=0.25).float()
        x32 = x.float()
        assert (block32(x32) - x32).abs().max() > 0.1
        torch.testing.assert_close(block32.inverse(block32(x32)), x32, rtol=0, atol=1e-5)
        torch.testing.assert_close(block32(block32.inverse(x32)), x32, rtol=0, atol=1e-5)


def _mlp(net: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    h = torch.relu(v @ net[0].weight.t() + net[0].bias)
    return h @ net[2].weight.t() + net[2].bias


def test_nice_forward_matches_formula():
    block = _randomize(NICECoupling(33, "relu", 2)).double()
    x = torch.randn(4, 3, 33, dtype=torch.float64)
    x1, x2 = x[..., :16], x[..., 16:]
    y1 = x1 + _mlp(block.F, x2)
    y2 = x2 + _mlp(block.G, y1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.cat([y1, y2], -1), rtol=0, atol=1e-12)


def test_glow_forward_matches_formula():
    block = _randomize(GLOWCoupling(7, "relu", 1, clamp=2.0)).double()
    x = torch.randn(5, 7, dtype=torch.float64)
    x1, x2 = x[..., :3], x[..., 3:]

    def e(s):
        return torch.exp(2.0 * 0.636 * torch.atan(s / 2.0))

    r_a = _mlp(block.s2, x2)
    y1 = e(r_a[..., :3]) * x1 + r_a[..., 3:]
    r_b = _mlp(block.s1, y1)
    y2 = e(r_b[..., :4]) * x2 + r_b[..., 4:]
    log_det = (torch.log(e(r_a[..., :3])).sum(-1) + torch.log(e(r_b[..., :4])).sum(-1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.cat([y1, y2], -1), rtol=0, atol=1e-12)
        torch.testing.assert_close(block.last_log_det, log_det, rtol=0, atol=1e-12)


@pytest.mark.parametrize("non_linearity", ["relu", "tanh", "gelu"])
def test_glow_log_det_matches_jacobian(non_linearity):
    block = _randomize(GLOWCoupling(6, non_linearity, 1, clamp=1.5), seed=3).double()
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    jac = torch.autograd.functional.jacobian(block, x)
    _, logabsdet = torch.linalg.slogdet(jac)
    block(x)
    assert block.last_log_det.shape == ()
    torch.testing.assert_close(block.last_log_det, logabsdet, rtol=0, atol=1e-10)
    assert abs(logabsdet.item()) > 0.1  # the scale does something
    y = block(x)
    block.inverse(y)
    torch.testing.assert_close(block.last_log_det, -logabsdet, rtol=0, atol=1e-10)
    # leading dims are kept
    block(torch.randn(2, 3, 6, dtype=torch.float64))
    assert block.last_log_det.shape == (2, 3)


def test_nice_is_volume_preserving():
    block = _randomize(NICECoupling(6, "tanh", 1)).double()
    jac = torch.autograd.functional.jacobian(block, torch.randn(6, dtype=torch.float64))
    assert abs(torch.linalg.det(jac).item() - 1.0) < 1e-10


def test_glow_clamp_bounds_the_scale():
    block = GLOWCoupling(4, "linear", 1, clamp=1.0)
    log_e = block.log_e(torch.tensor([-1e9, 0.0, 1e9]))
    assert log_e[1] == 0 and abs(log_e[0]) <= 0.636 * math.pi / 2 + 1e-6 and abs(log_e[2]) < 1.0


@pytest.mark.parametrize("kind", ["nice", "glow"])
@pytest.mark.parametrize("rev", [False, True])
def test_gradients_reach_every_parameter(kind, rev):
    block = _randomize(make_invertible(kind, 10, "gelu", 2))
    block.float()
    x = torch.randn(2, 3, 10, requires_grad=True)
    out = block(x, rev=rev)
    loss = out.sum() + (block.last_log_det.sum() if kind == "glow" else 0)
    loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None


def test_errors():
    with pytest.raises(ConfigError, match="non_linearity.*relu"):
        NICECoupling(32, "softplus_x")
    with pytest.raises(ConfigError, match="non_linearity"):
        make_invertible("glow", 32, "nope", 2)
    with pytest.raises(ConfigError, match="inv_adapter.*nice.*glow"):
        make_invertible("realnvp", 32, "relu", 2)
    with pytest.raises(ConfigError, match="inv_adapter_reduction_factor"):
        NICECoupling(8, "relu", 5)  # 4 // 5 == 0
    with pytest.raises(ConfigError, match="inv_adapter_reduction_factor"):
        make_invertible("glow", 32, "relu", 32)
    with pytest.raises(ConfigError, match="inv_adapter_reduction_factor"):
        subnet(16, 4, "relu", 0)
    with pytest.raises(ConfigError):
        NICECoupling(1, "relu", 1)
    with pytest.raises(ConfigError, match="clamp"):
        GLOWCoupling(8, clamp=0.0)
    assert isinstance(ConfigError("x"), ValueError)
