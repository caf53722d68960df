"""Attention-level adapters' shared steps: which modules of a model call attention (from the family row), and
registering fastpeft's attention with transformers (AttentionInterface and AttentionMaskInterface).

A model whose attention implementation is X (sdpa, eager, flash_attention_2, ...) is switched to
"fastpeft_X": its attention function is modules.attention.delegating_attention(X) (modules without an AttentionSite
run X unchanged), its mask function is X's own, so every layer receives the mask X expects.
The KV cache, generation and gradient checkpointing are the model's own; the cache holds only real tokens.
`uninstall` puts X back.
"""
from __future__ import annotations

import functools
import weakref

from torch import nn

from ..errors import TargetError
from ..modules.attention import PREFIX, delegating_attention, site_of
from .families import FAMILIES, NO_ROW_FIX, family_of
from .state import get_state
from .targets import blocks, join

MASK_FORMS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def heads_of(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv, head_dim


def attention_calls(model: nn.Module, where: str) -> list[tuple[str, str, int]]:
    """(path, kind, layer) of every module that calls transformers' attention, from the family row. Kinds:
    "self_prefix" (decoder-only and encoder-only models, a seq2seq decoder's self-attention), "encoder_prefix" (a
    seq2seq encoder's self-attention), "cross_prefix" (a seq2seq decoder's cross-attention)."""
    model_type, family = family_of(model)
    if family is None or not family.attention_calls:
        supported = sorted(k for k, f in FAMILIES.items() if f.attention_calls)
        raise TargetError(f"{where}: attention-level adapters have no row for model_type={model_type!r} (which "
                          "modules call attention, fastpeft/inject/families.py); supported families: "
                          f"{', '.join(supported)}. {NO_ROW_FIX}")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    calls = []
    for block, index in blocks(model, family.layers):
        for relative in family.attention_calls:
            path = join(block, relative)
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            encoder = ".encoder." in f".{block}."
            kind = ("cross_prefix" if relative in family.cross_attention_calls else
                    "encoder_prefix" if encoder and seq2seq else "self_prefix")
            calls.append((path, kind, index))
    if not calls:
        raise TargetError(f"{where}: found no attention modules ({', '.join(family.attention_calls)}) in the "
                          f"blocks of {type(model).__name__}.")
    return calls


def _interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


@functools.cache
def _register(previous: str) -> str:
    _, attention_interface, masks, mask_interface = _interfaces()
    name = PREFIX + previous
    attention_interface.register(name, delegating_attention(previous))
    mask_interface.register(name, masks[previous])
    return name


def implementation(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def check(model: nn.Module, where: str) -> None:
    """A TargetError unless the model's attention can be switched to fastpeft's."""
    current = implementation(model)
    if current is None or not hasattr(model.config, "_attn_implementation_internal"):
        raise TargetError(f"{where}: {type(model).__name__} is not a transformers model with an attention "
                          "implementation setting; attention-level adapters hook into transformers' "
                          "AttentionInterface.")
    if current.startswith(PREFIX):
        return
    if current not in MASK_FORMS:
        raise TargetError(f"{where}: the model's attention implementation is {current!r}; attention-level adapters "
                          f"work on top of {', '.join(MASK_FORMS)}. Call model.set_attn_implementation('sdpa') first.")


def _configs(model: nn.Module) -> list:
    """Every distinct model config object (T5's encoder and decoder stacks hold their own copies)."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found[id(config)] = config
    return list(found.values())


def install(model: nn.Module) -> str | None:
    """Switch the model to fastpeft's attention; returns the previous implementation (None: already switched)."""
    current = implementation(model)
    if current.startswith(PREFIX):
        return None
    name = _register(current)
    for config in _configs(model):
        config._attn_implementation = name
    return current


def uninstall(model: nn.Module, previous: str) -> None:
    for config in _configs(model):
        config._attn_implementation = previous


def acquire(model: nn.Module, undo: list) -> None:
    """Switch the model to fastpeft's attention (if not yet), remembering the previous implementation in its
    adapter state; `undo` gets the step that switches back."""
    previous = install(model)
    if previous is not None:
        get_state(model, create=True).attention = previous
        undo.append(lambda: _restore(model))


def _restore(model: nn.Module) -> None:
    state = get_state(model)
    if state is not None and state.attention is not None:
        uninstall(model, state.attention)
        state.attention = None


class Release:
    """A hook-handle look-alike held by an attention-level container: when it is detached and no module of the
    model keeps an AttentionSite, the model's previous attention implementation comes back."""

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)

    def remove(self) -> None:
        model = self.model()
        if model is not None and not any(site_of(m) is not None for m in model.modules()):
            _restore(model)
