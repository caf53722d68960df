"""Attention over a learned prefix and the real keys, in plain PyTorch: the oracle of the prefix-attention kernel.

    O = dropout(softmax(Q [P_K; K]ᵀ · scale + [0; M])) [P_V; V]               (Li & Liang 2021, prefix tuning)

Q: (B, H, L_q, D); K, V: (B, H_kv, L_k, D); P_K, P_V: (B or 1, H_kv, P, D), a prefix shared by the batch when its
first dimension is 1. H is a multiple of H_kv (grouped-query attention; H_kv = 1 is multi-query): query head h
reads key/value head h // (H / H_kv). The mask M applies to the real keys only — the prefix (its row's range,
below) is visible to every query and gets no bias. Its parts, all applied together:

* `causal`: query i sits at position `query_offset` + i (by default L_k − L_q: the queries are the last L_q
  tokens, as in a decode step with a KV cache) and sees real keys j ≤ that position;
* `key_padding_mask` (B, L_k), True for real tokens, hides padded keys;
* `attn_mask`, broadcastable to (B, H, L_q, L_k) (e.g. (B, 1, L_q, L_k), or (1, H, L_q, L_k) for T5's position
  bias): bool (True = visible), or floating, ADDED to the scaled scores (transformers' eager mask, T5's relative
  position bias). A floating value below HIDE_BELOW = −1e38 (−inf; float32's and bfloat16's lowest values)
  hides the key like False: the kernels work in log₂ units, where such a value overflows.

`prefix_bias`, broadcastable to (B, H, L_q, P), is added to the prefix keys' scaled scores (PEFT's T5 layout,
where the prefix keys sit at positions 0..P−1 and get T5's relative position bias); by default the prefix has none.

Per-row prefixes (multi-adapter batches): `prefix_offsets`, `prefix_lengths` (B,) integer give batch row b the
prefix keys p with off_b <= p < off_b + len_b, i.e. the slice P_K[b if B_p = B else 0, :, off_b : off_b + len_b]
(and P_V's), e.g. several adapters' prefixes packed along P in one (1, H_kv, P, D) tensor; len_b = 0: no prefix.
Defaults: off_b = 0, len_b = P − off_b (the rest); out-of-range values are clamped, off_b into [0, P] and len_b
into [0, P − off_b] (fp.ops.prefix_attention rejects them on CPU tensors; the kernels clamp likewise).

A query row that sees no key at all gives 0. `dropout_p` > 0 drops attention probabilities after the softmax,
scaling the kept ones by 1/(1 − p), as torch's scaled_dot_product_attention does (torch's global generator).
The prefix is concatenated here for clarity; the kernel reads it from its own tensors and never copies K or V.

`prefix_attention` is also the op's eager PyTorch path (CPU, and CUDA where no kernel applies). Wherever every
query row sees at least one key (a prefix, P > 0, visible to all rows) and neither dropout, a prefix bias, per-row
prefix ranges nor a learned attn_mask is asked for, `sdpa_prefix_attention` computes the same function through
torch's fused scaled_dot_product_attention on the concatenated keys, the mask widened by the prefix columns
(float32 and half precision; on the CPU its flash kernel, forward and backward, instead of the (B, H, L_q, P + L_k)
scores and probabilities that autograd keeps for the formula: PEFT's prefix tuning runs that kernel too). float64
(the oracle) and the other cases run the formula as written, `prefix_attention_formula`.

`prefix_attention_fwd` and `prefix_attention_bwd` are the registered op's CPU path (fastpeft/ops/attention.py):
(O, LSE) with LSE the natural log-sum-exp of each row's visible scaled scores (+inf for a row that sees no key),
and the gradients from O and LSE by the formulas of `prefix_attention_bwd`, as the kernels compute them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import acc_dtype

HIDE_BELOW = -1e38  # a floating attn_mask value below this hides its key (as False would)


SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # sdpa_prefix_attention's; float64 keeps the formula


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None = None,
                     prefix_v: torch.Tensor | None = None, *, scale: float | None = None, causal: bool = False,
                     key_padding_mask: torch.Tensor | None = None, query_offset: int | None = None,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     prefix_bias: torch.Tensor | None = None, prefix_offsets: torch.Tensor | None = None,
                     prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The formula above, differentiable by autograd (a floating attn_mask included): through torch's fused
    attention where `sdpa_applies`, else as written (`prefix_attention_formula`)."""
    if dropout_p == 0 and prefix_bias is None and prefix_offsets is None and prefix_lengths is None and \
            sdpa_applies(q, prefix_k, attn_mask):
        return sdpa_prefix_attention(q, k, v, prefix_k, prefix_v, scale=scale, causal=causal,
                                     key_padding_mask=key_padding_mask, query_offset=query_offset, attn_mask=attn_mask)
    return prefix_attention_formula(q, k, v, prefix_k, prefix_v, scale=scale, causal=causal,
                                    key_padding_mask=key_padding_mask, query_offset=query_offset, attn_mask=attn_mask,
                                    dropout_p=dropout_p, prefix_bias=prefix_bias, prefix_offsets=prefix_offsets,
                                    prefix_lengths=prefix_lengths)


def sdpa_applies(q: torch.Tensor, prefix_k: torch.Tensor | None, attn_mask: torch.Tensor | None) -> bool:
    """Whether `sdpa_prefix_attention` computes the formula for these inputs: float32 or half precision, a prefix
    (P > 0: every query row sees a key, so no row is left empty, where SDPA would give NaN rather than 0), queries,
    and an attn_mask that needs no gradient (the fused kernels give it none). Dropout, a prefix bias and per-row
    prefix ranges are the caller's to rule out."""
    return (q.dtype in SDPA_DTYPES and prefix_k is not None and prefix_k.shape[2] > 0 and q.shape[2] > 0
            and not (attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()))


def sdpa_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                          prefix_v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
                          key_padding_mask: torch.Tensor | None = None, query_offset: int | None = None,
                          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The formula through F.scaled_dot_product_attention on [P_K; K], [P_V; V] (the inputs `sdpa_applies` to): the
    mask over the concatenated keys is `visible_keys` (one copy for the batch when only the causal rule applies;
    none at all when every query sees every key), a floating attn_mask widened by zero columns for the prefix."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[2]
    offset = Lk - Lq if query_offset is None else query_offset
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)  # k, v in the graph even when empty (L_k = 0)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
    mask = None
    if key_padding_mask is not None or attn_mask is not None:
        mask = visible_keys(B, Lq, Lk, P, causal=causal, query_offset=offset, key_padding_mask=key_padding_mask,
                            device=q.device, attn_mask=attn_mask)
        if attn_mask is not None and attn_mask.dtype != torch.bool:  # additive: the bias, -inf where hidden
            mask = add_bias(torch.zeros(mask.shape, dtype=q.dtype, device=q.device), attn_mask.detach(), P
                            ).masked_fill_(~mask, float("-inf"))
    elif causal and offset < Lk - 1:  # some real keys are hidden from some rows: one mask for the whole batch
        mask = visible_keys(1, Lq, Lk, P, causal=True, query_offset=offset, key_padding_mask=None, device=q.device)
    gqa = {"enable_gqa": True} if H != Hkv else {}
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, **gqa)


def prefix_attention_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None = None,
                             prefix_v: torch.Tensor | None = None, *, scale: float | None = None, causal: bool = False,
                             key_padding_mask: torch.Tensor | None = None, query_offset: int | None = None,
                             attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                             prefix_bias: torch.Tensor | None = None, prefix_offsets: torch.Tensor | None = None,
                             prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The formula above as written, differentiable by autograd (a floating attn_mask included); softmax in
    float32 (float64 for float64 inputs)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if prefix_k is None:
        prefix_k = k.new_zeros((1, Hkv, 0, D))
        prefix_v = v.new_zeros((1, Hkv, 0, v.shape[-1]))
    P = prefix_k.shape[2]
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2).repeat_interleave(group, dim=1)
    work = acc_dtype(q.dtype)
    scores = (q.to(work) @ keys.to(work).transpose(-1, -2)) * scale          # (B, H, Lq, P + Lk)
    scores = add_bias(scores, attn_mask, P)
    if prefix_bias is not None:
        scores = scores + F.pad(prefix_bias.to(scores.dtype), (0, Lk))
    offset = Lk - Lq if query_offset is None else query_offset
    visible = visible_keys(B, Lq, Lk, P, causal=causal, query_offset=offset, key_padding_mask=key_padding_mask,
                           device=q.device, attn_mask=attn_mask, prefix_offsets=prefix_offsets,
                           prefix_lengths=prefix_lengths)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                   # a row with no visible key: zeros
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ values.to(work)).to(q.dtype)


def visible_keys(B: int, Lq: int, Lk: int, P: int, *, causal: bool, query_offset: int,
                 key_padding_mask: torch.Tensor | None, device, attn_mask: torch.Tensor | None = None,
                 prefix_offsets: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """(B, 1 or H, L_q, P + L_k) bool: which keys each query sees (the prefix keys of its row's range, every one
    by default; the real keys the rules allow). The head dimension is H only when attn_mask has one."""
    visible = torch.ones((B, 1, Lq, P + Lk), dtype=torch.bool, device=device)
    if prefix_offsets is not None or prefix_lengths is not None:
        visible[..., :P] &= prefix_rows(B, P, prefix_offsets, prefix_lengths, device)[:, None, None, :]
    if causal:
        rows = torch.arange(Lq, device=device)[:, None] + query_offset
        visible[..., P:] &= torch.arange(Lk, device=device)[None, :] <= rows
    if key_padding_mask is not None:
        visible[..., P:] &= key_padding_mask[:, None, None, :].to(torch.bool)
    if attn_mask is not None:
        shown = attn_mask if attn_mask.dtype == torch.bool else attn_mask.detach() >= HIDE_BELOW
        real = visible[..., P:] & shown                                      # broadcast: (B, 1 or H, Lq, Lk)
        visible = torch.cat([visible[..., :P].expand(*real.shape[:-1], P), real], dim=-1)
    return visible


def prefix_rows(B: int, P: int, prefix_offsets: torch.Tensor | None, prefix_lengths: torch.Tensor | None,
                device) -> torch.Tensor:
    """(B, P) bool: prefix key p is row b's iff off_b <= p < off_b + len_b, with off_b clamped into [0, P] and
    len_b into [0, P − off_b] (defaults: off_b = 0, len_b = P − off_b)."""
    off = torch.zeros(B, dtype=torch.int64, device=device) if prefix_offsets is None else prefix_offsets
    off = off.to(device=device, dtype=torch.int64).clamp(0, P)
    length = P - off
    if prefix_lengths is not None:
        length = torch.minimum(prefix_lengths.to(device=device, dtype=torch.int64).clamp(min=0), length)
    p = torch.arange(P, device=device)
    return (p[None, :] >= off[:, None]) & (p[None, :] < (off + length)[:, None])


def add_bias(scores: torch.Tensor, attn_mask: torch.Tensor | None, P: int) -> torch.Tensor:
    """scores (B, H, L_q, P + L_k) plus a floating attn_mask on the real keys' columns (the prefix gets none)."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return scores
    return scores + F.pad(attn_mask.to(scores.dtype), (P, 0))


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, scale: float, causal: bool,
                         query_offset: int, attn_mask=None, prefix_offsets=None, prefix_lengths=None):
    """(O, LSE): O as `prefix_attention` (no dropout, no prefix bias), LSE (B, H, L_q) float32 from the same
    masked scores (+inf where a row sees no key)."""
    rows = {"prefix_offsets": prefix_offsets, "prefix_lengths": prefix_lengths}
    o = prefix_attention_formula(q, k, v, prefix_k, prefix_v, scale=scale, causal=causal,
                                 key_padding_mask=key_padding_mask, query_offset=query_offset, attn_mask=attn_mask,
                                 **rows)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[2] if prefix_k is not None else 0
    keys = k if prefix_k is None else torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
    keys = keys.repeat_interleave(H // Hkv, dim=1)
    work = acc_dtype(q.dtype)
    scores = add_bias((q.to(work) @ keys.to(work).transpose(-1, -2)) * scale, attn_mask, P)
    visible = visible_keys(B, Lq, Lk, P, causal=causal, query_offset=query_offset, key_padding_mask=key_padding_mask,
                           device=q.device, attn_mask=attn_mask, **rows)
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    lse = lse.masked_fill(~visible.any(-1), float("inf")).to(torch.float32)
    return o, lse


def prefix_attention_bwd(do, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, scale: float, causal: bool,
                         query_offset: int, need_q: bool, need_kv: bool, need_prefix: bool, attn_mask=None,
                         prefix_offsets=None, prefix_lengths=None):
    """(dQ, dK, dV, dP_K, dP_V) from dO, O and LSE, each like its input (empty when not asked for). With
    P = exp(S · scale + bias − LSE) under the forward's masks and Δ = rowsum(dO ⊙ O): dV = Pᵀ dO,
    dS = P ⊙ (dO Vᵀ − Δ), dK = scale · dSᵀ Q, dQ = scale · dS K, summed over the query heads of each GQA group
    (and over the batch for a shared prefix), on the concatenated keys."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    P = prefix_k.shape[2] if prefix_k is not None else 0
    work = acc_dtype(q.dtype)
    keys, values = k.to(work), v.to(work)
    if prefix_k is not None:
        keys = torch.cat([prefix_k.to(work).expand(B, -1, -1, -1), keys], dim=2)
        values = torch.cat([prefix_v.to(work).expand(B, -1, -1, -1), values], dim=2)
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    qw, dow = q.to(work), do.to(work)
    scores = add_bias((qw @ keys.transpose(-1, -2)) * scale, attn_mask, P)
    visible = visible_keys(B, Lq, Lk, P, causal=causal, query_offset=query_offset, key_padding_mask=key_padding_mask,
                           device=q.device, attn_mask=attn_mask, prefix_offsets=prefix_offsets,
                           prefix_lengths=prefix_lengths)
    probs = torch.exp(scores.masked_fill(~visible, float("-inf")) - lse.to(work)[..., None])
    delta = (dow * o.to(work)).sum(-1, keepdim=True)
    ds = probs * (dow @ values.transpose(-1, -2) - delta)
    dq, dk, dv, dpk, dpv = (q.new_empty(0) for _ in range(5))  # distinct: op outputs may not alias each other
    if need_q:
        dq = (ds @ keys * scale).to(q.dtype)
    if need_kv or need_prefix:
        dkeys = (ds.transpose(-1, -2) @ qw * scale).unflatten(1, (Hkv, group)).sum(2)   # (B, Hkv, P + Lk, D)
        dvalues = (probs.transpose(-1, -2) @ dow).unflatten(1, (Hkv, group)).sum(2)
        if need_kv:
            dk, dv = dkeys[:, :, P:].to(k.dtype), dvalues[:, :, P:].to(v.dtype)
        if need_prefix:
            dpk, dpv = dkeys[:, :, :P], dvalues[:, :, :P]
            if prefix_k.shape[0] == 1:
                dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
            dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv
