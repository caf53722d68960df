"""`fp.ops.prefix_attention`: attention over a learned prefix and the real keys (math: fastpeft/reference/attention.py).

    O = dropout(softmax(Q [P_K; K]ᵀ · scale + [0; M])) [P_V; V]               (Li & Liang 2021, prefix tuning)

Q (B, H, L_q, D); K, V (B, H_kv, L_k, D); P_K, P_V (1 or B, H_kv, P, D). The prefix is visible to every query and
gets no bias; the mask M applies to the real keys only and combines the causal rule (query i at position
query_offset + i, default L_k − L_q, sees real keys j <= that), the key padding mask (B, L_k), True for real tokens,
and attn_mask, broadcastable to (B, H, L_q, L_k): bool (True = visible) or floating, added to the scaled scores
(transformers' eager mask, T5's position bias; below −1e38 hides the key). Query head h reads key/value head
h // (H / H_kv). The kernels take attn_mask through its strides (stride 0 on broadcast dimensions, no copy) but
give it no gradient: an attn_mask that requires grad (a learned position bias) runs the reference, where autograd
reaches it. dropout_p > 0 (probabilities dropped after the softmax, scaled by 1/(1 − p), as torch's SDPA) runs the
reference too: the kernels do not drop. prefix_bias, an additive bias on the prefix keys' scores (PEFT's T5 layout,
prefix keys at positions 0..P−1 with T5's relative position bias), also runs the reference. prefix_offsets and
prefix_lengths (B,) integer (multi-adapter batches) give row b only the prefix keys off_b <= p < off_b + len_b
(defaults 0 and P − off_b; len_b = 0: no prefix), e.g. adapters' prefixes packed along P in a (1, H_kv, P, D)
prefix; checked on the host for CPU tensors, clamped into [0, P] by the kernels (CUDA tensors are not synchronised).

`fastpeft::prefix_attention` returns (O, LSE): LSE (B, H, L_q) float32 is the natural log-sum-exp of each row's
visible scaled scores (+inf for a row that sees no key, whose O is 0), saved for the backward. On CUDA one
flash-attention-style kernel (fastpeft/kernels/attention.py) walks the prefix and then the real keys with an
online softmax, never concatenating them; head dims 64, 80, 96 and 128. For L_q <= 16 (decode) a split-K
("flash-decoding") forward packs the query heads of each GQA group (× L_q rows, up to 64) into one tile, so that
each K/V tile is read once per group, and splits the keys across programs that each write a partial (O_s, m_s,
l_s); a combine kernel merges them exactly, O = Σ_s e^{m_s − m} l_s O_s / Σ_s e^{m_s − m} l_s with m = max_s m_s
(larger groups: 16-row query blocks); the backward needs only O and LSE, so it serves training at small L_q too.
Autograd is registered on the op: its backward (`fastpeft::prefix_attention_backward`) takes Δ = rowsum(dO ⊙ O),
then a dK/dV kernel over the prefix tiles (summing the batch rows of a shared prefix, each over its own range)
and over the real key tiles, and a dQ kernel; only the gradients asked for are computed (prefix tuning: the prefix
alone).
Other head dims run the reference (autograd through it) with a one-time warning. Which path runs is listed in the
registry note (`fastpeft info`).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import ATTENTION_HEAD_DIMS, TRITON_DTYPES
from ..reference import attention as reference
from . import dispatch, registry
from ._common import sm_count

registry.describe(
    "prefix_attention", dtypes=TRITON_DTYPES, doc="O = softmax(Q [Pk; K]^T scale + mask) [Pv; V]",
    note=("flash-attention-style kernels (prefix then real keys, online softmax, causal and key padding masks, "
          "attn_mask on the real keys: bool or additive bias, broadcast by strides; GQA/MQA, shared or per-row "
          "prefix, per-row prefix ranges prefix_offsets/prefix_lengths: several adapters' prefixes packed in one "
          "batch, each range's keys only walked) for head dims 64, 80, 96, 128, forward and backward "
          "(FlashAttention-2 dK/dV and dQ kernels, deterministic: no atomics); the reference runs for other head "
          "dims (with a warning), for dropout_p > 0 (the kernels do not drop), for an attn_mask that requires "
          "grad (the kernels give it none) and for a prefix_bias (PEFT's T5 layout); decode (Lq <= 16, query "
          "heads x Lq <= 64 per kv head) runs a split-K (flash-decoding) forward: the GQA group's query rows packed "
          "in one tile, the keys split across programs (about 2 per SM), a combine kernel merging the partial "
          "softmaxes; else 16-row query blocks"))
_warned_head_dims: set[int] = set()


def _kernels():
    from ..kernels import attention  # imported on first CUDA call only: `import fastpeft` never loads triton

    return attention


# ------------------------------------------------------------------------------------------------------------
# Public functional op
# ------------------------------------------------------------------------------------------------------------

def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None = None, prefix_v: Tensor | None = None,
                     *, scale: float | None = None, causal: bool = False, key_padding_mask: Tensor | None = None,
                     query_offset: int | None = None, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                     prefix_bias: Tensor | None = None, prefix_offsets: Tensor | None = None,
                     prefix_lengths: Tensor | None = None) -> Tensor:
    """Attention of q (B, H, Lq, D) over the prefix (prefix_k, prefix_v: (1 or B, H_kv, P, D), or None) and the
    real keys k, v (B, H_kv, Lk, D). scale: default 1/sqrt(D); causal: query i sees real keys j <= query_offset + i
    (query_offset default Lk − Lq); key_padding_mask: (B, Lk) bool or integer, True/nonzero for real tokens;
    attn_mask: over the real keys only, broadcastable to (B, H, Lq, Lk), bool (True = visible) or floating (added
    to the scaled scores; no gradient through the kernels: one that requires grad runs the reference); dropout_p:
    on the attention probabilities, 0 <= p < 1 (p > 0 runs the reference); prefix_bias: floating, broadcastable
    to (B, H, Lq, P), added to the prefix keys' scores (PEFT's T5 layout; runs the reference); prefix_offsets,
    prefix_lengths: (B,) integer, row b sees only the prefix keys prefix_k[b or 0, :, off_b : off_b + len_b]
    (multi-adapter batches; defaults 0 and P − off_b, len_b = 0: no prefix). All masks apply together; a row that
    sees no key gives 0."""
    _check(q, k, v, prefix_k, prefix_v, key_padding_mask, query_offset, attn_mask, dropout_p)
    _check_prefix_rows(q, prefix_k, prefix_offsets, prefix_lengths)
    if prefix_bias is not None:
        _check_prefix_bias(prefix_bias, q, prefix_k)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    offset = Lk - Lq if query_offset is None else int(query_offset)
    backend = _backend(q)
    if backend == "triton" and D not in ATTENTION_HEAD_DIMS and D not in _warned_head_dims:
        _warned_head_dims.add(D)
        warnings.warn(f"fp.ops.prefix_attention: head dim {D} is not one the Triton kernel takes "
                      f"({', '.join(map(str, ATTENTION_HEAD_DIMS))}); running the PyTorch reference.", stacklevel=2)
    learned_mask = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
    kernel_ok = D in ATTENTION_HEAD_DIMS and dropout_p == 0 and not learned_mask and prefix_bias is None
    if not kernel_ok or (backend == "torch" and not torch.compiler.is_compiling()):
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, scale=scale, causal=causal,
                                          key_padding_mask=key_padding_mask, query_offset=query_offset,
                                          attn_mask=attn_mask, dropout_p=float(dropout_p), prefix_bias=prefix_bias,
                                          prefix_offsets=prefix_offsets, prefix_lengths=prefix_lengths)
    return torch.ops.fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, scale, bool(causal),
                                               offset, attn_mask, prefix_offsets, prefix_lengths)[0]


def _check_prefix_bias(bias: Tensor, q: Tensor, prefix_k: Tensor | None) -> None:
    where = "fp.ops.prefix_attention"
    B, H, Lq, _ = q.shape
    P = 0 if prefix_k is None else prefix_k.shape[2]
    if not bias.dtype.is_floating_point:
        raise InputError(f"{where}: prefix_bias has dtype {bias.dtype}; it is added to scores, use a float tensor.")
    if bias.device != q.device:
        raise InputError(f"{where}: prefix_bias is on {bias.device} but q is on {q.device}; move it to {q.device}.")
    try:
        torch.broadcast_shapes(tuple(bias.shape), (B, H, Lq, P))
        ok = bias.dim() == 4 and bias.shape[-1] == P
    except RuntimeError:
        ok = False
    if not ok:
        raise InputError(f"{where}: prefix_bias has shape {tuple(bias.shape)}; expected a shape broadcastable to "
                         f"(B, H, Lq, P) = ({B}, {H}, {Lq}, {P}), one column per prefix key.")


def _check_prefix_rows(q, prefix_k, offsets, lengths) -> None:
    """prefix_offsets / prefix_lengths: (B,) integer on q's device, with a prefix; their values too on the CPU (on
    CUDA the kernels clamp them instead of a synchronising check)."""
    where = "fp.ops.prefix_attention"
    B = q.shape[0]
    given = [(name, t) for name, t in (("prefix_offsets", offsets), ("prefix_lengths", lengths)) if t is not None]
    for name, t in given:
        if prefix_k is None:
            raise InputError(f"{where}: {name} is given but there is no prefix; pass prefix_k and prefix_v (the "
                             "packed prefixes the rows index into) or drop prefix_offsets/prefix_lengths.")
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != B:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{where}: {name} has shape {got}; expected (B,) = ({B},), one entry per batch row "
                             "(e.g. torch.tensor([...], dtype=torch.int32)).")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"{where}: {name} has dtype {t.dtype}; use an integer tensor (int32 preferred: the "
                             "kernels read int32), e.g. .to(torch.int32).")
        if t.device != q.device:
            raise InputError(f"{where}: {name} is on {t.device} but q is on {q.device}; move it to {q.device}.")
    if not given or q.device.type != "cpu" or torch.compiler.is_compiling():
        return
    P = prefix_k.shape[2]
    off = torch.zeros(B, dtype=torch.int64) if offsets is None else offsets.to(torch.int64)
    length = (P - off).clamp(min=0) if lengths is None else lengths.to(torch.int64)
    for name, bad, what in (("prefix_offsets", off < 0, "is negative"), ("prefix_lengths", length < 0, "is negative"),
                            ("prefix_offsets", off > P, f"exceeds P = {P}"),
                            ("prefix_offsets + prefix_lengths", off + length > P, f"exceeds P = {P}")):
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            raise InputError(f"{where}: {name} of row {b} {what} (offset {int(off[b])}, length {int(length[b])}); "
                             f"each row's prefix slice [off, off + len) must lie inside the prefix: 0 <= off, "
                             f"0 <= len, off + len <= P = {P} (prefix_k.shape[2], the packed prefixes' length).")


def _check(q, k, v, prefix_k, prefix_v, mask, query_offset, attn_mask=None, dropout_p=0.0) -> None:
    """Host-side validation before any launch: shapes, dtypes, devices."""
    where = "fp.ops.prefix_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InputError(f"{where}: {name} has shape {tuple(t.shape)}; expected 4 dimensions "
                             f"({'(B, H, Lq, D)' if name == 'q' else '(B, H_kv, Lk, D)'}: heads before sequence); "
                             "reshape it, e.g. t.view(B, L, H, D).transpose(1, 2).")
    B, H, _, D = q.shape
    if k.shape != v.shape:
        raise InputError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape; pass "
                         "one layer's keys and values.")
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D:
        raise InputError(f"{where}: k and v {tuple(k.shape)} must be (B={B}, H_kv, Lk, D={D}) for q "
                         f"{tuple(q.shape)} (same batch and head dim).")
    if Hkv == 0 or H % Hkv != 0:
        raise InputError(f"{where}: q has {H} heads and k/v {Hkv}; the query heads must be a multiple of the "
                         f"key/value heads (grouped-query attention); pass k and v with a number of heads that divides "
                         f"{H}.")
    if (prefix_k is None) != (prefix_v is None):
        raise InputError(f"{where}: pass both prefix_k and prefix_v, or neither.")
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            raise InputError(f"{where}: prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must "
                             "have the same shape; pass one prefix's keys and values.")
        if prefix_k.dim() != 4 or prefix_k.shape[0] not in (1, B) or prefix_k.shape[1] != Hkv \
                or prefix_k.shape[3] != D:
            raise InputError(f"{where}: prefix_k/prefix_v have shape {tuple(prefix_k.shape)}; expected (1 or {B}, "
                             f"{Hkv}, P, {D}): one prefix shared by the batch or one per row, with k's heads and "
                             "head dim.")
    if mask is not None:
        if tuple(mask.shape) != (B, k.shape[2]):
            raise InputError(f"{where}: key_padding_mask has shape {tuple(mask.shape)}; expected (B, Lk) = "
                             f"({B}, {k.shape[2]}), True for real tokens.")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise InputError(f"{where}: key_padding_mask has dtype {mask.dtype}; use bool (True = keep) or an "
                             "integer tensor (nonzero = keep).")
    if query_offset is not None and not isinstance(query_offset, int):
        raise InputError(f"{where}: query_offset={query_offset!r} must be an int (the position of query "
                         "0); pass e.g. query_offset=0, or None.")
    if attn_mask is not None:
        _check_attn_mask(attn_mask, q, k, prefix_k)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise InputError(f"{where}: dropout_p={dropout_p!r}; expected a float with 0 <= dropout_p < 1 (the "
                         "probability of dropping an attention weight; 0 when not training).")
    named = (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v))
    for name, t in (*named, ("key_padding_mask", mask), ("attn_mask", attn_mask)):
        if t is not None and t.device != q.device:
            raise InputError(f"{where}: {name} is on {t.device} but q is on {q.device}; move it to {q.device}.")
    if not q.dtype.is_floating_point:
        raise InputError(f"{where}: q has dtype {q.dtype}; expected a floating-point dtype; "
                         "cast q, k and v, e.g. .float().")
    for name, t in named:
        if t is not None and t.dtype != q.dtype:
            raise InputError(f"{where}: {name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype.")


def _check_attn_mask(attn_mask, q, k, prefix_k) -> None:
    where = "fp.ops.prefix_attention"
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    P = prefix_k.shape[2] if prefix_k is not None else 0
    full = (B, H, Lq, Lk)
    got = tuple(attn_mask.shape)
    try:
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(got, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        fix = "e.g. (B, 1, Lq, Lk) for a padding or causal mask, (1, H, Lq, Lk) for a position bias"
        if P and got and got[-1] == P + Lk:
            fix = f"it seems to cover the prefix too: pass attn_mask[..., {P}:] (the prefix is always visible)"
        raise InputError(f"{where}: attn_mask has shape {got}; expected a shape broadcastable to (B, H, Lq, Lk) = "
                         f"{full}, over the real keys only ({fix}).")
    if not (attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point):
        raise InputError(f"{where}: attn_mask has dtype {attn_mask.dtype}; use bool (True = visible) or a floating "
                         "mask added to the scores (0 = visible, -inf = hidden); convert a 0/1 mask with .bool().")


def _backend(q: Tensor) -> str:
    return dispatch.choose("prefix_attention", q.device, q.dtype, triton_dtypes=TRITON_DTYPES)


# ------------------------------------------------------------------------------------------------------------
# Registered op
# ------------------------------------------------------------------------------------------------------------

@torch.library.triton_op("fastpeft::prefix_attention", mutates_args=())
def _prefix_attention_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
                         key_padding_mask: Tensor | None, scale: float, causal: bool, query_offset: int,
                         attn_mask: Tensor | None = None, prefix_offsets: Tensor | None = None,
                         prefix_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(O, LSE): O like q, LSE (B, H, Lq) float32, the natural log-sum-exp of each row's visible scaled scores
    (bias included; +inf where a row sees no key). Differentiable in q, k, v, prefix_k, prefix_v (autograd
    registered below); attn_mask, prefix_offsets and prefix_lengths get no gradient."""
    B, H, Lq, D = q.shape
    if _backend(q) == "torch" or q.numel() == 0 or D not in ATTENTION_HEAD_DIMS:
        return reference.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, scale, causal,
                                              query_offset, attn_mask, prefix_offsets, prefix_lengths)
    o = dispatch.new_output((B, H, Lq, D), like=q)
    lse = dispatch.new_output((B, H, Lq), like=q, dtype=torch.float32)
    kern = _kernels()
    args = dict(scale=scale, causal=causal, key_padding_mask=_padding_mask(key_padding_mask), query_offset=query_offset,
                attn_mask=_attn_mask(attn_mask), **_prefix_rows(prefix_k, prefix_offsets, prefix_lengths))
    if kern.decode_applies(Lq, H // k.shape[1]):  # decode (the GQA group's rows in one tile): split-K, then combine
        splits = dispatch.kernel_options().decode_splits or None  # None: about two programs per SM
        kern.forward_decode(q, k, v, prefix_k, prefix_v, o, lse, num_splits=splits, sm_count=sm_count(q.device),
                            **args)
    else:
        kern.forward(q, k, v, prefix_k, prefix_v, o, lse, **args)
    return o, lse


def _padding_mask(key_padding_mask):
    """The key padding mask as the kernels read it: int8, nonzero = keep."""
    if key_padding_mask is None or key_padding_mask.dtype == torch.int8:
        return key_padding_mask
    return (key_padding_mask != 0).to(torch.int8)


def _prefix_rows(prefix_k, prefix_offsets, prefix_lengths) -> dict:
    """The per-row prefix ranges as the kernels read them: int32, contiguous (none without a prefix). Other integer
    dtypes are clamped into [0, P] first (no wrap-around; the kernels' own clamp then gives the same ranges)."""
    if prefix_k is None:
        return {}
    P = prefix_k.shape[2]

    def int32(t):
        if t is not None and t.dtype != torch.int32:
            t = t.to(torch.int64).clamp(0, P).to(torch.int32)
        return t if t is None or t.is_contiguous() else t.contiguous()

    return {"prefix_offsets": int32(prefix_offsets), "prefix_lengths": int32(prefix_lengths)}


def _attn_mask(attn_mask):
    """attn_mask as the kernels read it, in its own (broadcast) shape: bool as is (read as uint8), a floating mask
    in float16, bfloat16 or float32 (others cast to float32), detached (the kernels give it no gradient)."""
    if attn_mask is None:
        return None
    attn_mask = attn_mask.detach()
    if attn_mask.dtype.is_floating_point and attn_mask.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        attn_mask = attn_mask.to(torch.float32)
    return attn_mask


# ------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------

@torch.library.triton_op("fastpeft::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None,
                                  prefix_v: Tensor | None, key_padding_mask: Tensor | None, o: Tensor, lse: Tensor,
                                  scale: float, causal: bool, query_offset: int, need_q: bool, need_kv: bool,
                                  need_prefix: bool, attn_mask: Tensor | None = None,
                                  prefix_offsets: Tensor | None = None, prefix_lengths: Tensor | None = None
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dQ, dK, dV, dP_K, dP_V), each like its input (empty when not asked for, or when there is no prefix).
    With P = exp(S · scale + bias − LSE) under the forward's masks and Δ = rowsum(dO ⊙ O): dV = Pᵀ dO,
    dS = P ⊙ (dO Vᵀ − Δ), dK = scale · dSᵀ Q, dQ = scale · dS K, summed over the query heads of each GQA
    group (and over the batch for a shared prefix: each row's range only; 0 for a key no row reads)."""
    B, H, Lq, D = q.shape
    need_prefix = need_prefix and prefix_k is not None
    if _backend(q) == "torch" or q.numel() == 0 or D not in ATTENTION_HEAD_DIMS:
        return reference.prefix_attention_bwd(do, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, scale,
                                              causal, query_offset, need_q, need_kv, need_prefix, attn_mask,
                                              prefix_offsets, prefix_lengths)
    kern = _kernels()
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    mask, am = _padding_mask(key_padding_mask), _attn_mask(attn_mask)
    rows = _prefix_rows(prefix_k, prefix_offsets, prefix_lengths)
    dq, dk, dv, dpk, dpv = (q.new_empty(0) for _ in range(5))  # distinct: outputs may not alias each other
    if need_q:
        dq = dispatch.new_output(tuple(q.shape), like=q)
        kern.backward_dq(q, do, lse, delta, k, v, prefix_k, prefix_v, dq, scale=scale, causal=causal,
                         key_padding_mask=mask, query_offset=query_offset, attn_mask=am, **rows)
    if need_kv:
        dk = dispatch.new_output(tuple(k.shape), like=k)
        dv = dispatch.new_output(tuple(v.shape), like=v)
        kern.backward_dkdv(q, do, lse, delta, k, v, dk, dv, scale=scale, causal=causal, key_padding_mask=mask,
                           query_offset=query_offset, attn_mask=am)
    if need_prefix:
        dpk = dispatch.new_output(tuple(prefix_k.shape), like=prefix_k)
        dpv = dispatch.new_output(tuple(prefix_v.shape), like=prefix_v)
        kern.backward_dkdv(q, do, lse, delta, prefix_k, prefix_v, dpk, dpv, scale=scale, **rows)
    return dq, dk, dv, dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, scale, causal, query_offset, attn_mask, offsets, lengths = inputs
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, output[0], output[1], attn_mask, offsets,
                          lengths)
    ctx.scale, ctx.causal, ctx.query_offset = scale, causal, query_offset
    ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state


def _backward(ctx, do, _dlse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, attn_mask, offsets, lengths = ctx.saved_tensors
    need_q, need_k, need_v, need_pk, need_pv = ctx.needs_input_grad[:5]
    need_kv, need_prefix = need_k or need_v, (need_pk or need_pv) and prefix_k is not None
    if do is None:  # only LSE was used (it has no gradient)
        return (None,) * 12
    with dispatch.restore(ctx.dispatch):
        dq, dk, dv, dpk, dpv = torch.ops.fastpeft.prefix_attention_backward(
            do, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, ctx.scale, ctx.causal, ctx.query_offset,
            need_q, need_kv, need_prefix, attn_mask, offsets, lengths)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, dpk if need_pk else None,
            dpv if need_pv else None, None, None, None, None, None, None, None)  # none for masks and ranges


torch.library.register_autograd("fastpeft::prefix_attention", _backward, setup_context=_setup_context)
