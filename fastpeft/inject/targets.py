"""Target resolution: which modules of a model a config names, PEFT-style, with errors that suggest names.

* a list of names: a module matches a name if its path equals it or ends with "." + name;
* a string: a regular expression matched against the whole module path;
* "all-linear": every linear layer (nn.Linear, Conv1D) except the output head and classifier heads.
`layers_to_transform` keeps modules whose layer index (the number after the `layers_pattern` segment,
by default the first numeric segment of the path) is listed.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from torch import nn

from ..errors import TargetError, closest
from ..modules import AdapterContainer, AdapterLayer, ModulesToSave
from ..modules.base_layers import is_conv1d, is_plain_linear
from .families import default_lora_targets, family_of

WRAPPERS = (AdapterLayer, ModulesToSave, AdapterContainer)
CLASSIFIER_HEADS = ("score", "classifier")


def model_modules(model: nn.Module, *, nested: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of fastpeft wrappers (their base layer, adapters, copies); with `nested`,
    also the adapter layers a wrapper wraps in turn (LoRA inside IA3: '<path>.base_layer')."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        yield name, module
        if isinstance(module, WRAPPERS):
            inside.append(name + "." if name else "")
            while nested and isinstance(module, AdapterLayer) and isinstance(module.base_layer, AdapterLayer):
                name, module = f"{name}.base_layer", module.base_layer
                yield name, module


def name_matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The transformer-block index in a module path, e.g. 3 in 'model.layers.3.self_attn.q_proj'."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if patterns is None:  # the first numeric segment, also at the start ('3.attn.q' in an nn.Sequential)
        match = re.search(r"(?:^|\.)(\d+)(?=\.|$)", name)
        return int(match.group(1)) if match else None
    for match in re.finditer(r"(?:^|\.)([^.]+)\.(\d+)(?=\.|$)", name):
        if match.group(1) in patterns:
            return int(match.group(2))
    return None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, AdapterLayer) or is_plain_linear(module) or is_conv1d(module)


def _head_names(model: nn.Module) -> set[str]:
    """Output embedding and classifier heads, and the layers inside them: never part of "all-linear"."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        heads.append(get_out())
    heads += [getattr(model, n, None) for n in CLASSIFIER_HEADS]
    heads = [h for h in heads if isinstance(h, nn.Module)]
    names = {name for name, module in model.named_modules() if any(module is h for h in heads)}
    return {name for name, _ in model.named_modules() if any(name == h or name.startswith(h + ".") for h in names)}


def resolve_linear_targets(model: nn.Module, config, *, method: str,
                           default: Callable = default_lora_targets) -> list[str]:
    """Module paths of the linear layers `config` targets. Raises TargetError before anything changes."""
    targets = config.target_modules
    if targets is None:
        model_type, family = family_of(model)
        if family is None:
            raise TargetError(f"{method}: no default target modules for model_type={model_type!r}; pass "
                              "target_modules=[...] (module names), a regex, or \"all-linear\".")
        targets = default(family)
    modules = dict(model_modules(model))
    if targets == "all-linear":
        heads = _head_names(model)
        names = [n for n, m in modules.items() if n and _is_linear(m) and n not in heads]
    else:
        names = [n for n in modules if n and name_matches(n, targets)]
        _check_all_matched(targets, names, modules, method)
    if config.exclude_modules:
        names = [n for n in names if not name_matches(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        names = _filter_layers(names, config, modules, method)
    unsupported = [f"{n} ({type(modules[n]).__name__})" for n in names if not _is_linear(modules[n])]
    if unsupported:
        raise TargetError(f"{method}: target_modules matched module(s) that are not linear layers: "
                          f"{', '.join(unsupported[:5])}. {method} wraps nn.Linear and GPT-2 Conv1D layers; "
                          "name the projections inside those modules instead (e.g. 'q_proj').")
    if not names:
        linear = [n for n, m in modules.items() if n and _is_linear(m)]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise TargetError(f"{method}: target_modules={targets!r} matched no linear layer in "
                          f"{type(model).__name__}. Linear layer names in this model: {', '.join(leaves[:12])}.")
    return names


def _check_all_matched(targets, names: list[str], modules: dict, method: str) -> None:
    if isinstance(targets, str):
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        candidates = {n.rsplit(".", 1)[-1] for n, m in modules.items() if n and _is_linear(m)}
        hints = "; ".join(f"{t!r}: closest {closest(t, candidates)}" for t in missing)
        raise TargetError(f"{method}: target_modules entr{'y' if len(missing) == 1 else 'ies'} "
                          f"{', '.join(repr(t) for t in missing)} matched no module ({hints}).")


def _filter_layers(names: list[str], config, modules: dict, method: str) -> list[str]:
    wanted = config.layers_to_transform
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    present = {layer_index(n, config.layers_pattern) for n in modules if n}
    present.discard(None)
    missing = sorted(wanted - present)
    if missing:
        span = f"{min(present)}..{max(present)}" if present else "none found"
        raise TargetError(f"{method}: layers_to_transform={sorted(wanted)} names layer(s) {missing} that the model "
                          f"does not have (layer indices: {span}; layers_pattern={config.layers_pattern!r}).")
    return [n for n in names if layer_index(n, config.layers_pattern) in wanted]


def resolve_modules_to_save(model: nn.Module, names, method: str) -> list[str]:
    """Module paths named by `modules_to_save` (suffix match, as PEFT)."""
    if not names:
        return []
    modules = dict(model_modules(model))
    found, missing = [], []
    for key in names:
        hits = [n for n in modules if n and (n == key or n.endswith("." + key))]
        (found.extend(hits) if hits else missing.append(key))
    if missing:
        leaves = {n.rsplit(".", 1)[-1] for n in modules if n}
        hints = "; ".join(f"{k!r}: closest {closest(k, leaves)}" for k in missing)
        raise TargetError(f"{method}: modules_to_save entries matched no module ({hints}).")
    return sorted(set(found))


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module at path `name`."""
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def join(*parts: str) -> str:
    """A module path from its parts, empty parts skipped ("" is the model itself)."""
    return ".".join(p for p in parts if p)


def base_model_path(model: nn.Module) -> str:
    """The path of the model's base model (its `base_model`, e.g. "model" in a LlamaForCausalLM)."""
    base = getattr(model, "base_model", model)
    return next((n for n, m in model.named_modules() if m is base), "")


def blocks(model: nn.Module, layers: str) -> list[tuple[str, int]]:
    """(path, index) of every transformer block: the children of a ModuleList called `layers`."""
    found = []
    for name, module in model_modules(model):
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == layers:
            found += [(f"{name}.{i}", i) for i in range(len(module))]
    return found
