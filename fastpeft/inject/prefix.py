"""Prefix tuning injection: one PrefixTuningPool at `<base model>.prefix_tuning`, an AttentionSite on every attention
module the family row names, and the model switched to fastpeft's attention (inject/attention.py).

Attention kinds: "self_prefix" (decoder-only and encoder-only models; T5's decoder self-attention),
"encoder_prefix" (T5's encoder self-attention, with `encoder_prefix`), "cross_prefix" (T5's decoder cross-attention,
with `cross_prefix`). `fp.eject_prefix_tuning(model, name)` turns an adapter's reparameterisation into its flat
prefix. `shift_positions` (PEFT's layout) moves the real tokens' positions by P through a forward pre-hook on the
model that sets position_ids; on T5 (relative positions) the prefix keys get the relative position bias of
positions 0..P-1 instead.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import PrefixTuningConfig
from ..errors import AdapterError, ConfigError
from ..modules.attention import remove_site_part, site_of
from ..modules.base import seeded
from ..modules.base_layers import adapter_placement
from ..modules.prefix import PositionShift, PrefixGroup, PrefixSource, PrefixTuning, PrefixTuningPool
from . import attention
from .attention import attention_calls, heads_of
from .families import Family, family_of
from .state import require_state
from .wrapped import refuse_sharded, unwrap_model
from .swap import check_saved_overlap, container, wrap_saved
from .targets import base_model_path, join, resolve_modules_to_save

KINDS = ("self_prefix", "encoder_prefix", "cross_prefix")


@dataclass
class PrefixPlan:
    base: str
    calls: list[tuple[str, str, int]]   # (attention module path, kind, layer index) of every attention call
    biases: dict[str, str]              # self-attention path -> its stack's module computing the relative bias (T5)
    layers: dict[str, list[int]]        # kind -> layers that get this adapter's prefix
    heads: int
    head_dim: int
    hidden: int
    saved: list[str]
    positions: str                      # the family's position rule (families.POSITIONS)

    @property
    def targets(self) -> list[tuple[str]]:
        return [(join(self.base, "prefix_tuning"),)]


def plan(model: nn.Module, name: str, config: PrefixTuningConfig) -> PrefixPlan:
    where = "PrefixTuningConfig"
    attention.check(model, where)
    calls = attention_calls(model, where)
    count = max(i for _, _, i in calls) + 1
    outside = sorted(i for i in config.leave_out if i >= count)
    if outside:
        raise ConfigError(f"{where}.leave_out: layer(s) {outside} do not exist; this model has layers "
                          f"0..{count - 1}: list indices in that range.")
    wanted = {"self_prefix": True, "encoder_prefix": config.encoder_prefix, "cross_prefix": config.cross_prefix}
    layers: dict[str, list[int]] = {}
    for _, kind, index in calls:
        if wanted[kind] and index not in config.leave_out and index not in layers.setdefault(kind, []):
            layers[kind].append(index)
    layers = {k: v for k, v in layers.items() if v}
    if not layers:
        raise ConfigError(f"{where}: no attention layer is left for the prefix (leave_out={config.leave_out}, "
                          f"encoder_prefix={config.encoder_prefix}, cross_prefix={config.cross_prefix}); leave out "
                          "fewer layers (or let encoder_prefix/cross_prefix add theirs).")
    kv, head_dim = heads_of(model.config)
    saved = resolve_modules_to_save(model, config.modules_to_save, where)
    check_saved_overlap(model, [], saved, where)
    _, family = family_of(model)
    return PrefixPlan(base_model_path(model), calls, _bias_sources(model, calls, family), layers, kv, head_dim,
                      model.config.hidden_size, saved, family.positions)


def _bias_sources(model: nn.Module, calls, family: Family) -> dict[str, str]:
    """Families with relative positions (T5): each self-attention path -> the module of its stack that computes the
    relative position bias (the first with `has_relative_attention_bias`); shift_positions gives the prefix keys
    that bias."""
    if family.positions != "relative":
        return {}
    stack = f".{family.layers}."
    holders = {}
    for path, kind, _ in calls:
        module = model.get_submodule(path)
        if kind != "cross_prefix" and getattr(module, "has_relative_attention_bias", False):
            holders.setdefault(path.split(stack)[0], path)
    return {path: holders[path.split(stack)[0]] for path, kind, _ in calls
            if kind != "cross_prefix" and path.split(stack)[0] in holders}


def apply(model: nn.Module, name: str, config: PrefixTuningConfig, prefix_plan: PrefixPlan,
          undo: list[Callable]) -> None:
    device, dtype = adapter_placement(model)
    attention.acquire(model, undo)
    pool = container(model, prefix_plan.base, "prefix_tuning", PrefixTuningPool, undo,
                     attach=lambda c: _attach(model, c, prefix_plan))
    with seeded(config.init_weights_seed):  # a seed leaves the caller's RNG alone
        prefixes = {kind: PrefixTuning(len(ids), prefix_plan.heads, prefix_plan.head_dim, prefix_plan.hidden, config)
                    for kind, ids in prefix_plan.layers.items()}
    group = PrefixGroup(prefixes, prefix_plan.layers).to(device=device, dtype=dtype)
    gates = None
    if config.use_gating:
        gates = nn.ModuleDict({f"{kind}_{i}": _gate(prefix_plan.hidden, 1 if config.shared_gating else 2)
                               for kind, ids in prefix_plan.layers.items() for i in ids}).to(device=device, dtype=dtype)
        _hook_inputs(model, pool, prefix_plan)
    if config.shift_positions:
        _hook_positions(model, pool, prefix_plan)
    pool.add(name, group.train(pool.training), gates, shift=config.shift_positions)
    undo.append(lambda: pool.delete_adapter(name))
    wrap_saved(model, name, prefix_plan.saved, undo)


def _gate(hidden: int, outputs: int) -> nn.Linear:
    gate = nn.Linear(hidden, outputs)
    nn.init.normal_(gate.weight, std=0.02)  # AdapterHub's initialisation
    return gate


def _attach(model: nn.Module, pool: PrefixTuningPool, prefix_plan: PrefixPlan) -> None:
    """Point every attention module's site at the pool; detaching the pool clears them."""
    modules = []
    for path, kind, index in prefix_plan.calls:
        module = model.get_submodule(path)
        site = site_of(module, create=True)
        holder = prefix_plan.biases.get(path)
        site.prefix = PrefixSource(pool, kind, index, site, model.get_submodule(holder) if holder else None)
        modules.append(module)
    pool.on_detach(lambda: [remove_site_part(m, "prefix") for m in modules])
    pool.hook(attention.Release(model))
    pool.inputs_hooked = pool.positions_hooked = False


def _hook_inputs(model: nn.Module, pool: PrefixTuningPool, prefix_plan: PrefixPlan) -> None:
    """Gating reads the attention module's input: hooks keep it on the site for the duration of the call."""
    if pool.inputs_hooked:
        return
    for path, _, _ in prefix_plan.calls:
        module = model.get_submodule(path)
        for handle in site_of(module).keep_input(module):
            pool.hook(handle)
    pool.inputs_hooked = True


def _hook_positions(model: nn.Module, pool: PrefixTuningPool, prefix_plan: PrefixPlan) -> None:
    """PEFT's layout: the prefix occupies positions 0..P-1, so real tokens start at P (relative positions: the
    prefix keys get the position bias instead, PrefixSource)."""
    if pool.positions_hooked or prefix_plan.positions == "relative":
        return
    shift = PositionShift(pool, getattr(model.config, "pad_token_id", None), prefix_plan.positions == "padding")
    pool.hook(model.register_forward_pre_hook(shift, with_kwargs=True))
    pool.positions_hooked = True


def eject(model: nn.Module, name: str) -> nn.Module:
    """Replace prefix-tuning adapter `name`'s reparameterisation MLP by the flat prefix it produces: the outputs
    stay the same, the parameters shrink to P·layers·2·H_kv·D numbers per attention kind."""
    outer, model = model, unwrap_model(model, "eject_prefix_tuning", changes_trainable=True)
    state = require_state(model, "eject_prefix_tuning")
    state.check_known([name], "eject_prefix_tuning")
    refuse_sharded(model, "eject_prefix_tuning")
    config = state.configs[name]
    if not isinstance(config, PrefixTuningConfig):
        prefixes = [n for n, c in state.configs.items() if isinstance(c, PrefixTuningConfig)]
        raise AdapterError(f"eject_prefix_tuning: adapter {name!r} is a {type(config).__name__}, not prefix tuning; "
                           "pass the name of a PrefixTuningConfig adapter (on this model: "
                           f"{', '.join(map(repr, prefixes)) or 'none'}).")
    pool = model.get_submodule(state.modules[name][0])
    for prefix in pool.prefix_tunings[name].values():
        prefix.eject()
    state.configs[name] = dataclasses.replace(config, flat=True)
    return outer
