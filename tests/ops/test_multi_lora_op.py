"""fp.ops.multi_lora_linear: the reference against a per-token float64 loop, and the Triton kernels (interpreter on
CPU) against the float64 reference, forward and backward: mixed ranks (1 to 33), odd sizes, duplicate adapters,
tokens without an adapter, empty slots, float32 adapters on half inputs, the decode and the segment kernels, row
chunks of the weight-gradient reduction; host validation."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import LoRABank, Routing, multi_lora_linear
from tests.harness import DEVICE, check_op, needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RANKS = (1, 7, 16, 33)


def _adapters(K, N, ranks, dtype, grad):
    a = [(torch.randn(r, K, device=DEVICE) / K ** 0.5).to(dtype).requires_grad_(grad) for r in ranks]
    b = [(torch.randn(N, r, device=DEVICE) / r ** 0.5).to(dtype).requires_grad_(grad) for r in ranks]
    return a, b


def _make(M, K, N, slots, *, ranks=RANKS, bias=True, grad=True, adapter_dtype=None, empty=()):
    """Inputs for check_op: x (M, K), W, b, every slot's A and B as their own entries, the index per token."""
    def make(dtype):
        a, b = _adapters(K, N, ranks, adapter_dtype or dtype, grad)
        inputs = {"x": torch.randn(M, K, device=DEVICE, dtype=dtype).requires_grad_(grad),
                  "weight": (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype),
                  "bias": torch.randn(N, device=DEVICE, dtype=dtype).requires_grad_(grad) if bias else None,
                  "index": torch.tensor(slots, dtype=torch.int32)}
        for i in range(len(ranks)):
            if i not in empty:  # an adapter no token uses gets no gradient: not a leaf of the check
                used = i in slots
                inputs[f"a{i}"] = a[i].requires_grad_(grad and used)
                inputs[f"b{i}"] = b[i].requires_grad_(grad and used)
        return inputs
    return make


def _fn(n_slots):
    scales = [0.5 + i for i in range(n_slots)]

    def fn(x, weight, bias, index, **ab):
        a = [ab.get(f"a{i}") for i in range(n_slots)]
        b = [ab.get(f"b{i}") for i in range(n_slots)]
        return multi_lora_linear(x, weight, bias, a, b, [s if a_ is not None else None for s, a_ in zip(scales, a)],
                                 index.to(x.device))
    return fn


def _slots(M, n_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n_slots, (M,), generator=g).tolist()


# --------------------------------------------------------------------------------------------- reference

def test_reference_matches_a_per_token_loop():
    M, K, N = 23, 12, 10
    inputs = _make(M, K, N, _slots(M, 4), grad=False)(torch.float64)
    y = _fn(4)(**inputs)
    scales = [0.5, 1.5, 2.5, 3.5]
    for m in range(M):
        expect = inputs["x"][m] @ inputs["weight"].t() + inputs["bias"]
        s = int(inputs["index"][m])
        if s >= 0:
            expect = expect + scales[s] * (inputs["x"][m] @ inputs[f"a{s}"].t()) @ inputs[f"b{s}"].t()
        torch.testing.assert_close(y[m], expect, rtol=1e-12, atol=1e-12)


def test_reference_gradients_reach_only_used_adapters():
    inputs = _make(9, 8, 6, [0, 0, 2, -1, 2, 0, -1, -1, 2])(torch.float64)
    _fn(4)(**inputs).sum().backward()
    assert inputs["a1"].grad is None and inputs["a3"].grad is None
    assert inputs["a0"].grad.abs().sum() > 0 and inputs["b2"].grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- kernels

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_segment_kernels_forward_and_backward(dtype):
    M, K, N = 37, 48, 40
    check_op(_fn(4), _make(M, K, N, _slots(M, 4)), dtype)


@needs_triton
def test_segment_kernels_float32_adapters_on_bf16():
    M, K, N = 29, 40, 24
    check_op(_fn(4), _make(M, K, N, _slots(M, 4, seed=3), adapter_dtype=torch.float32), torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_decode_kernel(dtype):
    """No gradient needed and few tokens: the fused shrink+expand kernel, gathered per token."""
    M, K, N = 11, 40, 72
    assert M <= fp.ops.kernel_options().decode_max_tokens
    check_op(_fn(4), _make(M, K, N, [3, -1, 0, 1, 3, 2, -1, 0, 0, 3, 1], grad=False), dtype)


@needs_triton
def test_decode_kernel_float32_adapters_and_wide_rank():
    M, K, N = 5, 24, 20
    check_op(_fn(3), _make(M, K, N, [0, 2, 1, 2, -1], ranks=(2, 130, 64), grad=False,
                           adapter_dtype=torch.float32), torch.float16)


@needs_triton
@pytest.mark.parametrize("grad", [False, True], ids=["decode", "segment+backward"])
def test_ranks_1_to_256_mixed(grad):
    M = 13
    check_op(_fn(4), _make(M, 24, 20, [3, 0, -1, 1, 2, 3, 0, 0, 1, 3, 2, -1, 3], ranks=(1, 256, 16, 100), grad=grad),
             torch.float32)


@needs_triton
def test_segment_kernels_without_gradient():
    """More tokens than the decode kernel takes: the segment kernels serve inference too."""
    M = fp.ops.kernel_options().decode_max_tokens + 9
    check_op(_fn(4), _make(M, 24, 20, _slots(M, 4, seed=5), grad=False), torch.float32)


@needs_triton
def test_empty_slots_duplicates_all_one_and_none():
    M, K, N = 19, 24, 32
    check_op(_fn(4), _make(M, K, N, [1] * M, empty=(0, 3)), torch.float32)
    check_op(_fn(4), _make(M, K, N, [-1] * M, empty=(0, 3)), torch.float32)
    # slots 0 and 3 are empty on this layer: their tokens get the base layer alone
    check_op(_fn(4), _make(M, K, N, _slots(M, 4, seed=7), empty=(0, 3)), torch.float32)


@needs_triton
def test_long_segment_spans_reduce_chunks(monkeypatch):
    from fastpeft.kernels import multi_lora as kern

    monkeypatch.setattr(kern, "REDUCE_ROWS", 16)  # so that tiny segments cover several chunks
    M = 45
    check_op(_fn(2), _make(M, 24, 16, [0] * 30 + [1] * 10 + [-1] * 5, ranks=(5, 17), bias=False), torch.float32)


@needs_triton
def test_adapter_input_and_per_row_index():
    """A separate adapter input h (what dropout gives) and a 3-D x with one index per row."""
    B, L, K, N = 3, 5, 24, 16
    a, b = _adapters(K, N, (4, 9), torch.float32, True)

    def fn(x, h, weight, a0, b0, a1, b1):
        return multi_lora_linear(x, weight, None, [a0, a1], [b0, b1], 2.0, torch.tensor([1, -1, 0]),
                                 adapter_input=h)

    def make(dtype):
        return {"x": torch.randn(B, L, K, dtype=dtype, requires_grad=True),
                "h": torch.randn(B, L, K, dtype=dtype, requires_grad=True),
                "weight": torch.randn(N, K, dtype=dtype) / K ** 0.5,
                "a0": a[0].to(dtype).detach().requires_grad_(), "b0": b[0].to(dtype).detach().requires_grad_(),
                "a1": a[1].to(dtype).detach().requires_grad_(), "b1": b[1].to(dtype).detach().requires_grad_()}
    check_op(fn, make, torch.float32)


@needs_triton
def test_conv1d_weight_layout():
    M, K, N = 21, 24, 40
    base = _make(M, K, N, _slots(M, 4, seed=2))

    def make(dtype):
        inputs = base(dtype)
        inputs["weight"] = inputs["weight"].t().contiguous()
        return inputs

    def fn(x, weight, bias, index, **ab):
        a = [ab[f"a{i}"] for i in range(4)]
        b = [ab[f"b{i}"] for i in range(4)]
        return multi_lora_linear(x, weight, bias, a, b, 1.5, index, fan_in_fan_out=True)
    check_op(fn, make, torch.float32)


# --------------------------------------------------------------------------------------------- validation

def test_host_validation():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = [torch.randn(2, 8)], [torch.randn(6, 2)]
    with pytest.raises(ValueError, match="out of range"):
        multi_lora_linear(x, w, None, a, b, 1.0, torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="out of range"):
        multi_lora_linear(x, w, None, a, b, 1.0, torch.tensor([0, -2, 0, 0]))
    with pytest.raises(ValueError, match="one per token"):
        multi_lora_linear(x, w, None, a, b, 1.0, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        multi_lora_linear(x, w, None, a, b, 1.0, torch.tensor([0.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="expected \\(r, in_features\\)"):
        multi_lora_linear(x, w, None, [torch.randn(2, 8)], [torch.randn(6, 3)], 1.0, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="the base weight 8 -> 6"):
        multi_lora_linear(x, w, None, [torch.randn(2, 7)], [torch.randn(6, 2)], 1.0, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="one adapter dtype"):
        LoRABank([torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64)],
                 [torch.randn(6, 2), torch.randn(6, 2, dtype=torch.float64)], 1.0)
    with pytest.raises(ValueError, match="same slots"):
        LoRABank(a, b, [1.0, 2.0])
    with pytest.raises(ValueError, match="no scale"):
        LoRABank(a, b, [None])
    routing = Routing.build([0, 0, 0], 1, "cpu")
    with pytest.raises(ValueError, match="covers 3 tokens"):
        multi_lora_linear(x, w, None, a, b, 1.0, routing)


def test_routing_groups_tokens_by_slot():
    routing = Routing.build([2, -1, 0, 2], 3, "cpu", tokens_per_slot=2)
    assert routing.token_slot.tolist() == [2, 2, -1, -1, 0, 0, 2, 2]
    assert routing.seg_slot_host == (0, 2) and routing.seg_start_host == (0, 2, 6)
    assert routing.order.tolist() == [4, 5, 0, 1, 6, 7]
    assert routing.max_segment == 4


def test_is_public():
    assert fp.ops.multi_lora_linear is multi_lora_linear
