"""The adapter lifecycle on a model: add, activate, disable, merge, unmerge, delete, unload.

Every call validates everything first and then mutates; if a mutation fails half way, the steps already
taken are undone, so a failing call leaves the model as it was.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterError, ConfigError
from ..modules import AdapterContainer, AdapterLayer, IA3Linear, ModulesToSave
from ..modules.batch import ATTRIBUTE as BATCH_ATTRIBUTE
from . import adalora, bottleneck, ia3, lora, prefix
from . import batch as batching
from . import llama_adapter as llama_adapter_inject
from . import prompt as prompt_inject
from .state import AdapterState, clear_state, get_state, install_all, require_state, uninstall_all
from .swap import holder, unwrap, wrappers
from .wrapped import refuse_sharded, unwrap_model

HANDLERS = {"lora": lora, "ia3": ia3, "adalora": adalora, "bottleneck": bottleneck, "prefix_tuning": prefix,
            "prompt_tuning": prompt_inject, "p_tuning": prompt_inject, "llama_adapter": llama_adapter_inject}
MERGEABLE = {"lora", "ia3", "adalora"}
LAYER_METHODS = {"lora", "ia3"}  # adapters that live only in the layers they wrap (and modules_to_save copies)


class Stack(tuple):
    """Adapters that run one after another in every layer, e.g. MAD-X's language then task adapter:
    `fp.set_active_adapters(model, fp.Stack("lang", "task"))`. (A plain list of names means the same.)"""

    def __new__(cls, *names: str):
        return super().__new__(cls, names)

    def __repr__(self) -> str:
        return f"Stack({', '.join(repr(n) for n in self)})"


def add_adapter(model: nn.Module, name: str, config: AdapterConfig) -> nn.Module:
    """Inject adapter `name` described by `config` into `model` in place; returns the model.

    The first adapter added becomes active; later ones are added inactive (see set_active_adapters).
    Only the parameters of active adapters are trainable; the base model is frozen.
    """
    outer, model = model, unwrap_model(model, "add_adapter", changes_trainable=True)
    refuse_sharded(model, "add_adapter", adds=True)
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"add_adapter: config must be a fastpeft config such as fp.LoRAConfig(...), "
                          f"got {type(config).__name__}.")
    config.validate()  # again: fields may have been changed since the config was made
    _check_new_name(model, name)
    if config.method not in HANDLERS:
        raise ConfigError(f"add_adapter: {type(config).__name__} adapters cannot be injected yet (methods: "
                          f"{', '.join(sorted(HANDLERS))}).")
    handler = HANDLERS[config.method]
    plan = handler.plan(model, name, config)
    fresh = get_state(model) is None
    state = get_state(model, create=True)
    undo: list[Callable] = []
    try:
        handler.apply(model, name, config, plan, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        if fresh:
            clear_state(model)
        raise
    state.configs[name] = config
    state.modules[name] = [path for path, *_ in plan.targets]
    state.saved[name] = list(plan.saved)
    batching.register(state, name, config)
    if fresh:
        batching.install(model, state)
        install_all(model, state)  # e.g. save_pretrained writing the adapters (checkpoint/hf.py)
    if not state.active:
        state.active = [name]
    if name not in state.active and config.method in LAYER_METHODS:
        _refresh_new(model, state, name)  # only its own layers change: adding the 1000th adapter stays cheap
    else:
        _refresh(model, state)
    return outer


def _check_new_name(model: nn.Module, name) -> None:
    if not isinstance(name, str) or not name or "." in name or not name.replace("-", "_").isidentifier():
        raise AdapterError(f"add_adapter: adapter name {name!r} is not usable; use a non-empty name of letters, "
                           "digits, '_' or '-' (no dots), e.g. 'default'.")
    state = get_state(model)
    if state is not None and name in state.configs:
        raise AdapterError(f"add_adapter: the model already has an adapter named {name!r}; pick another name or "
                           "fp.delete_adapter(model, name) first.")


def set_active_adapters(model: nn.Module, names: str | Iterable[str] | None) -> None:
    """Activate these adapters (None: none, the base model alone). Their parameters become the trainable ones.
    Bottleneck adapters at the same site run in the order given (fp.Stack); LoRA-style updates add up."""
    inner = unwrap_model(model, "set_active_adapters")
    state = require_state(inner, "set_active_adapters")
    if names is not None and not isinstance(names, (str, Iterable)):
        raise AdapterError(f"set_active_adapters: expected an adapter name, a list of names (or fp.Stack) or None, "
                           f"got {names!r} ({type(names).__name__}); pass e.g. 'a' or ['a', 'b'] (names, not ids).")
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    state.check_known(names, "set_active_adapters")
    if set(names) != set(state.active):  # the trainable parameters change: refused inside DDP
        unwrap_model(model, "set_active_adapters", changes_trainable=True)
    state.active = list(dict.fromkeys(names))
    _refresh(inner, state)


def _refresh(model: nn.Module, state: AdapterState) -> None:
    """Push the active set down to every wrapper, and make exactly the active adapters' parameters trainable."""
    active = set(state.active)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in wrappers(model):
        module.active_adapters = [n for n in state.active if n in module.adapter_names]
        module.__dict__[BATCH_ATTRIBUTE] = state.batch
        if isinstance(module, (AdapterLayer, AdapterContainer)):
            for n in module.adapter_names:
                for p in module.adapter_parameters(n):
                    p.requires_grad_(n in active)
        else:
            for n, copy in module.modules_to_save.items():
                copy.requires_grad_(n in active)
    for n in state.active:
        bias = getattr(state.configs[n], "bias", "none")
        if bias == "all":
            for pname, p in model.named_parameters():
                if pname.rsplit(".", 1)[-1] == "bias":
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for path in state.modules[n]:
                b = model.get_submodule(path).base_layer.bias
                if b is not None:
                    b.requires_grad_(True)


def _refresh_new(model: nn.Module, state: AdapterState, name: str) -> None:
    """_refresh for a new, inactive adapter of a layer method: its wrappers learn the model's batch context, and
    its parameters are frozen; nothing else changes."""
    for path in state.modules[name] + state.saved[name]:
        module = model.get_submodule(path)
        while True:
            module.__dict__[BATCH_ATTRIBUTE] = state.batch
            if isinstance(module, ModulesToSave):
                module.modules_to_save[name].requires_grad_(False)
            elif name in module.adapter_names:
                for p in module.adapter_parameters(name):
                    p.requires_grad_(False)
            if not (isinstance(module, AdapterLayer) and isinstance(module.base_layer, AdapterLayer)):
                break
            module = module.base_layer


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes as its base model (adapters stay loaded)."""
    inner = unwrap_model(model, "disable_adapters")
    require_state(inner, "disable_adapters")
    layers = wrappers(inner)
    merged = [n for n, m in layers if getattr(m, "merged_adapters", None)]
    if merged:
        raise AdapterError(f"disable_adapters: adapters are merged into the base weights of {merged[0]} (and "
                           f"{len(merged) - 1} more); call fp.unmerge_adapter(model) first.")
    before = [m.disabled for _, m in layers]
    for _, m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for (_, m), flag in zip(layers, before):
            m.disabled = flag


def merge_adapter(model: nn.Module, name: str) -> nn.Module:
    """Fold adapter `name` into the base weights (LoRA: W += s·B·A; IA3: W ⊙= l); unmerge_adapter restores them."""
    outer, model = model, unwrap_model(model, "merge_adapter")
    state = require_state(model, "merge_adapter")
    state.check_known([name], "merge_adapter")
    refuse_sharded(model, "merge_adapter")
    if state.configs[name].method not in MERGEABLE:
        raise AdapterError(f"merge_adapter: {type(state.configs[name]).__name__} adapters cannot be merged (they are "
                           f"not a change of the base weights); keep adapter {name!r} unmerged, or remove it with "
                           "fp.delete_adapter / fp.unload(model).")
    layers = _mergeable_layers(model, name, "merge_adapter")
    _merge_all(model, [(name, layers)])
    return outer


def _mergeable_layers(model: nn.Module, name: str, where: str) -> list[AdapterLayer]:
    """The layers holding adapter `name`, after checking that merging it there is possible and not done yet."""
    layers = [m for _, m in wrappers(model) if isinstance(m, AdapterLayer) and name in m.adapter_names]
    nested = [p for p, m in wrappers(model) if isinstance(m, IA3Linear) and m.wraps_adapters
              and (name in m.adapter_names or name in m.base_layer.adapter_names)]
    if nested:
        raise AdapterError(f"{where}: {nested[0]} holds both LoRA and IA3 adapters; merging works on layers "
                           f"whose adapters are of one method. Delete the other method's adapters there first.")
    if any(name in m.merged_adapters for m in layers):
        raise AdapterError(f"{where}: adapter {name!r} is already merged; merging it again would add its "
                           "update twice. Call fp.unmerge_adapter(model) to restore the base weights first.")
    return layers


def _merge_all(model: nn.Module, plan: list[tuple[str, list[AdapterLayer]]]) -> None:
    """Merge each adapter into its layers; if any merge fails, every layer is back to its weights before the call."""
    done: list[AdapterLayer] = []
    try:
        for name, layers in plan:
            for m in layers:
                m.merge(name)
                done.append(m)
    except BaseException:
        for m in reversed(done):
            previous = m.merged_adapters[:-1]
            m.unmerge()
            for n in previous:
                m.merge(n)
        raise


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Restore every merged layer's original base weight, bit for bit."""
    inner = unwrap_model(model, "unmerge_adapter")
    require_state(inner, "unmerge_adapter")
    refuse_sharded(inner, "unmerge_adapter")
    for _, m in wrappers(inner):
        if isinstance(m, AdapterLayer):
            m.unmerge()
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`; layers left without adapters get their original module back."""
    outer, model = model, unwrap_model(model, "delete_adapter")
    state = require_state(model, "delete_adapter")
    state.check_known([name], "delete_adapter")
    refuse_sharded(model, "delete_adapter")
    for path in state.modules[name]:
        if name in holder(model, path, name)[1].merged_adapters:
            raise AdapterError(f"delete_adapter: adapter {name!r} is merged into {path}; "
                               "call fp.unmerge_adapter(model) first.")
    for path in state.modules[name] + state.saved[name]:
        path, module = holder(model, path, name)
        module.delete_adapter(name)
        if not module.adapter_names:
            unwrap(model, path, module)
    for handle in state.hooks.pop(name, []):
        handle.remove()
    for table in (state.configs, state.modules, state.saved):
        table.pop(name)
    state.batch.release(name)
    state.active = [n for n in state.active if n != name]
    if state.configs:
        _refresh(model, state)
    else:
        _restore_requires_grad(model, state)
        batching.uninstall(model, state)
        uninstall_all(model, state)
        clear_state(model)
    return outer


def unload(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Remove every adapter and give the original modules back.

    merge=False: merged weights are first restored, so the model is bit-identical to before add_adapter.
    merge=True: active adapters are merged and kept in the weights (PEFT's merge_and_unload), and the active
    modules_to_save copies replace their originals. Adapters that cannot be merged (bottleneck, Compacter,
    invertible) are removed either way. Returns the model without fastpeft's layers (and without DDP or
    torch.compile wrappers, when it was passed in one).
    """
    model = unwrap_model(model, "unload")
    state = require_state(model, "unload")
    refuse_sharded(model, "unload")
    if merge:  # every merge checked before the first one runs: a refusal leaves the weights as they were
        merged = {n for _, m in wrappers(model) if isinstance(m, AdapterLayer) for n in m.merged_adapters}
        _merge_all(model, [(name, _mergeable_layers(model, name, "unload(merge=True)")) for name in state.active
                           if state.configs[name].method in MERGEABLE and name not in merged])
    for path, module in reversed(wrappers(model)):  # inner layers first (LoRA inside IA3)
        if isinstance(module, AdapterLayer) and not merge:
            module.unmerge()
        keep = None
        if merge and isinstance(module, ModulesToSave):
            keep = next((module.modules_to_save[n] for n in module.active_adapters), None)
        unwrap(model, path, module, replacement=keep)
    for handle in (h for handles in state.hooks.values() for h in handles):
        handle.remove()
    _restore_requires_grad(model, state)
    batching.uninstall(model, state)
    uninstall_all(model, state)
    clear_state(model)
    return model


def _restore_requires_grad(model: nn.Module, state: AdapterState) -> None:
    for pname, p in model.named_parameters():
        if pname in state.original_requires_grad:
            p.requires_grad_(state.original_requires_grad[pname])


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    trainable = total = 0
    for p in unwrap_model(model, "trainable_parameters").parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters on `model` and their configs (empty when there are none)."""
    state = get_state(unwrap_model(model, "adapters"))
    return dict(state.configs) if state else {}
