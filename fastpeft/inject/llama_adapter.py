"""LLaMA-Adapter injection: one LlamaAdapterPool at `<base model>.llama_adapter`, an AttentionSite (its `adaption`
part) on every attention module the family row names, and the model switched to fastpeft's attention
(inject/attention.py). It shares the sites and the attention switch with prefix tuning: both can run on one model.

The adapted layers are the top `adapter_layers` ones (None: all), as PEFT picks them: the last attention modules in
model order. The prompt's keys and values go through the attention module's own k and v projections (the family
row's names), so families need separate k/v projection modules inside the attention module; encoder-decoder models
are not supported. GPT-2 (fused c_attn) is refused: PEFT's GPT-2 variant adds the prompt's attention after the
output projection c_proj, which this path (the term joins the attention output before it) does not compute.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import LlamaAdapterConfig
from ..errors import ConfigError, TargetError
from ..modules.attention import remove_site_part, site_of
from ..modules.base import seeded
from ..modules.base_layers import adapter_placement
from ..modules.llama_adapter import AdaptionSource, LlamaAdapterGroup, LlamaAdapterPool
from . import attention
from .attention import attention_calls, heads_of
from .families import FAMILIES, NO_ROW_FIX, family_of
from .swap import container
from .targets import base_model_path, join

WHERE = "LlamaAdapterConfig"
ATTRIBUTE = "llama_adapter"


@dataclass
class LlamaAdapterPlan:
    base: str
    calls: list[tuple[str, int]]   # (attention module path, layer index) of every self-attention call
    layers: list[int]              # the layers this adapter adapts (the top adapter_layers)
    k_name: str                    # the k / v projections, relative to the attention module
    v_name: str
    heads: int                     # key/value heads
    head_dim: int
    hidden: int
    saved: tuple = ()

    @property
    def targets(self) -> list[tuple[str]]:
        return [(join(self.base, ATTRIBUTE),)]


def _projection(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """The path (relative to `module`) of its submodule the family row names (a suffix match), if any."""
    for path, _ in module.named_modules():
        if path and any(path == n or path.endswith("." + n) for n in names):
            return path
    return None


def supported_families() -> list[str]:
    """Families with attention calls, separate k/v projections and no cross-attention (not encoder-decoder)."""
    return sorted(k for k, f in FAMILIES.items()
                  if f.attention_calls and set(f.k).isdisjoint(f.v) and not f.cross_attention_calls)


def plan(model: nn.Module, name: str, config: LlamaAdapterConfig) -> LlamaAdapterPlan:
    model_type, family = family_of(model)
    if family is not None and family.attention_calls and not set(family.k).isdisjoint(family.v):
        raise TargetError(f"{WHERE}: model_type={model_type!r} computes keys and values in one fused projection "
                          f"({', '.join(family.k)}); LLaMA-Adapter needs separate k/v projections (PEFT's GPT-2 "
                          f"variant adds the prompt's attention after the output projection, a different formula). "
                          f"Supported families: {', '.join(supported_families())}; on this model, use prefix tuning "
                          "(fp.PrefixTuningConfig) instead.")
    attention.check(model, WHERE)
    if family is None or not family.attention_calls:
        raise TargetError(f"{WHERE}: LLaMA-Adapter has no row for model_type={model_type!r} (which modules call "
                          "attention and where their k/v projections are, fastpeft/inject/families.py); supported "
                          f"families: {', '.join(supported_families())}. {NO_ROW_FIX}")
    calls = attention_calls(model, WHERE)
    if getattr(model.config, "is_encoder_decoder", False):
        raise TargetError(f"{WHERE}: {type(model).__name__} is an encoder-decoder model; LLaMA-Adapter is supported "
                          f"on decoder-only and encoder-only models ({', '.join(supported_families())}); on this "
                          "model, use prefix tuning (fp.PrefixTuningConfig) instead.")
    calls = [(path, index) for path, kind, index in calls if kind == "self_prefix"]
    first = model.get_submodule(calls[0][0])
    k_name, v_name = _projection(first, family.k), _projection(first, family.v)
    if k_name is None or v_name is None:
        raise TargetError(f"{WHERE}: the attention module {calls[0][0]} ({type(first).__name__}) has no "
                          f"{'/'.join(family.k)} and {'/'.join(family.v)} projections.")
    for path, _ in calls:
        module = model.get_submodule(path)
        if _projection(module, (k_name,)) != k_name or _projection(module, (v_name,)) != v_name:
            raise TargetError(f"{WHERE}: the attention module {path} has no {k_name}/{v_name} projections.")
    indices = sorted({index for _, index in calls})
    count = len(indices)
    wanted = count if config.adapter_layers is None else config.adapter_layers
    if wanted > count:
        raise ConfigError(f"{WHERE}.adapter_layers: {wanted} layers asked for, but {type(model).__name__} has "
                          f"{count}; use adapter_layers <= {count} (or None: all layers).")
    kv, head_dim = heads_of(model.config)
    return LlamaAdapterPlan(base_model_path(model), calls, indices[count - wanted:], k_name, v_name, kv, head_dim,
                            model.config.hidden_size)


def apply(model: nn.Module, name: str, config: LlamaAdapterConfig, adapter_plan: LlamaAdapterPlan,
          undo: list[Callable]) -> None:
    device, dtype = adapter_placement(model)
    attention.acquire(model, undo)
    pool = container(model, adapter_plan.base, ATTRIBUTE, LlamaAdapterPool, undo,
                     attach=lambda c: _attach(model, c, adapter_plan))
    with seeded(config.init_weights_seed):  # a seed leaves the caller's RNG alone
        group = LlamaAdapterGroup(adapter_plan.layers, config.adapter_len, adapter_plan.hidden)
    pool.add(name, group.to(device=device, dtype=dtype).train(pool.training))
    undo.append(lambda: pool.delete_adapter(name))


def _attach(model: nn.Module, pool: LlamaAdapterPool, adapter_plan: LlamaAdapterPlan) -> None:
    """Point every self-attention module's site at the pool; detaching the pool clears them."""
    modules = []
    for path, index in adapter_plan.calls:
        module = model.get_submodule(path)
        site_of(module, create=True).adaption = AdaptionSource(pool, index, adapter_plan.k_name, adapter_plan.v_name,
                                                               adapter_plan.heads, adapter_plan.head_dim)
        modules.append(module)
    pool.on_detach(lambda: [remove_site_part(m, "adaption") for m in modules])
    pool.hook(attention.Release(model))
