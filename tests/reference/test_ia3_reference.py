"""Tier 1: the IA3 reference (fastpeft/reference/ia3.py) against the formula written out here in float64.

    y = ((x ⊙ u) Wᵀ + b) ⊙ v

The hand-written backward (`ia3_linear_bwd`) is compared with autograd of the float64 formula.
"""
from __future__ import annotations

import pytest
import torch

from fastpeft.reference import ia3 as ref
from tests.harness import TOLERANCE, rel_err


def formula64(x, weight, bias, u, v, fan_in_fan_out=False):
    x, w = x.double(), weight.double()
    w_nk = w.t() if fan_in_fan_out else w
    h = x if u is None else x * u.double()
    y = h @ w_nk.t()
    if bias is not None:
        y = y + bias.double()
    return y if v is None else y * v.double()


def make(M, K, N, dtype, *, mode, bias=True, fan_in_fan_out=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * K**-0.5
    vec = torch.float64 if dtype == torch.float64 else torch.float32  # float32 vectors on lower precisions
    return dict(
        x=torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype),
        weight=(w.t().contiguous() if fan_in_fan_out else w).to(dtype),
        bias=torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None,
        u=(torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(vec) if mode in ("in", "both") else None,
        v=(torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(vec) if mode in ("out", "both") else None,
    )


MODES = ["in", "out", "both", "none"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, fif", [((1, 16, 8), False), ((37, 29, 41), False), ((20, 13, 30), True)])
def test_forward_matches_formula(shape, fif, mode, dtype):
    t = make(*shape, dtype, mode=mode, fan_in_fan_out=fif)
    y = ref.ia3_linear(t["x"], t["weight"], t["bias"], t["u"], t["v"], fif)
    assert y.dtype == dtype
    assert rel_err(y, formula64(**t, fan_in_fan_out=fif)) < TOLERANCE[dtype]
    y2, z = ref.ia3_linear_fwd(t["x"], t["weight"], t["bias"], t["u"], t["v"], fif, True)
    assert rel_err(y2, y) < TOLERANCE[dtype]  # addmm vs matmul + add: one rounding fewer
    if t["v"] is not None:
        assert rel_err(z, formula64(t["x"], t["weight"], t["bias"], t["u"], None, fif)) < TOLERANCE[dtype]
    else:
        assert z.numel() == 0


def test_three_d_input():
    t = make(12, 10, 6, torch.float64, mode="both")
    x = t["x"].reshape(3, 4, 10)
    y = ref.ia3_linear(x, t["weight"], t["bias"], t["u"], t["v"], False)
    assert y.shape == (3, 4, 6)
    assert rel_err(y.reshape(12, 6), formula64(**t)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["in", "out", "both"])
@pytest.mark.parametrize("fif", [False, True])
def test_backward_matches_autograd(mode, fif, dtype):
    t = make(23, 17, 11, dtype, mode=mode, fan_in_fan_out=fif, seed=3)
    leaves = {k: v.detach().double().requires_grad_() for k, v in t.items() if v is not None and k != "weight"}
    y64 = formula64(leaves["x"], t["weight"], leaves.get("bias"), leaves.get("u"), leaves.get("v"), fif)
    dy = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y64.backward(dy)
    _, z = ref.ia3_linear_fwd(t["x"], t["weight"], t["bias"], t["u"], t["v"], fif, True)
    dx, du, dv, db = ref.ia3_linear_bwd(dy.to(dtype), t["x"], t["weight"], t["u"], t["v"], z, fif,
                                        (True, t["u"] is not None, t["v"] is not None, True))
    tol = TOLERANCE[dtype] * (2 if dtype == torch.bfloat16 else 1)
    assert rel_err(dx, leaves["x"].grad) < tol
    assert rel_err(db, leaves["bias"].grad) < tol
    if t["u"] is not None:
        assert du.dtype == t["u"].dtype and rel_err(du, leaves["u"].grad) < tol
    if t["v"] is not None:
        assert dv.dtype == t["v"].dtype and rel_err(dv, leaves["v"].grad) < tol


def test_backward_computes_only_what_is_asked():
    t = make(5, 4, 3, torch.float32, mode="both")
    _, z = ref.ia3_linear_fwd(t["x"], t["weight"], t["bias"], t["u"], t["v"], False, True)
    dx, du, dv, db = ref.ia3_linear_bwd(torch.ones(5, 3), t["x"], t["weight"], t["u"], t["v"], z, False,
                                        (False, True, False, False))
    assert dx.numel() == 0 and dv.numel() == 0 and db.numel() == 0 and du.shape == (4,)
