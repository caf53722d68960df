"""What attention-level adapters add to one attention module, and the attention call that applies it.

An `AttentionSite` hangs on an attention module (a plain attribute, not a submodule). It has up to two sources:
`prefix` (prefix tuning: keys and values the queries attend to before the real ones) and `adaption`
(LLaMA-Adapter: gated extra attention over an adaption prompt with its own softmax). `site_attention` computes

    O = softmax(Q [P_K; K]ᵀ · scale + mask) [P_V; V]  +  Σ_a g_a · softmax(Q A_Kᵀ · scale) A_V

through fp.ops.prefix_attention (K and V are never concatenated with anything), reading the mask in the form
the model's previous attention implementation was given it: None (causal per the module, SDPA's top-left
alignment), 2-D key padding (flash attention's), or 4-D boolean/additive over the real keys (SDPA's, eager's);
T5's relative position bias joins the 4-D mask. The prefix gets no mask; a bias only where its source gives one
(T5 in PEFT's layout: the prefix keys at positions 0..P-1).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from .. import ops
from ..errors import TargetError
from .taps import Tap

ATTRIBUTE = "_fastpeft_attention"
PREFIX = "fastpeft_"  # fastpeft's attention implementations are named PREFIX + the model's previous one


class AttentionSite:
    """prefix(module, query, key) -> (P_K, P_V, bias, offsets, lengths) with P_K, P_V (1 or B, H_kv, P, D), bias an
    additive score bias over the prefix keys (broadcastable to (B, H, L_q, P)) or None, and the per-row prefix
    selection of a multi-adapter batch (offsets, lengths: (B,) int32, row b reads keys [offsets[b], offsets[b] +
    lengths[b])) or None, None; or None when no prefix runs (modules/prefix.py PrefixSource).
    adaption(module, rows) -> list of (A_K, A_V, gate, offsets, lengths) (the last two as prefix's;
    modules/llama_adapter.py AdaptionSource). `hidden` is the module's input during its forward, once
    `keep_input` hooked it (prefix gating reads it)."""

    def __init__(self):
        self.prefix: Callable | None = None
        self.adaption: Callable | None = None
        self._input = Tap()

    @property
    def empty(self) -> bool:
        return self.prefix is None and self.adaption is None

    @property
    def hidden(self) -> Tensor | None:
        return self._input.get()

    def keep_input(self, module: torch.nn.Module) -> list:
        """Hooks on `module` that make its input this site's `hidden` while its forward runs; returns the handles."""
        def keep(mod, args, kwargs):
            self._input.put(args[0] if args else kwargs.get("hidden_states"))

        def drop(mod, args, kwargs, output):
            self._input.take()

        return [module.register_forward_pre_hook(keep, with_kwargs=True),
                module.register_forward_hook(drop, with_kwargs=True, always_call=True)]


def site_of(module: torch.nn.Module, *, create: bool = False) -> AttentionSite | None:
    site = module.__dict__.get(ATTRIBUTE)
    if site is None and create:
        site = AttentionSite()
        module.__dict__[ATTRIBUTE] = site
    return site


def remove_site_part(module: torch.nn.Module, part: str) -> None:
    """Clear `part` ("prefix" or "adaption") of the module's site; drop the site when nothing is left."""
    site = site_of(module)
    if site is None:
        return
    setattr(site, part, None)
    if site.empty:
        del module.__dict__[ATTRIBUTE]


def delegating_attention(previous: str) -> Callable:
    """fastpeft's attention function for a model whose implementation was `previous` (registered as
    PREFIX + previous with transformers' AttentionInterface by inject/attention.py): site_attention, delegating to
    `previous` wherever no adapter adds to the attention."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        return site_attention(module, query, key, value, attention_mask, _delegate(previous, module), **kwargs)

    attention.__name__ = f"{PREFIX}{previous}_attention"
    return attention


def _delegate(previous: str, module: torch.nn.Module) -> Callable:
    """The model's previous attention function for `module`."""
    if previous == "eager":  # each model file defines its own eager function
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise TargetError(f"fastpeft attention: {type(module).__name__} has no eager_attention_forward in "
                              f"{type(module).__module__}; use model.set_attn_implementation('sdpa').")
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[previous]


def site_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, delegate: Callable,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The attention call of a module: `delegate` (the model's previous implementation) when no adapter adds to it,
    else the formula above. Returns (output (B, L_q, H, D), weights or None) as transformers expects."""
    site = site_of(module)
    prefix = site.prefix(module, query, key) if site is not None and site.prefix is not None else None
    if prefix is None:
        out, weights = delegate(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        out = _with_prefix(module, query, key, value, attention_mask, prefix, dropout, scaling, kwargs)
        weights = None
    terms = site.adaption(module, query.shape[0]) if site is not None and site.adaption is not None else []
    for a_k, a_v, gate, offsets, lengths in terms:  # gate: (1,), or (B, 1, 1, 1) per row in a multi-adapter batch
        extra = ops.prefix_attention(query, key[:, :, :0], value[:, :, :0], a_k.to(query.dtype),
                                     a_v.to(query.dtype), scale=scaling, prefix_offsets=offsets,
                                     prefix_lengths=lengths)
        out = out + (gate.to(query.dtype) * extra).transpose(1, 2)
    return out, weights


def _with_prefix(module, query, key, value, attention_mask, prefix, dropout, scaling, kwargs) -> Tensor:
    Lq = query.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    padding = bias = None
    offset = None
    if attention_mask is None:
        causal = bool(causal) and Lq > 1
        offset = 0  # SDPA's is_causal: top-left (a static cache's empty slots stay hidden)
    elif attention_mask.dim() == 2:  # flash attention's key padding mask; causal bottom-right
        padding = attention_mask
        causal = bool(causal) and Lq > 1
    else:
        bias, causal = attention_mask, False
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5: a learned additive bias over the real keys
        if bias is None:
            bias = position_bias
        elif bias.dtype == torch.bool:
            bias = position_bias.masked_fill(~bias, float("-inf"))
        else:
            bias = position_bias + bias
    if bias is not None and bias.dtype != torch.bool and bias.dtype != query.dtype:
        bias = bias.to(query.dtype)
    prefix_k, prefix_v, prefix_bias, prefix_offsets, prefix_lengths = prefix
    if prefix_bias is not None:
        prefix_bias = prefix_bias.to(query.dtype)
    out = ops.prefix_attention(query, key, value, prefix_k.to(query.dtype), prefix_v.to(query.dtype), scale=scaling,
                               causal=causal, key_padding_mask=padding, query_offset=offset, attn_mask=bias,
                               prefix_bias=prefix_bias, dropout_p=float(dropout) if module.training else 0.0,
                               prefix_offsets=prefix_offsets, prefix_lengths=prefix_lengths)
    return out.transpose(1, 2)


def pack_rows(names: list[str | None], made: dict[str, tuple[Tensor, Tensor] | None]):
    """(P_K, P_V, offsets, lengths): the distinct prefixes (1, H_kv, P_a, D) concatenated along P, and each row's
    slice of them (length 0 for a row without one); None when no row has a prefix."""
    starts, keys, values, start = {}, [], [], 0
    for n, kv in made.items():
        if kv is not None:
            starts[n] = (start, kv[0].shape[2])
            keys.append(kv[0])
            values.append(kv[1])
            start += kv[0].shape[2]
    if not keys:
        return None
    spans = [starts.get(n, (0, 0)) if n is not None else (0, 0) for n in names]
    device = keys[0].device
    offsets = torch.tensor([a for a, _ in spans], dtype=torch.int32).to(device)
    lengths = torch.tensor([n for _, n in spans], dtype=torch.int32).to(device)
    if len(keys) == 1:
        return keys[0], values[0], offsets, lengths
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), offsets, lengths
