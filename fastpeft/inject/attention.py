"""Registering fastpeft's attention with transformers (AttentionInterface and AttentionMaskInterface).

A model whose attention implementation is X (sdpa, eager, flash_attention_2, ...) is switched to
"fastpeft_X": its attention function is modules.attention.site_attention with X as the delegate (modules without
an AttentionSite run X unchanged), its mask function is X's own, so every layer receives the mask X expects.
The KV cache, generation and gradient checkpointing are the model's own; the cache holds only real tokens.
`uninstall` puts X back.
"""
from __future__ import annotations

import functools
import sys
import weakref

from torch import nn

from ..errors import TargetError
from ..modules.attention import site_attention, site_of
from .state import get_state

PREFIX = "fastpeft_"
MASK_FORMS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def _interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


def _delegate(previous: str, module: nn.Module):
    if previous == "eager":  # each model file defines its own eager function
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise TargetError(f"fastpeft attention: {type(module).__name__} has no eager_attention_forward in "
                              f"{type(module).__module__}; use model.set_attn_implementation('sdpa').")
        return eager
    return _interfaces()[0][previous]


def _attention(previous: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        return site_attention(module, query, key, value, attention_mask, _delegate(previous, module), **kwargs)

    attention.__name__ = f"{PREFIX}{previous}_attention"
    return attention


@functools.cache
def _register(previous: str) -> str:
    _, attention_interface, masks, mask_interface = _interfaces()
    name = PREFIX + previous
    attention_interface.register(name, _attention(previous))
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
