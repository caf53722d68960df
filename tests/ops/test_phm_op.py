"""`fp.ops.phm_linear` and its oracle: y = x (Σ_i A_i ⊗ W_i) + b, dense or factorized W_i = L_i R_i.

Tier 1: the reference's weight against torch.kron. Then the op (which never forms the in x out weight) against
the reference in float64, forward and every gradient, in each dtype, on odd sizes; that nothing of size in x out
is saved for the backward; and its input checks.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.reference import phm as reference
from tests.harness import TOLERANCE, rel_err

SHAPES = [(2, 3, 5, None), (4, 8, 6, 1), (3, 3, 4, 2), (1, 7, 5, None)]  # n, in/n, out/n, phm_rank (None: dense)


def _inputs(n, p, q, k, dtype=torch.float64, x_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = dict(x=rnd(*(x_shape or (9, n * p))).to(dtype), rule=rnd(n, n, n), w=rnd(n, p, q if k is None else k),
             bias=rnd(n * q).to(dtype), w_right=None if k is None else rnd(n, k, q))
    return {key: v.requires_grad_() if v is not None else None for key, v in t.items()}


@pytest.mark.parametrize("n, p, q, k", SHAPES)
def test_reference_weight_is_the_kronecker_sum(n, p, q, k):
    t = _inputs(n, p, q, k)
    blocks = t["w"] if k is None else t["w"] @ t["w_right"]
    want = sum(torch.kron(t["rule"][i], blocks[i]) for i in range(n))
    assert torch.allclose(reference.phm_weight(t["rule"], t["w"], t["w_right"]), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, p, q, k", SHAPES)
def test_op_matches_reference_forward_and_backward(n, p, q, k, dtype):
    t = _inputs(n, p, q, k, dtype, x_shape=(2, 5, n * p))
    y = fp.ops.phm_linear(t["x"], t["rule"], t["w"], t["bias"], w_right=t["w_right"])
    assert y.shape == (2, 5, n * q) and y.dtype == dtype
    leaves = [v for v in t.values() if v is not None]
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    t64 = {key: v.detach().double().requires_grad_() if v is not None else None for key, v in t.items()}
    y64 = reference.phm_linear(t64["x"], t64["rule"], t64["w"], t64["bias"], t64["w_right"])
    grads64 = torch.autograd.grad(y64, [v for v in t64.values() if v is not None], dy)
    tol = TOLERANCE[dtype] * (3 if dtype == torch.bfloat16 else 1)
    assert rel_err(y, y64) < tol
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < tol


def test_nothing_of_size_in_by_out_is_saved():
    """Factorized weights: the backward keeps only O(M n k) and small parameter-sized tensors."""
    n, p, q, k, m = 4, 64, 128, 2, 3
    t = _inputs(n, p, q, k, torch.float32, x_shape=(m, n * p))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: sizes.append(s.numel()) or s, lambda s: s):
        y = fp.ops.phm_linear(t["x"], t["rule"], t["w"], t["bias"], w_right=t["w_right"])
    assert sizes and max(sizes) < (n * p) * (n * q) // 8, sizes
    y.sum().backward()


@pytest.mark.parametrize("change, match", [
    (dict(rule=torch.randn(2, 3, 3)), "rule must be"),
    (dict(w=torch.randn(3, 4, 5)), "w must be"),
    (dict(x=torch.randn(4, 7)), "must divide the input size"),
    (dict(bias=torch.randn(7)), "bias has shape"),
    (dict(w_right=torch.randn(2, 3, 5)), "w_right must be"),
])
def test_bad_input(change, match):
    t = dict(x=torch.randn(4, 8), rule=torch.randn(2, 2, 2), w=torch.randn(2, 4, 2), bias=torch.randn(10),
             w_right=torch.randn(2, 2, 5))
    t.update(change)
    with pytest.raises(ValueError, match=match):
        fp.ops.phm_linear(t["x"], t["rule"], t["w"], t["bias"], w_right=t["w_right"])
