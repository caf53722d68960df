"""The expert LoRA op (fastpeft/ops/moe_lora.py) against the float64 formula in PEFT's layout: the reference, and the
Triton path (the multi-LoRA segment kernels, slot = expert; the interpreter on CPU) forward and every gradient vs
float64 with outputs poisoned: E = 3..8, ranks 1/4/16, experts without tokens, top-2 routing, a subset of rows."""
from __future__ import annotations

import pytest
import torch

from fastpeft.errors import InputError
from fastpeft.ops import moe_lora, poison_outputs, use_backend
from tests.harness import DEVICE, check_op, needs_triton


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


def test_bad_inputs_are_refused():
    h, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(5, 6)
    with pytest.raises(InputError, match="group_sizes"):
        moe_lora.expert_lora(h, a, b, 1.0, [1, 1, 1])
    with pytest.raises(InputError, match=r"\(r·E, in\)"):
        moe_lora.expert_lora(h, a, b, 1.0, [4, 0, 0, 0])
    with pytest.raises(InputError, match="out has shape"):
        moe_lora.expert_lora(h, a, b, 1.0, [2, 1, 1], out=torch.zeros(4, 6))
    with pytest.raises(InputError, match="outside"):
        moe_lora.expert_lora(h, a, b, 1.0, [1, 0, 1], rows=torch.tensor([0, 4]))
    with pytest.raises(InputError, match="rows lists"):
        moe_lora.expert_lora(h, a, b, 1.0, [2, 1, 1], rows=torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------- kernels

def _top2_sizes(tokens: int, E: int, empty: tuple[int, ...], seed: int) -> list[int]:
    """Group sizes of `tokens` tokens routed to 2 distinct experts each (top-2), never to the `empty` experts."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    picks = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:2]] for _ in range(tokens)])
    return torch.bincount(picks.flatten(), minlength=E).tolist()


def _make(sizes, r, K, N, *, adapter_dtype=None, rows=None, total=None):
    """check_op inputs: h (S, K), A (r·E, K), B (N, r·E), the base projection `base` (S, N); all with gradients."""
    E = len(sizes)
    S = total if total is not None else sum(sizes)

    def make(dtype):
        ad = adapter_dtype or dtype
        return {"h": torch.randn(S, K, device=DEVICE, dtype=dtype).requires_grad_(),
                "a": (torch.randn(r * E, K, device=DEVICE) / K ** 0.5).to(ad).requires_grad_(),
                "b": (torch.randn(N, r * E, device=DEVICE) / r ** 0.5).to(ad).requires_grad_(),
                "base": torch.randn(S, N, device=DEVICE, dtype=dtype).requires_grad_(),
                "rows": rows}
    return make


def _fn(sizes, scale=0.75):
    def fn(h, a, b, base, rows):
        out = base * 1.0  # a non-leaf the op adds into (in place on the kernel path)
        return moe_lora.expert_lora(h, a, b, scale, sizes, out=out, rows=None if rows is None else rows.to(h.device))
    return fn


CASES = [  # (E, r, tokens, experts without tokens)
    (3, 1, 7, ()),
    (5, 4, 11, (1, 3)),
    (8, 16, 13, (0, 6)),
    (4, 4, 5, (2,)),
]


@needs_triton
@pytest.mark.parametrize("E, r, tokens, empty", CASES)
def test_kernels_match_float64(E, r, tokens, empty):
    sizes = _top2_sizes(tokens, E, empty, seed=E)
    assert all(sizes[e] == 0 for e in empty)
    check_op(_fn(sizes), _make(sizes, r, 37, 21), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32)])
def test_kernels_half_precision(dtype, adapter_dtype):
    sizes = _top2_sizes(9, 6, (4,), seed=3)
    check_op(_fn(sizes), _make(sizes, 4, 40, 24, adapter_dtype=adapter_dtype), dtype)


@needs_triton
def test_kernels_on_a_subset_of_rows():
    """rows: some pairs of the batch (another adapter's pairs are the rest), listed expert by expert."""
    E, S = 4, 19
    g = torch.Generator().manual_seed(5)
    expert_of_row = torch.sort(torch.randint(0, E, (S,), generator=g)).values
    chosen = torch.nonzero(torch.rand(S, generator=g) < 0.6).flatten()
    sizes = torch.bincount(expert_of_row[chosen], minlength=E).tolist()
    check_op(_fn(sizes), _make(sizes, 4, 29, 18, rows=chosen, total=S), torch.float32)


@needs_triton
def test_kernels_without_grad_and_without_out():
    sizes = [3, 0, 4]
    h, a, b = torch.randn(7, 12, device=DEVICE), torch.randn(6, 12, device=DEVICE), torch.randn(10, 6, device=DEVICE)
    ref = _formula(h, a, b, 1.5, sizes)
    with use_backend("triton"), torch.no_grad():
        t = moe_lora.expert_lora(h, a, b, 1.5, sizes)
        base = torch.randn(7, 10, device=DEVICE)
        out = base.clone()
        same = moe_lora.expert_lora(h, a, b, 1.5, sizes, out=out)
    assert same is out  # in place
    assert ((t.double().cpu() - ref.cpu()).norm() / ref.norm()) < 1e-5
    assert ((out - base).double().cpu() - ref.cpu()).norm() / ref.norm() < 1e-5


@needs_triton
def test_kernel_gradients_of_experts_without_rows_are_zero():
    sizes = [2, 0, 3]
    a = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(5, 6, device=DEVICE, requires_grad=True)
    with use_backend("triton"), poison_outputs():
        moe_lora.expert_lora(torch.randn(5, 8, device=DEVICE), a, b, 1.0, sizes).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad[2:4].abs().sum() == 0 and b.grad[:, 1::3].abs().sum() == 0
    assert a.grad[:2].abs().sum() > 0 and b.grad[:, 0::3].abs().sum() > 0
