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
from ..modules.base_layers import describe_linear, is_plain_linear, looks_linear, quantized_kind
from .families import EXPERTS, default_lora_targets, experts_layout, family_of

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
    return isinstance(module, AdapterLayer) or is_plain_linear(module)


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


def resolve_linear_targets(model: nn.Module, config, *, method: str, default: Callable = default_lora_targets,
                           quantized: bool = False) -> list[str]:
    """Module paths of the linear layers `config` targets (`quantized`: the quantized kinds of
    base_layers.quantized_kind too). Raises TargetError before anything changes."""
    targets = config.target_modules
    modules = dict(model_modules(model))
    if targets is None:
        model_type, family = family_of(model)
        if family is None:
            raise TargetError(f"{method}: no default target modules for model_type={model_type!r} (fastpeft has no "
                              "row for this family in fastpeft/inject/families.py); pass target_modules=[...] "
                              f"(linear layer names in this model: {_linear_names(modules)})"
                              + (" and feedforward_modules=[...]" if config.method == "ia3" else
                                 ', a regex, or "all-linear"') + ".")
        targets = default(family)
    if targets == "all-linear":
        heads = _head_names(model)  # with the linears fastpeft has no rule for: refused below, never skipped
        names = [n for n, m in modules.items() if n and (_is_linear(m) or looks_linear(m)) and n not in heads]
    else:
        names = [n for n in modules if n and name_matches(n, targets)]
        _check_all_matched(targets, names, modules, method)
    matched = names
    if config.exclude_modules:
        names = [n for n in names if not name_matches(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        names = _filter_layers(names, config, modules, method)
    refused = _refusal(modules, names, method, quantized)
    if refused:
        raise TargetError(refused)
    if not names:
        raise TargetError(f"{method}: target_modules={targets!r} matched no linear layer in {type(model).__name__}: "
                          f"{_why_none(targets, matched, config, modules)}. Linear layer names in this model: "
                          f"{_linear_names(modules)}.")
    return names


def _why_none(targets, matched: list[str], config, modules: dict) -> str:
    """Why no target is left, and what to change."""
    if matched and config.exclude_modules and all(name_matches(n, config.exclude_modules) for n in matched):
        return (f"exclude_modules={config.exclude_modules!r} removed all {len(matched)} modules it matched; exclude "
                "fewer")
    if matched:
        return (f"layers_to_transform={config.layers_to_transform!r} kept none of the {len(matched)} modules it "
                "matched; choose layers that hold them")
    if targets == "all-linear":
        return "the model has no nn.Linear or Conv1D layer outside its output head; name the modules to adapt"
    if not isinstance(targets, str):
        return "pass names of linear layers"
    example = next((n for n, m in modules.items() if n and _is_linear(m)), "model.layers.0.self_attn.q_proj")
    leaf = example.rsplit(".", 1)[-1]
    regex = ".*\\." + leaf
    return (f"a regex must match a whole module path such as {example!r}, e.g. {regex!r}; or pass a list of "
            f"names, e.g. [{leaf!r}]")


def _linear_names(modules: dict) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and _is_linear(m)})
    return ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")


def _refusal(modules: dict, names: list[str], method: str, quantized: bool = False) -> str | None:
    """Why targets that are not linear layers fastpeft wraps are refused, with the fix that fits what they are: a
    module another adapter copies whole, a linear layer of a kind without a rule, a block, or another kind of leaf."""
    bad = [n for n in names if not (_is_linear(modules[n]) or (quantized and quantized_kind(modules[n])))]
    if not bad:
        return None
    listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
    copied = [n for n in bad if isinstance(modules[n], ModulesToSave)]
    if copied:
        owners = sorted({a for n in copied for a in modules[n].adapter_names})
        return (f"{method}: target_modules matched {listed}, which adapter(s) {', '.join(map(repr, owners))} copy "
                "whole (modules_to_save); a module cannot be both adapted and copied whole: drop it from "
                "target_modules (exclude_modules=[...]), or delete those adapters first.")
    kinds = [n for n in bad if looks_linear(modules[n])]
    if kinds:
        listed = ", ".join(f"{n} ({describe_linear(modules[n])})" for n in kinds[:5]) + (
            ", ..." if len(kinds) > 5 else "")
        return (f"{method}: target_modules matched {listed}: linear layers fastpeft cannot compute with yet: "
                "quantized weights (bitsandbytes' Linear4bit / Linear8bitLt, torchao's quantized tensors such as "
                f"NF4Tensor) or a subclass of nn.Linear with its own forward. {method} adapts nn.Linear (and "
                "subclasses that keep its forward) and transformers' Conv1D with dense floating-point weights. Load "
                "the base model without quantization (e.g. torch_dtype=torch.bfloat16), or leave these layers out "
                "with exclude_modules=[...]." + (
                    " LoRA, rsLoRA, DoRA and IA3 adapters run on bitsandbytes 4-bit/8-bit and torchao quantized "
                    "linears; the other methods do not yet."
                    if any(quantized_kind(modules[n]) for n in kinds) else "") + " Nothing was changed.")
    blocks = [n for n in bad if any(_is_linear(m) for _, m in modules[n].named_modules())]
    if blocks:
        inner = sorted({c.rsplit(".", 1)[-1] for n in blocks for c, m in modules.items()
                        if c.startswith(n + ".") and _is_linear(m)})
        return (f"{method}: target_modules matched {listed}, which are blocks, not linear layers; {method} wraps "
                "linear layers (nn.Linear, GPT-2 Conv1D): name the linear layers inside them instead, e.g. "
                f"{', '.join(repr(c) for c in inner[:6])}.")
    return (f"{method}: target_modules matched {listed}, which are not linear layers; {method} wraps linear layers "
            f"(nn.Linear, GPT-2 Conv1D): target linear layers instead ({_linear_names(modules)}), or train these "
            f"modules whole with modules_to_save={sorted({n.rsplit('.', 1)[-1] for n in bad})!r}.")


def _check_all_matched(targets, names: list[str], modules: dict, method: str) -> None:
    if isinstance(targets, str):
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        candidates = {n.rsplit(".", 1)[-1] for n, m in modules.items() if n and _is_linear(m)}
        hints = "; ".join(f"{t!r}: closest {closest(t, candidates)}" for t in missing)
        raise TargetError(f"{method}: target_modules entr{'y' if len(missing) == 1 else 'ies'} "
                          f"{', '.join(repr(t) for t in missing)} matched no module ({hints}); use the names the "
                          "model has (an entry matches a module's name or the end of its path, e.g. 'q_proj' or "
                          "'self_attn.q_proj').")


def _filter_layers(names: list[str], config, modules: dict, method: str) -> list[str]:
    wanted = config.layers_to_transform
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    present = {layer_index(n, config.layers_pattern) for n in modules if n}
    present.discard(None)
    missing = sorted(wanted - present)
    if missing:
        span = f"{min(present)}..{max(present)}" if present else "none found"
        if present:
            fix = f"use indices in {span}"
        else:
            lists = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and isinstance(m, nn.ModuleList)})
            fix = f"set layers_pattern to the ModuleList that holds the blocks ({', '.join(map(repr, lists))})"
        raise TargetError(f"{method}: layers_to_transform={sorted(wanted)} names layer(s) {missing} that the model "
                          f"does not have (layer indices: {span}; layers_pattern={config.layers_pattern!r}); {fix}.")
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
        raise TargetError(f"{method}: modules_to_save entries matched no module ({hints}); use the names the model "
                          "has (an entry matches a module's name or the end of its path, e.g. 'lm_head').")
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


def resolve_parameter_targets(model: nn.Module, targets, method: str) -> list[tuple[str, list[str]]]:
    """(module path, [parameter names in the module's order]) of every parameter `targets` (target_parameters)
    names, PEFT's rule: a parameter's path equals an entry or ends with "." + entry. Only fused expert tensors of an
    experts class in families.EXPERTS are accepted; raises TargetError (nothing changed) otherwise."""
    found: dict[str, list[str]] = {}
    everything: dict[str, tuple[str, nn.Module, str]] = {}  # parameter path -> (module path, module, name)
    for path, module in model_modules(model):
        holder = module.base_layer if isinstance(module, AdapterLayer) else module  # an adapted experts module
        for pname, _ in holder.named_parameters(recurse=False):
            everything[join(path, pname)] = (path, holder, pname)
    missing = []
    for key in targets:
        hits = [p for p in everything if p == key or p.endswith("." + key)]
        if not hits:
            missing.append(key)
        for p in hits:
            path, holder, pname = everything[p]
            found.setdefault(path, [])
            if pname not in found[path]:
                found[path].append(pname)
    if missing:
        candidates = {".".join(p.rsplit(".", 2)[-2:]) for p, (_, h, n) in everything.items()
                      if getattr(h, n).dim() == 3} or {".".join(p.rsplit(".", 2)[-2:]) for p in everything}
        hints = "; ".join(f"{t!r}: closest {closest(t, candidates)}" for t in missing)
        raise TargetError(f"{method}: target_parameters entr{'y' if len(missing) == 1 else 'ies'} "
                          f"{', '.join(repr(t) for t in missing)} matched no parameter ({hints}); an entry matches a "
                          "parameter's path or its end, e.g. 'mlp.experts.gate_up_proj'.")
    out = []
    for path, names in found.items():
        holder = everything[join(path, names[0])][1]
        layout = experts_layout(holder)
        bad = [n for n in names if layout is None or n not in layout.params]
        if bad:
            listed = ", ".join(f"{join(path, n)} {tuple(getattr(holder, n).shape)}" for n in bad[:4])
            known = ", ".join(sorted(EXPERTS))
            why = (f"{type(holder).__name__} has no row in fastpeft's experts table (fastpeft/inject/families.py "
                   f"EXPERTS: {known})" if layout is None else
                   f"{type(holder).__name__}'s adaptable tensors are {', '.join(layout.params)}")
            raise TargetError(f"{method}: target_parameters matched {listed}, which {'is' if len(bad) == 1 else 'are'}"
                              f" not a fused expert tensor of a known layout: {why}. Target linear layers with "
                              "target_modules, and expert tensors by their names, e.g. 'mlp.experts.gate_up_proj'. "
                              "Nothing was changed.")
        out.append((path, [n for n in layout.params if n in names]))
    return out
