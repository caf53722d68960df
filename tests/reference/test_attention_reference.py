"""The prefix-attention oracle (fastpeft/reference/attention.py) against independent computations: a float64
loop over queries, PyTorch's SDPA (no prefix; a prefix through an explicit mask), and the structural facts the
kernel relies on (a decode step is the last row of the full causal attention, GQA is MHA on repeated heads, a
shared prefix equals the same prefix per row, padded keys do not matter)."""
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


def _loop(q, k, v, pk, pv, causal, pad, offset):
    """Query by query, head by head, in float64, with the prefix and the visible real keys listed explicitly."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(Lq):
                keys = [pk[b % pk.shape[0], kv, j] for j in range(pk.shape[2])]
                vals = [pv[b % pv.shape[0], kv, j] for j in range(pv.shape[2])]
                for j in range(Lk):
                    if causal and j > offset + i:
                        continue
                    if pad is not None and not pad[b, j]:
                        continue
                    keys.append(k[b, kv, j])
                    vals.append(v[b, kv, j])
                s = torch.stack(keys) @ q[b, h, i] / math.sqrt(D)
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
