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

import torch
from torch import nn

from ..config import PrefixTuningConfig
from ..errors import AdapterError, ConfigError, TargetError
from ..modules.attention import remove_site_part, site_of
from ..modules.batch import current_batch
from ..modules.lora import adapter_dtype
from ..modules.prefix import PrefixGroup, PrefixTuning, PrefixTuningPool
from . import attention
from .bottleneck import _container, _join, base_model_path, blocks
from .families import FAMILIES, family_of
from .lora import check_saved_overlap, wrap_saved
from .state import require_state
from .targets import resolve_modules_to_save

KINDS = ("self_prefix", "encoder_prefix", "cross_prefix")


@dataclass
class PrefixPlan:
    base: str
    calls: list[tuple[str, str, int]]   # (attention module path, kind, layer index) of every attention call
    biases: dict[str, str]              # T5 self-attention path -> its stack's module holding the relative bias
    layers: dict[str, list[int]]        # kind -> layers that get this adapter's prefix
    heads: int
    head_dim: int
    hidden: int
    saved: list[str]

    @property
    def targets(self) -> list[tuple[str]]:
        return [(_join(self.base, "prefix_tuning"),)]


def heads_of(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv, head_dim


def attention_calls(model: nn.Module, where: str) -> list[tuple[str, str, int]]:
    """(path, kind, layer) of every module that calls transformers' attention, from the family row."""
    model_type, family = family_of(model)
    if family is None or not family.attention_calls:
        supported = sorted(k for k, f in FAMILIES.items() if f.attention_calls)
        raise TargetError(f"{where}: attention-level adapters have no row for model_type={model_type!r}; "
                          f"supported families: {', '.join(supported)}.")
    calls = []
    for block, index in blocks(model, family.layers):
        for relative in family.attention_calls:
            path = _join(block, relative)
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            cross = relative.endswith("EncDecAttention")
            encoder = ".encoder." in f".{block}."
            kind = "cross_prefix" if cross else "encoder_prefix" if encoder and _is_seq2seq(model) else "self_prefix"
            calls.append((path, kind, index))
    if not calls:
        raise TargetError(f"{where}: found no attention modules ({', '.join(family.attention_calls)}) in the "
                          f"blocks of {type(model).__name__}.")
    return calls


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def plan(model: nn.Module, name: str, config: PrefixTuningConfig) -> PrefixPlan:
    where = "PrefixTuningConfig"
    attention.check(model, where)
    calls = attention_calls(model, where)
    count = max(i for _, _, i in calls) + 1
    outside = sorted(i for i in config.leave_out if i >= count)
    if outside:
        raise ConfigError(f"{where}.leave_out: layer(s) {outside} do not exist; this model has layers 0..{count - 1}.")
    wanted = {"self_prefix": True, "encoder_prefix": config.encoder_prefix, "cross_prefix": config.cross_prefix}
    layers: dict[str, list[int]] = {}
    for _, kind, index in calls:
        if wanted[kind] and index not in config.leave_out and index not in layers.setdefault(kind, []):
            layers[kind].append(index)
    layers = {k: v for k, v in layers.items() if v}
    if not layers:
        raise ConfigError(f"{where}: no attention layer is left for the prefix (leave_out={config.leave_out}, "
                          f"encoder_prefix={config.encoder_prefix}, cross_prefix={config.cross_prefix}).")
    kv, head_dim = heads_of(model.config)
    saved = resolve_modules_to_save(model, config.modules_to_save, where)
    check_saved_overlap(model, [], saved, where)
    return PrefixPlan(base_model_path(model), calls, _bias_sources(model, calls), layers, kv, head_dim,
                      model.config.hidden_size, saved)


def _bias_sources(model: nn.Module, calls) -> dict[str, str]:
    """T5-style relative position bias: each self-attention path -> the module of its stack that computes the bias
    (the first with `has_relative_attention_bias`); shift_positions gives the prefix keys that bias."""
    holders = {}
    for path, kind, _ in calls:
        module = model.get_submodule(path)
        if kind != "cross_prefix" and getattr(module, "has_relative_attention_bias", False):
            holders.setdefault(path.split(".block.")[0], path)
    return {path: holders[path.split(".block.")[0]] for path, kind, _ in calls
            if kind != "cross_prefix" and path.split(".block.")[0] in holders}


def apply(model: nn.Module, name: str, config: PrefixTuningConfig, prefix_plan: PrefixPlan,
          undo: list[Callable]) -> None:
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = adapter_dtype(reference) if reference is not None else None
    device = reference.device if reference is not None else None
    attention.acquire(model, undo)
    pool = _container(model, prefix_plan.base, "prefix_tuning", PrefixTuningPool, undo,
                      attach=lambda c: _attach(model, c, prefix_plan))
    seed = config.init_weights_seed
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # a seed leaves the caller's RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        prefixes = {kind: PrefixTuning(len(ids), prefix_plan.heads, prefix_plan.head_dim, prefix_plan.hidden, config)
                    for kind, ids in prefix_plan.layers.items()}
    group = PrefixGroup(prefixes, prefix_plan.layers).to(device=device, dtype=dtype)
    gates = None
    if config.use_gating:
        gates = nn.ModuleDict({f"{kind}_{i}": _gate(prefix_plan.hidden, 1 if config.shared_gating else 2)
                               for kind, ids in prefix_plan.layers.items() for i in ids}).to(device=device, dtype=dtype)
        _hook_inputs(model, pool, prefix_plan)
    if config.shift_positions:
        _hook_positions(model, pool)
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
        site.prefix = _source(pool, kind, index, site, model.get_submodule(holder) if holder else None)
        modules.append(module)
    pool.hook(_Call(lambda: [remove_site_part(m, "prefix") for m in modules]))
    pool.hook(attention.Release(model))
    pool.inputs_hooked = pool.positions_hooked = False


def _source(pool: PrefixTuningPool, kind: str, index: int, site, relative: nn.Module | None) -> Callable:
    """The site's prefix callable. With `relative` (T5) and shifted positions (PEFT's layout: the prefix at
    positions 0..P-1, the queries at P + L_k - L_q + i), the prefix keys get the relative position bias."""
    def prefix(module, query, key):
        batch = current_batch(pool)
        if batch is not None:  # each row its own adapter's prefix (per-row selection inside the kernels)
            if relative is not None and any(pool.row_shifts(batch, query.shape[0])):
                raise AdapterError("prefix tuning: T5 prefixes in PEFT's layout (shift_positions=True) do not run in "
                                   "multi-adapter batches (their position bias is per adapter); run them one at a "
                                   "time.")
            found = pool.batch_prefix(kind, index, site.hidden, batch, query.shape[0])
            return None if found is None else (found[0], found[1], None, found[2], found[3])
        found = pool.prefix(kind, index, site.hidden)
        if found is None:
            return None
        bias = None
        if relative is not None and pool.position_shift():
            P, Lq, Lk = found[0].shape[2], query.shape[2], key.shape[2]
            bias = relative.compute_bias(Lq, P, device=query.device, past_seen_tokens=P + Lk - Lq)
        return (*found, bias, None, None)
    return prefix


class _Call:
    """A hook-handle look-alike: remove() runs a function (the container's detach() calls it)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def remove(self) -> None:
        self.fn()


def _hook_inputs(model: nn.Module, pool: PrefixTuningPool, prefix_plan: PrefixPlan) -> None:
    """Gating reads the attention module's input: a pre-hook keeps it on the site for the duration of the call."""
    if pool.inputs_hooked:
        return
    for path, _, _ in prefix_plan.calls:
        module = model.get_submodule(path)
        site = site_of(module)

        def keep(mod, args, kwargs, site=site):
            site.hidden = args[0] if args else kwargs.get("hidden_states")

        def drop(mod, args, kwargs, output, site=site):
            site.hidden = None

        pool.hook(module.register_forward_pre_hook(keep, with_kwargs=True))
        pool.hook(module.register_forward_hook(drop, with_kwargs=True))
    pool.inputs_hooked = True


def _hook_positions(model: nn.Module, pool: PrefixTuningPool) -> None:
    """PEFT's layout: the prefix occupies positions 0..P-1, so real tokens start at P."""
    if pool.positions_hooked or model.config.model_type == "t5":  # T5: relative positions (see _source)
        return
    pad = getattr(model.config, "pad_token_id", None)
    by_padding = model.config.model_type in ("roberta", "xlm-roberta")

    def shift(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = current_batch(pool)
        if batch is not None:  # each row by its own adapter's prefix length
            rows = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
            shifts = pool.row_shifts(batch, rows)
            offset = torch.tensor(shifts).view(-1, 1) if any(shifts) else 0
        else:
            offset = pool.position_shift()
        if not isinstance(offset, torch.Tensor) and not offset:
            return None
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            source = ids if ids is not None else kwargs["inputs_embeds"]
            if isinstance(offset, torch.Tensor):
                offset = offset.to(source.device)
            if by_padding and ids is not None:  # RoBERTa counts real tokens from padding_idx + 1
                real = ids.ne(pad).int()
                positions = (torch.cumsum(real, dim=1) + past) * real + pad
                kwargs["position_ids"] = positions + offset * real
                return args, kwargs
            positions = torch.arange(past, past + source.shape[1], device=source.device).unsqueeze(0)
        if isinstance(offset, torch.Tensor):
            offset = offset.to(positions.device)
        kwargs["position_ids"] = positions + offset
        return args, kwargs

    pool.hook(model.register_forward_pre_hook(shift, with_kwargs=True))
    pool.positions_hooked = True


def eject(model: nn.Module, name: str) -> nn.Module:
    """Replace prefix-tuning adapter `name`'s reparameterisation MLP by the flat prefix it produces: the outputs
    stay the same, the parameters shrink to P·layers·2·H_kv·D numbers per attention kind."""
    state = require_state(model, "eject_prefix_tuning")
    state.check_known([name], "eject_prefix_tuning")
    config = state.configs[name]
    if not isinstance(config, PrefixTuningConfig):
        raise AdapterError(f"eject_prefix_tuning: adapter {name!r} is a {type(config).__name__}, not prefix tuning.")
    pool = model.get_submodule(state.modules[name][0])
    for prefix in pool.prefix_tunings[name].values():
        prefix.eject()
    state.configs[name] = dataclasses.replace(config, flat=True)
    return model
