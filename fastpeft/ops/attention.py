"""`fp.ops.prefix_attention`: attention over a learned prefix and the real keys (math: fastpeft/reference/attention.py).

    O = softmax(Q [P_K; K]ᵀ · scale + mask) [P_V; V]                         (Li & Liang 2021, prefix tuning)

Q (B, H, L_q, D); K, V (B, H_kv, L_k, D); P_K, P_V (1 or B, H_kv, P, D). The prefix is visible to every query; the
causal rule (query i at position query_offset + i, default L_k − L_q, sees real keys j <= that) and the key padding
mask (B, L_k), True for real tokens, apply to the real keys only. Query head h reads key/value head h // (H / H_kv).

`fastpeft::prefix_attention` returns (O, LSE): LSE (B, H, L_q) float32 is the natural log-sum-exp of each row's
visible scaled scores (+inf for a row that sees no key, whose O is 0), kept for the backward pass to come. On CUDA
one flash-attention-style kernel (fastpeft/kernels/attention.py) walks the prefix and then the real keys with an
online softmax, never concatenating them; head dims 64, 80, 96 and 128. The backward kernel is not written yet:
when any input requires grad the reference runs (autograd through it), and other head dims run the reference with
a one-time warning. Which path runs is listed in the registry note (`fastpeft info`).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..reference import attention as reference
from . import dispatch, registry
from .lora import TRITON_DTYPES

KERNEL_HEAD_DIMS = (64, 80, 96, 128)  # kernels/attention.py HEAD_DIMS (not imported: triton stays unloaded)
registry.describe(
    "prefix_attention", dtypes=TRITON_DTYPES, doc="O = softmax(Q [Pk; K]^T scale + mask) [Pv; V]",
    note=("flash-attention-style forward kernel (prefix then real keys, online softmax, causal and key padding "
          "masks, GQA/MQA, shared or per-row prefix) for head dims 64, 80, 96, 128; forward only so far: inputs "
          "that require grad run the reference (autograd through it), other head dims run the reference with a "
          "warning"))
_warned_head_dims: set[int] = set()


def _kernels():
    from ..kernels import attention  # imported on first CUDA call only: `import fastpeft` never loads triton

    return attention


# ------------------------------------------------------------------------------------------------------------
# Public functional op
# ------------------------------------------------------------------------------------------------------------

def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None = None, prefix_v: Tensor | None = None,
                     *, scale: float | None = None, causal: bool = False, key_padding_mask: Tensor | None = None,
                     query_offset: int | None = None) -> Tensor:
    """Attention of q (B, H, Lq, D) over the prefix (prefix_k, prefix_v: (1 or B, H_kv, P, D), or None) and the
    real keys k, v (B, H_kv, Lk, D). scale: default 1/sqrt(D); causal: query i sees real keys j <= query_offset + i
    (query_offset default Lk − Lq); key_padding_mask: (B, Lk) bool or integer, True/nonzero for real tokens."""
    _check(q, k, v, prefix_k, prefix_v, key_padding_mask, query_offset)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    offset = Lk - Lq if query_offset is None else int(query_offset)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v))
    backend = _backend(q)
    if backend == "triton" and D not in KERNEL_HEAD_DIMS and D not in _warned_head_dims:
        _warned_head_dims.add(D)
        warnings.warn(f"fp.ops.prefix_attention: head dim {D} is not one the Triton kernel takes "
                      f"({', '.join(map(str, KERNEL_HEAD_DIMS))}); running the PyTorch reference.", stacklevel=2)
    kernel_ok = D in KERNEL_HEAD_DIMS and not grads
    if not kernel_ok or (backend == "torch" and not torch.compiler.is_compiling()):
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, scale=scale, causal=causal,
                                          key_padding_mask=key_padding_mask, query_offset=query_offset)
    return torch.ops.fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, scale, bool(causal),
                                               offset)[0]


def _check(q, k, v, prefix_k, prefix_v, mask, query_offset) -> None:
    """Host-side validation before any launch: shapes, dtypes, devices."""
    where = "fp.ops.prefix_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}; expected 4 dimensions "
                             f"({'(B, H, Lq, D)' if name == 'q' else '(B, H_kv, Lk, D)'}: heads before sequence).")
    B, H, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape.")
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: k and v {tuple(k.shape)} must be (B={B}, H_kv, Lk, D={D}) for q "
                         f"{tuple(q.shape)} (same batch and head dim).")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{where}: q has {H} heads and k/v {Hkv}; the query heads must be a multiple of the "
                         "key/value heads (grouped-query attention).")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError(f"{where}: pass both prefix_k and prefix_v, or neither.")
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"{where}: prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must "
                             "have the same shape.")
        if prefix_k.dim() != 4 or prefix_k.shape[0] not in (1, B) or prefix_k.shape[1] != Hkv \
                or prefix_k.shape[3] != D:
            raise ValueError(f"{where}: prefix_k/prefix_v have shape {tuple(prefix_k.shape)}; expected (1 or {B}, "
                             f"{Hkv}, P, {D}): one prefix shared by the batch or one per row, with k's heads and "
                             "head dim.")
    if mask is not None:
        if tuple(mask.shape) != (B, k.shape[2]):
            raise ValueError(f"{where}: key_padding_mask has shape {tuple(mask.shape)}; expected (B, Lk) = "
                             f"({B}, {k.shape[2]}), True for real tokens.")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"{where}: key_padding_mask has dtype {mask.dtype}; use bool (True = keep) or an "
                             "integer tensor (nonzero = keep).")
    if query_offset is not None and not isinstance(query_offset, int):
        raise ValueError(f"{where}: query_offset={query_offset!r} must be an int (the position of query 0).")
    named = (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v))
    for name, t in (*named, ("key_padding_mask", mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device} but q is on {q.device}; move it to {q.device}.")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{where}: q has dtype {q.dtype}; expected a floating-point dtype.")
    for name, t in named:
        if t is not None and t.dtype != q.dtype:
            raise ValueError(f"{where}: {name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype.")


def _backend(q: Tensor) -> str:
    return dispatch.choose("prefix_attention", q.device, q.dtype, triton_dtypes=TRITON_DTYPES)


# ------------------------------------------------------------------------------------------------------------
# Registered op
# ------------------------------------------------------------------------------------------------------------

@torch.library.triton_op("fastpeft::prefix_attention", mutates_args=())
def _prefix_attention_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
                         key_padding_mask: Tensor | None, scale: float, causal: bool, query_offset: int
                         ) -> tuple[Tensor, Tensor]:
    """(O, LSE): O like q, LSE (B, H, Lq) float32, the natural log-sum-exp of each row's visible scaled scores
    (+inf where a row sees no key). Forward only (no autograd registered yet: the public op runs the reference
    when gradients are needed)."""
    B, H, Lq, D = q.shape
    if _backend(q) == "torch" or q.numel() == 0 or D not in KERNEL_HEAD_DIMS:
        return _torch_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, scale, causal, query_offset)
    o = dispatch.new_output((B, H, Lq, D), like=q)
    lse = dispatch.new_output((B, H, Lq), like=q, dtype=torch.float32)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask if key_padding_mask.dtype == torch.int8 else (key_padding_mask != 0).to(torch.int8)
    _kernels().forward(q, k, v, prefix_k, prefix_v, o, lse, scale=scale, causal=causal, key_padding_mask=mask,
                       query_offset=query_offset)
    return o, lse


def _torch_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, scale, causal, query_offset):
    """The op body on the reference: O from fastpeft.reference.attention, LSE from the same masked scores."""
    o = reference.prefix_attention(q, k, v, prefix_k, prefix_v, scale=scale, causal=causal,
                                   key_padding_mask=key_padding_mask, query_offset=query_offset)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[2] if prefix_k is not None else 0
    keys = k if prefix_k is None else torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
    keys = keys.repeat_interleave(H // Hkv, dim=1)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(work) @ keys.to(work).transpose(-1, -2)) * scale
    visible = torch.ones((B, 1, Lq, P + Lk), dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(Lq, device=q.device)[:, None] + query_offset
        visible[..., P:] &= torch.arange(Lk, device=q.device)[None, :] <= rows
    if key_padding_mask is not None:
        visible[..., P:] &= key_padding_mask[:, None, None, :].to(torch.bool)
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    lse = lse.masked_fill(~visible.any(-1), float("inf")).to(torch.float32)
    return o, lse
