"""The CPU paths of the references against their formulas: the in-place dropout hash gives the documented keep bits
and the same dropped values as x ⊙ keep / (1 − p) bit for bit (every dtype, non-finite inputs included), a mask
kept by the caller gives the same LoRA forward and backward as one regenerated from the seed, and prefix attention
through torch's fused SDPA matches the formula in float64 (outputs and every gradient) under every mask it takes,
while the cases it cannot express keep the formula."""
from __future__ import annotations

import itertools

import pytest
import torch

import fastpeft.reference.attention as attention
from fastpeft.reference import dropout as drop
from fastpeft.reference import lora as ref
from fastpeft.reference.attention import prefix_attention, prefix_attention_formula, sdpa_applies

SEEDS = [0, 1, 77, 12345, 2**31 - 1, 2**31 + 5, 2**40 + 7, -3]


def _documented_keep(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    """keep[m, k] = mix32(k ^ mix32(m ^ mix32(seed & 0x7FFFFFFF))) >= t(p), with the out-of-place mix32."""
    seed32 = (torch.tensor(seed, dtype=torch.int64) & 0x7FFFFFFF).to(torch.int32)
    row_key = drop.mix32(torch.arange(rows, dtype=torch.int32) ^ drop.mix32(seed32))
    hashes = drop.mix32(torch.arange(cols, dtype=torch.int32)[None, :] ^ row_key[:, None])
    return hashes >= drop.keep_threshold(p)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (256, 100), (0, 4), (4, 0)], ids=str)
def test_keep_mask_is_the_documented_hash(seed, shape):
    for p in (0.0, 0.05, 0.5, 0.9):
        assert torch.equal(drop.keep_mask(torch.tensor(seed), *shape, p), _documented_keep(seed, *shape, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dropout_is_x_times_keep_over_one_minus_p_bit_for_bit(dtype):
    """Including the rounding of half-precision inputs and inf · 0 = nan where an infinite input is dropped."""
    g = torch.Generator().manual_seed(0)
    for seed, p in itertools.product((3, 2**33 + 1), (0.05, 0.4)):
        x = torch.randn(64, 48, generator=g).to(dtype)
        x[0, :8] = float("inf")
        keep = _documented_keep(seed, 64, 48, p)
        want = x * keep.to(dtype) * (1.0 / (1.0 - p))
        got = drop.dropout(x, torch.tensor(seed), p)
        assert got.dtype == dtype
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert drop.dropout(x, torch.tensor(1), 0.0) is x and drop.dropout(x, None, 0.3) is x


@pytest.mark.parametrize("dtype,adapter", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float64, torch.float64)], ids=str)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_the_in_place_dropout_path_is_the_formula(dtype, adapter, fan_in_fan_out):
    """lora_linear_fwd / _bwd with dropout (the mask made once, multiplied in place) against float64: y, dX and dA
    with x ⊙ keep / (1 − p)."""
    M, K, N, R, p = 33, 40, 24, 4, 0.2
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    x, w = rnd(M, K), rnd(*((K, N) if fan_in_fan_out else (N, K)))
    a, b, s, bias, seed = rnd(R, K, dt=adapter), rnd(N, R, dt=adapter), torch.rand(R, generator=g), rnd(N), \
        torch.tensor(99)
    keep64 = _documented_keep(99, M, K, p).double() / (1 - p)
    x64, w64, a64, b64, s64 = x.double(), w.double(), a.double(), b.double(), s.double()
    w64 = w64.t() if fan_in_fan_out else w64  # (N, K)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    y, t, _ = ref.lora_linear_fwd(x, w, bias, a, b, s, seed, p, fan_in_fan_out, True)
    assert _rel(y, x64 @ w64.t() + bias.double() + ((x64 * keep64) @ a64.t() * s64) @ b64.t()) < tol
    dy = rnd(M, N)
    dx, da, *_ = ref.lora_linear_bwd(dy, x, w, a, b, s, t, seed, p, fan_in_fan_out, (True,) * 5)
    g64 = (dy.double() @ b64) * s64
    assert _rel(dx, dy.double() @ w64 + (g64 @ a64) * keep64) < tol
    assert _rel(da, g64.t() @ (x64 * keep64)) < tol


# ------------------------------------------------------------------------------------------------------------
# Prefix attention through SDPA
# ------------------------------------------------------------------------------------------------------------

def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _case(B, H, Hkv, Lq, Lk, P, D, shared, pad, attn, g):
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = [rnd(B, H, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D), rnd(1 if shared else B, Hkv, P, D),
         rnd(1 if shared else B, Hkv, P, D)]
    kw = {}
    if pad:
        kw["key_padding_mask"] = torch.ones(B, Lk, dtype=torch.bool)
        kw["key_padding_mask"][0, : Lk // 2] = False
    if attn == "bool":
        kw["attn_mask"] = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
    elif attn == "bias":  # T5-like position bias with hidden entries (-inf, and float32's lowest value)
        bias = 2 * rnd(1, H, Lq, Lk)
        bias = bias.masked_fill(torch.rand(bias.shape, generator=g) < 0.2, float("-inf"))
        kw["attn_mask"] = bias.masked_fill(torch.rand(bias.shape, generator=g) < 0.2, torch.finfo(torch.float32).min)
    elif attn == "bias_2d":
        kw["attn_mask"] = rnd(Lq, Lk)
    return t, kw


SHAPES = [(2, 4, 2, 5, 7, 3, 8), (2, 4, 4, 6, 6, 3, 16), (1, 2, 1, 1, 9, 4, 8), (3, 2, 2, 16, 16, 5, 64),
          (2, 4, 2, 7, 0, 3, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}Lq{}Lk{}P{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_path_matches_the_formula(shape, dtype, monkeypatch):
    """Every mask it takes (causal at several offsets, key padding, bool and additive attn_mask), GQA, a shared and
    a per-row prefix, no real keys: the output and every gradient within the formula's own error in that dtype (the
    float64 formula the truth), and SDPA did run."""
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    B, H, Hkv, Lq, Lk, P, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    worst, worst_formula = 0.0, 0.0
    combos = [(causal, pad, attn, shared, None) for (causal, pad), attn, shared in itertools.product(
        ((False, False), (True, False), (True, True)), (None, "bool", "bias", "bias_2d"), (True, False))]
    combos += [(True, pad, None, True, offset) for pad, offset in itertools.product((False, True), (0, 2))]
    for causal, pad, attn, shared, offset in combos:
        if Lk == 0 and (pad or attn):
            continue
        t64, kw = _case(B, H, Hkv, Lq, Lk, P, D, shared, pad, attn, g)
        kw.update(causal=causal, query_offset=offset)
        leaves = [x.clone().requires_grad_() for x in t64]
        want = prefix_attention_formula(*leaves, **kw)
        do = torch.randn(want.shape, generator=g, dtype=torch.float64)
        want_grads = torch.autograd.grad(want, leaves, do)
        kw_dt = dict(kw)
        if kw.get("attn_mask") is not None and kw["attn_mask"].is_floating_point():
            kw_dt["attn_mask"] = kw["attn_mask"].to(dtype)
        for fn in (prefix_attention, prefix_attention_formula):
            ins = [x.to(dtype).requires_grad_() for x in t64]
            before = len(calls)
            out = fn(*ins, **kw_dt)
            assert (len(calls) > before) == (fn is prefix_attention)
            assert out.dtype == dtype and torch.isfinite(out).all()
            grads = torch.autograd.grad(out, ins, do.to(dtype))  # k, v too, empty or not
            errs = [_rel(out, want)] + [_rel(a, b) for a, b in zip(grads, want_grads) if b.norm() > 0]
            if fn is prefix_attention:
                worst = max(worst, *errs)
            else:
                worst_formula = max(worst_formula, *errs)
    if dtype == torch.float32:
        assert worst < 1e-5, worst
    else:
        assert worst <= 2 * worst_formula, (worst, worst_formula)


def test_cases_sdpa_cannot_express_keep_the_formula(monkeypatch):
    """float64 (the oracle), no prefix (a row may see nothing: 0, where SDPA gives NaN), dropout, a prefix bias,
    per-row prefix ranges and a learned attn_mask run the formula; its results are unchanged."""
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", None)  # any SDPA call would fail
    g = torch.Generator().manual_seed(5)
    (q, k, v, pk, pv), _ = _case(2, 4, 2, 5, 7, 3, 8, True, False, None, g)
    assert not sdpa_applies(q, pk, None)
    prefix_attention(q, k, v, pk, pv, causal=True)
    q32, k32, v32, pk32, pv32 = (x.float() for x in (q, k, v, pk, pv))
    assert sdpa_applies(q32, pk32, None) and not sdpa_applies(q32, None, None)
    assert not sdpa_applies(q32, pk32[:, :, :0], None)
    blind = torch.zeros(5, 7, dtype=torch.bool)
    out = prefix_attention(q32, k32, v32, attn_mask=blind)
    assert torch.equal(out, torch.zeros_like(out))
    prefix_attention(q32, k32, v32, pk32, pv32, dropout_p=0.1)
    prefix_attention(q32, k32, v32, pk32, pv32, prefix_bias=torch.zeros(1, 4, 5, 3))
    prefix_attention(q32, k32, v32, pk32, pv32, prefix_lengths=torch.tensor([3, 1]))
    learned = torch.zeros(5, 7, requires_grad=True)
    assert not sdpa_applies(q32, pk32, learned)
    out = prefix_attention(q32, k32, v32, pk32, pv32, attn_mask=learned, causal=True)
    (grad,) = torch.autograd.grad(out.sum(), learned)
    assert torch.isfinite(grad).all()
