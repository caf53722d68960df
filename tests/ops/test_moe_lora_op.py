"""The expert LoRA op (fastpeft/ops/moe_lora.py) against the float64 formula in PEFT's layout."""
from __future__ import annotations

import pytest
import torch

from fastpeft.errors import BackendError, InputError
from fastpeft.ops import moe_lora, use_backend


def _formula(h, a, b, scale, sizes):
    """float64: row m of expert e gets s · h_m (B_e A_e)ᵀ with A_e = A[e·r:(e+1)·r], B_e[:, j] = B[:, j·E + e]."""
    E = len(sizes)
    r = a.shape[0] // E
    out, start = [], 0
    for e, n in enumerate(sizes):
        b_e = torch.stack([b[:, j * E + e] for j in range(r)], dim=1).double()
        delta = scale * b_e @ a[e * r:(e + 1) * r].double()
        out.append(h[start:start + n].double() @ delta.t())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("sizes, r", [([3, 0, 5, 1], 2), ([1], 1), ([0, 0, 7], 3), ([2, 2, 2, 2, 2], 1)])
def test_expert_lora_matches_float64(sizes, r):
    torch.manual_seed(0)
    E, K, N = len(sizes), 13, 9
    h = torch.randn(sum(sizes), K)
    a, b = torch.randn(r * E, K), torch.randn(N, r * E)
    out = moe_lora.expert_lora(h, a, b, 0.7, sizes)
    ref = _formula(h, a, b, 0.7, sizes)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("transposed", [False, True])
def test_delta_weight_is_the_formula(transposed):
    torch.manual_seed(1)
    E, r, K, N = 3, 2, 5, 4
    a, b = torch.randn(r * E, K), torch.randn(N, r * E)
    delta = moe_lora.expert_delta_weight(a, b, 2.0, E, transposed)
    for e in range(E):
        x = torch.eye(K)
        expected = moe_lora.expert_lora(x, a[e * r:(e + 1) * r], b[:, e::E].contiguous(), 2.0, [K])  # x (B_e A_e)ᵀ
        got = delta[e] if transposed else delta[e].t()
        assert torch.allclose(got, expected, atol=1e-5)


def test_gradients_reach_every_expert_with_rows():
    torch.manual_seed(2)
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(5, 6, requires_grad=True)
    moe_lora.expert_lora(torch.randn(4, 4), a, b, 1.0, [2, 0, 2]).sum().backward()
    assert a.grad[2:4].abs().sum() == 0 and a.grad[:2].abs().sum() > 0 and a.grad[4:].abs().sum() > 0
    assert b.grad[:, 1::3].abs().sum() == 0  # expert 1 (no rows): its columns j·E + 1


def test_bad_inputs_and_forced_kernels_are_refused():
    h, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(5, 6)
    with pytest.raises(InputError, match="group_sizes"):
        moe_lora.expert_lora(h, a, b, 1.0, [1, 1, 1])
    with pytest.raises(InputError, match=r"\(r·E, in\)"):
        moe_lora.expert_lora(h, a, b, 1.0, [4, 0, 0, 0])
    with use_backend("triton"), pytest.raises(BackendError, match="no triton kernel"):
        moe_lora.expert_lora(h, a, b, 1.0, [2, 1, 1])
