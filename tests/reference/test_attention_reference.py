"""The prefix-attention oracle (fastpeft/reference/attention.py) against independent computations: a float64
loop over queries, PyTorch's SDPA (no prefix; a prefix through an explicit mask; attn_mask, bool and additive),
and the structural facts the kernel relies on (a decode step is the last row of the full causal attention, GQA is
MHA on repeated heads, a shared prefix equals the same prefix per row, padded keys do not matter); dropout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastpeft.reference.attention import prefix_attention


def _inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7, P=3, D=8, shared=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    return (rnd(B, H, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D), rnd(1 if shared else B, Hkv, P, D),
            rnd(1 if shared else B, Hkv, P, D))


def _loop(q, k, v, pk, pv, causal, pad, offset, attn_mask=None):
    """Query by query, head by head, in float64, with the prefix and the visible real keys listed explicitly
    (attn_mask: bool, or floating added to the real keys' scores; below -1e38 hides)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    full = None if attn_mask is None else attn_mask.expand(B, H, Lq, Lk)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(Lq):
                keys = [pk[b % pk.shape[0], kv, j] for j in range(pk.shape[2])]
                vals = [pv[b % pv.shape[0], kv, j] for j in range(pv.shape[2])]
                bias = [0.0] * len(keys)
                for j in range(Lk):
                    if causal and j > offset + i:
                        continue
                    if pad is not None and not pad[b, j]:
                        continue
                    m = 0.0 if full is None else full[b, h, i, j].item()
                    if m is False or m < -1e38:
                        continue
                    keys.append(k[b, kv, j])
                    vals.append(v[b, kv, j])
                    bias.append(0.0 if isinstance(m, bool) else m)
                if not keys:
                    continue  # a row that sees no key: 0
                s = torch.stack(keys) @ q[b, h, i] / math.sqrt(D) + torch.tensor(bias, dtype=q.dtype)
                out[b, h, i] = torch.softmax(s, 0) @ torch.stack(vals)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_a_loop_over_queries(causal, padded, shared):
    q, k, v, pk, pv = _inputs(shared=shared)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool) if padded else None
    got = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=pad)
    assert torch.allclose(got, _loop(q, k, v, pk, pv, causal, pad, k.shape[2] - q.shape[2]), atol=1e-12)


def _attn_mask(shape, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(shape, generator=g) < 0.3
    if kind == "bool":
        return ~hidden
    bias = torch.randn(shape, generator=g, dtype=torch.float64)
    return bias.masked_fill(hidden, float("-inf") if kind == "-inf" else torch.finfo(torch.float32).min)


@pytest.mark.parametrize("shape, kind", [((2, 1, 5, 7), "bool"), ((1, 4, 5, 7), "-inf"), ((2, 4, 5, 7), "lowest"),
                                         ((5, 7), "bool"), ((2, 1, 1, 7), "-inf")])
@pytest.mark.parametrize("causal, padded", [(False, False), (True, True)])
def test_attn_mask_matches_a_loop_over_queries(shape, kind, causal, padded):
    """attn_mask on the real keys only, every broadcast shape, with the causal rule and the padding mask."""
    q, k, v, pk, pv = _inputs(shared=True)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool) if padded else None
    mask = _attn_mask(shape, kind)
    got = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=pad, attn_mask=mask)
    assert torch.allclose(got, _loop(q, k, v, pk, pv, causal, pad, 2, mask), atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "-inf"])
def test_attn_mask_is_sdpa_on_concatenated_keys(kind):
    """No prefix: SDPA with the same mask; a prefix: SDPA with the mask widened by visible, unbiased columns."""
    q, k, v, pk, pv = _inputs(H=2, Hkv=2, Lq=6, Lk=6)
    mask = _attn_mask((2, 2, 6, 6), kind)
    mask[..., -1] = True if kind == "bool" else 0.0  # every row sees a key: SDPA gives NaN for an empty row
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(prefix_attention(q, k, v, attn_mask=mask), expected, atol=1e-12)
    wide = F.pad(mask, (3, 0), value=True if kind == "bool" else 0.0)
    expected = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=wide)
    assert torch.allclose(prefix_attention(q, k, v, pk, pv, attn_mask=mask), expected, atol=1e-12)


def test_a_hiding_bias_is_a_false_mask_and_a_blind_row_gives_zero():
    """-inf and float32's lowest value hide like False; a row that sees no key (no prefix) gives 0, no NaN."""
    q, k, v, _, _ = _inputs(Lq=3, Lk=4)
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    bias = torch.zeros(3, 4, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float32).min)
    bias[0, 1] = float("-inf")
    a, b = prefix_attention(q, k, v, attn_mask=keep), prefix_attention(q, k, v, attn_mask=bias)
    assert torch.equal(a, b) and (a[:, :, 1] == 0).all() and torch.isfinite(a).all()


def test_gradient_reaches_a_floating_attn_mask():
    q, k, v, pk, pv = (x[:1, :2, :2, :4].clone() for x in _inputs())
    bias = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: prefix_attention(q, k, v, pk, pv, attn_mask=b, causal=True), (bias,))


def test_dropout():
    """p = 0 is no dropout; p > 0 is reproducible under a seed, keeps the expected value (rows of P sum to 1:
    with V = 1 every output averages 1) and drops about a fraction p of the weights."""
    q, k, v, pk, pv = _inputs(Lq=64, Lk=64)
    assert torch.equal(prefix_attention(q, k, v, pk, pv, dropout_p=0.0), prefix_attention(q, k, v, pk, pv))
    torch.manual_seed(3)
    a = prefix_attention(q, k, v, pk, pv, dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(a, prefix_attention(q, k, v, pk, pv, dropout_p=0.2))
    assert not torch.equal(a, prefix_attention(q, k, v, pk, pv, dropout_p=0.2))
    ones = torch.ones_like(v)
    out = prefix_attention(q, k, ones, pk, torch.ones_like(pv), dropout_p=0.2)
    assert abs(out.mean().item() - 1.0) < 0.02


def test_without_prefix_is_sdpa():
    q, k, v, _, _ = _inputs(H=2, Lq=6, Lk=6)
    got = prefix_attention(q, k, v, causal=True)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12)


def test_prefix_is_sdpa_on_concatenated_keys_with_the_mask_shifted():
    q, k, v, pk, pv = _inputs(H=2, Lq=6, Lk=6)
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    mask = torch.cat([torch.ones(6, 3, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).tril()], 1)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    assert torch.allclose(prefix_attention(q, k, v, pk, pv, causal=True), expected, atol=1e-12)


def test_decode_step_is_the_last_row_and_gqa_is_repeated_heads():
    q, k, v, pk, pv = _inputs(Lq=7, Lk=7)
    full = prefix_attention(q, k, v, pk, pv, causal=True)
    step = prefix_attention(q[:, :, -1:], k, v, pk, pv, causal=True)  # L_q = 1 against a cache of 7
    assert torch.allclose(step, full[:, :, -1:], atol=1e-12)
    mha = prefix_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pk.repeat_interleave(2, 1),
                           pv.repeat_interleave(2, 1), causal=True)
    assert torch.allclose(full, mha, atol=1e-12)


def test_padded_keys_do_not_matter_and_the_prefix_stays_visible():
    q, k, v, pk, pv = _inputs(Lk=7)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[:, :3] = False
    a = prefix_attention(q, k, v, pk, pv, key_padding_mask=pad)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :3] = 1e3
    v2[:, :, :3] = -1e3
    assert torch.allclose(a, prefix_attention(q, k2, v2, pk, pv, key_padding_mask=pad), atol=1e-12)
    only_prefix = prefix_attention(q, k, v, pk, pv, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    assert torch.isfinite(only_prefix).all()
    assert torch.allclose(only_prefix, prefix_attention(q, k[:, :, :0], v[:, :, :0], pk, pv), atol=1e-12)


def test_gradients_reach_queries_keys_values_and_the_prefix():
    q, k, v, pk, pv = (t.requires_grad_() for t in _inputs(shared=True))
    prefix_attention(q, k, v, pk, pv, causal=True).pow(2).sum().backward()
    for t in (q, k, v, pk, pv):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t, causal=True),
                                    tuple(x.detach()[:1, :2, :2, :4].clone().requires_grad_()
                                          for x in (q, k, v, pk, pv)))


def test_prefix_bias_is_added_to_the_prefix_columns_only():
    """PEFT's T5 layout: a bias on the prefix keys' scores equals SDPA on the concatenated keys with that bias."""
    q, k, v, pk, pv = _inputs(Hkv=4)
    B, H, Lq, D = q.shape
    P, Lk = pk.shape[2], k.shape[2]
    bias = torch.randn(1, H, Lq, P, dtype=torch.float64)
    got = prefix_attention(q, k, v, pk, pv, causal=True, prefix_bias=bias)
    full = torch.cat([bias.expand(B, -1, -1, -1), torch.zeros(B, H, Lq, Lk, dtype=torch.float64)], dim=-1)
    causal = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    full[..., P:] = full[..., P:].masked_fill(~causal, float("-inf"))
    expected = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=full)
    assert torch.allclose(got, expected, atol=1e-12)
