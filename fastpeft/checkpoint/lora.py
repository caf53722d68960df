"""LoRA adapters in PEFT's on-disk format (peft_type "LORA").

Tensor keys are PEFT's: "base_model.model." + module path + one of
  .lora_A.weight (r, in) and .lora_B.weight (out, r)   each layer the adapter wraps
  .lora_A.weight (r·E, in), .lora_B.weight (out, r·E)  each fused expert tensor (target_parameters) of an experts
                                                       module; PEFT nests one wrapper per tensor, the module's first
                                                       tensor innermost: with k tensors targeted there, the i-th
                                                       (0-based, module order) is under <path> + ".base_layer"·(k-1-i)
  .lora_magnitude_vector (out,)                        DoRA (use_dora=True): the magnitude of each layer
  .<key>                                               each state_dict entry of a `modules_to_save` module (its copy)
  .base_layer.bias                                     bias="lora_only" and "all": the bias of each wrapped layer
  every other "*.bias" entry of the model              bias="all"; inside a modules_to_save module PEFT names them
                                                       <path>.original_module.<key> and <path>.modules_to_save.<key>
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import LoRAConfig
from ..errors import CheckpointError
from ..inject import lora as lora_inject
from ..inject.swap import holder
from ..modules.moe_lora import LoRAExperts, expert_features
from .files import (INCOMPLETE_FIX, MISMATCH_FIX, add_and_fill, base_state, check_fields, few, fill_saved, in_out,
                    peft_modules_to_save, peft_target_modules, plan_for_checkpoint, present_modules_to_save,
                    read_tensors, saved_requirements)

# adapter_config.json fields -> LoRAConfig fields
_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
           "exclude_modules": "exclude_modules", "layers_to_transform": "layers_to_transform",
           "layers_pattern": "layers_pattern", "modules_to_save": "modules_to_save", "bias": "bias",
           "use_rslora": "use_rslora", "use_dora": "use_dora", "rank_pattern": "rank_pattern",
           "alpha_pattern": "alpha_pattern", "target_parameters": "target_parameters"}
# Fields that do not change what a loaded adapter computes: metadata, the layer type (fan_in_fan_out follows it,
# as in PEFT), and initialisation schemes (the loaded tensors replace the initial ones).
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out", "init_lora_weights", "megatron_core", "runtime_config",
            "qalora_group_size", "ensure_weight_tying", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config"}
# PEFT features fastpeft does not implement: a checkpoint that turns one on is refused.
_UNSUPPORTED = {"lora_bias": "a bias on lora_B", "layer_replication": "layer replication",
                "trainable_token_indices": "trainable tokens", "use_qalora": "QALoRA",
                "alora_invocation_tokens": "activated LoRA (aLoRA)", "use_bdlora": "block-diagonal LoRA",
                "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
                "velora_config": "VeLoRA", "megatron_config": "Megatron parallel layers"}


# -------------------------------------------------------------------------------------------------------- saving
def export(model: nn.Module, name: str, config: LoRAConfig, targets: list[str], saved: list[str]
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's tensors (keys without the prefix) and adapter_config.json fields for LoRA adapter `name`.

    The config lists the layers the adapter wraps (leaf names when those pick exactly the same layers, else full
    module paths), so PEFT and fastpeft target the same layers when they load it.
    """
    tensors: dict[str, torch.Tensor] = {}
    experts = [p for p in targets if isinstance(model.get_submodule(p), LoRAExperts)]
    for path in experts:
        layer = model.get_submodule(path)
        for key, pname in _expert_keys(path, layer.targets[name]):
            tensors[f"{key}.lora_A.weight"] = layer.lora_A[pname][name]
            tensors[f"{key}.lora_B.weight"] = layer.lora_B[pname][name]
    targets = [p for p in targets if p not in experts]
    for path in targets:
        layer = holder(model, path, name)[1]  # the LoRA layer, inside the IA3 layer where one wraps it
        tensors[f"{path}.lora_A.weight"] = layer.lora_A[name]
        tensors[f"{path}.lora_B.weight"] = layer.lora_B[name]
        if layer.is_dora(name):
            tensors[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    for path in saved:
        copy = model.get_submodule(path).modules_to_save[name]
        for key, value in copy.state_dict().items():
            tensors[f"{path}.{key}"] = value
            if config.bias == "all" and _is_bias(key):  # PEFT's bias="all" also keeps the copy's biases like this
                tensors[f"{path}.modules_to_save.{_peft_copy_key(key, name)}"] = value
    if config.bias != "none":  # only then: the state_dict() of a bitsandbytes 4-bit model on the CPU (0.50)
        base = base_state(model)  # corrupts its weights after a forward, so it is not called without need
        for key, clean in _bias_keys(base, config.bias, set(targets), saved).items():
            tensors[key] = base[clean]
    return tensors, _peft_config(model, name, config, targets, experts, saved)


def _expert_keys(path: str, tensors: list[str]) -> list[tuple[str, str]]:
    """(PEFT's module key, tensor name) of each targeted tensor of the experts module at `path` (module order)."""
    return [(path + ".base_layer" * (len(tensors) - 1 - i), pname) for i, pname in enumerate(tensors)]


def _peft_target_parameters(model: nn.Module, name: str, experts: list[str]) -> list[str] | None:
    """target_parameters as PEFT's config lists them: "<module leaf>.<tensor>" when those pick exactly the adapted
    tensors among the model's parameters, else full parameter paths."""
    if not experts:
        return None
    chosen = {f"{p}.{t}" for p in experts for t in model.get_submodule(p).targets[name]}
    short = sorted({".".join(c.rsplit(".", 2)[-2:]) for c in chosen})
    picked = {k for k in base_state(model) if any(k == s or k.endswith("." + s) for s in short)}
    return short if picked == chosen else sorted(chosen)


def _peft_config(model: nn.Module, name: str, config: LoRAConfig, targets: list[str], experts: list[str],
                 saved: list[str]) -> dict:
    """The adapter_config.json PEFT writes for an equivalent LoraConfig."""
    target_modules = peft_target_modules(model, targets, saved, config.layers_to_transform)
    modules_to_save = peft_modules_to_save(model, saved)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    alpha = config.alpha
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name, "revision": None,
        "inference_mode": True, "r": config.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": config.dropout,
        "target_modules": target_modules, "exclude_modules": None, "modules_to_save": modules_to_save,
        "layers_to_transform": config.layers_to_transform, "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "bias": config.bias, "use_rslora": config.use_rslora, "init_lora_weights": config.init_weights,
        "fan_in_fan_out": any(model.get_submodule(p).fan_in_fan_out for p in targets),
        "use_dora": config.use_dora, "lora_bias": False, "layer_replication": None,
        "target_parameters": _peft_target_parameters(model, name, experts),
        "trainable_token_indices": None,
    }


# -------------------------------------------------------------------------------------------------------- loading
def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    """Add LoRA adapter `name` from a checkpoint (PEFT's or fastpeft's) whose config `raw` was read already.

    With bias="all"/"lora_only" the checkpoint's biases replace the base model's, as in PEFT (delete_adapter
    does not restore them). Everything is checked before the model changes.
    """
    config = _config_from_peft(raw, config_path, model)
    tensors, prefix = read_tensors(weights_path)
    lora_plan = plan_for_checkpoint(lora_inject.plan, model, name, config, config_path, raw)
    assignments = _match(model, config, lora_plan, tensors, weights_path, prefix)
    add_and_fill(model, name, config, lambda undo: _fill(model, name, assignments, undo))
    return model


def _config_from_peft(data: dict, path: str, model: nn.Module) -> LoRAConfig:
    """The LoRAConfig an adapter_config.json describes; refuses anything fastpeft would silently compute wrong."""
    check_fields(data, set(_FIELDS), _IGNORED, path, "LoRA", _UNSUPPORTED)
    kwargs = {ours: data[theirs] for theirs, ours in _FIELDS.items() if data.get(theirs) is not None}
    if data.get("init_lora_weights") in (True, False, "gaussian"):
        kwargs["init_weights"] = data["init_lora_weights"]
    kwargs["modules_to_save"] = present_modules_to_save(model, kwargs.get("modules_to_save"))
    try:
        return LoRAConfig(**kwargs)
    except (ValueError, TypeError, AttributeError) as exc:  # ConfigError, or a field of the wrong JSON type
        raise CheckpointError(f"load_adapter: {path} holds a LoRA config fastpeft cannot use: {exc} (fastpeft "
                              "calls lora_alpha alpha and lora_dropout dropout.)") from None


def _match(model: nn.Module, config: LoRAConfig, lora_plan, tensors: dict, path: str, prefix: str) -> list[tuple]:
    """Pair every checkpoint tensor with its destination, checking names and shapes; nothing is changed."""
    targets = {t[0]: t[1] for t in lora_plan.targets if not isinstance(t, lora_inject.ExpertTarget)}
    required: dict[str, tuple] = {}
    for t in lora_plan.targets:
        if isinstance(t, lora_inject.ExpertTarget):
            required.update(_expert_requirements(model, t))
    for p, r in targets.items():
        in_f, out_f = in_out(model.get_submodule(p))
        required[f"{p}.lora_A.weight"] = ("lora_A", p, (r, in_f), f"(r, in_features) of {p}", 0)
        required[f"{p}.lora_B.weight"] = ("lora_B", p, (out_f, r), f"(out_features, r) of {p}", 1)
        if config.use_dora:
            required[f"{p}.lora_magnitude_vector"] = ("magnitude", p, (out_f,), f"(out_features,) of {p}", None)
    required.update(saved_requirements(model, lora_plan.saved))
    base = base_state(model)
    optional = {key: ("bias", base[clean], tuple(base[clean].shape), f"the model's {clean}", None)
                for key, clean in _bias_keys(base, config.bias, set(targets), lora_plan.saved).items()}

    def redundant(key: str) -> bool:  # PEFT's bias="all" copies of modules_to_save biases: the same values again
        return config.bias == "all" and any(key.startswith(f"{s}.modules_to_save.") for s in lora_plan.saved)

    unexpected = [k for k in tensors if k not in required and k not in optional and not redundant(k)]
    if unexpected:
        wrapped = ", ".join(sorted(targets)[:3]) + (f" (+{len(targets) - 3} more)" if len(targets) > 3 else "")
        raise CheckpointError(f"load_adapter: {path} has {len(unexpected)} tensor(s) that match no module this "
                              f"adapter wraps or saves in {type(model).__name__}: {few(unexpected, prefix)}. "
                              f"From its config the adapter wraps {wrapped or 'nothing'}, bias={config.bias!r}, "
                              f"modules_to_save={config.modules_to_save!r}; the weights and the config come from "
                              f"different adapters or base models: {MISMATCH_FIX}.")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise CheckpointError(f"load_adapter: {path} lacks {len(missing)} tensor(s) its config calls for: "
                              f"{few(missing, prefix)}; {INCOMPLETE_FIX}.")
    out = []
    for key, tensor in sorted(tensors.items()):
        if redundant(key):
            continue
        kind, where, shape, what, rank_dim = required.get(key) or optional[key]
        if tuple(tensor.shape) != shape:
            rank_only = (rank_dim is not None and len(tensor.shape) == 2
                         and all(tensor.shape[d] == shape[d] for d in range(2) if d != rank_dim))
            why = ("its r (or rank_pattern) in adapter_config.json disagrees with its tensors; fix r or re-save "
                   "the adapter" if rank_only else "the adapter was saved from a base model with other layer sizes; "
                   "load it into the model it was trained on")
            raise CheckpointError(f"load_adapter: {path}: tensor {prefix + key!r} has shape {tuple(tensor.shape)} "
                                  f"but {what} is {shape}: {why}.")
        out.append((kind, where, tensor))
    return out


def _fill(model: nn.Module, name: str, assignments: list[tuple], undo: list) -> None:
    """Copy the matched tensors into the new adapter (and the biases into the base model, undoably)."""
    for kind, where, tensor in assignments:
        if kind in ("expert_A", "expert_B"):
            layer = model.get_submodule(where[0])
            (layer.lora_A if kind == "expert_A" else layer.lora_B)[where[1]][name].copy_(tensor)
        elif kind in ("lora_A", "lora_B", "magnitude"):  # the LoRA layer: inside the IA3 layer where one wraps it
            layer = holder(model, where, name)[1]
            target = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}.get(kind, layer.lora_magnitude_vector)
            target[name].copy_(tensor)
        elif kind == "saved":
            fill_saved(model, name, where, tensor)
        else:
            undo.append(lambda where=where, old=where.detach().clone(): where.copy_(old))
            where.copy_(tensor)


def _expert_requirements(model: nn.Module, target) -> dict[str, tuple]:
    """The tensors an experts module's adapter needs: key -> (kind, (path, tensor), shape, what, rank dim)."""
    module = model.get_submodule(target.path)
    experts = module.base_layer if isinstance(module, LoRAExperts) else module
    order = [n for n, _ in experts.named_parameters(recurse=False) if n in target.ranks]
    E = experts.num_experts
    out = {}
    for key, pname in _expert_keys(target.path, order):
        in_f, out_f = expert_features(experts, pname, target.layout.params[pname])
        r = target.ranks[pname][0]
        out[f"{key}.lora_A.weight"] = ("expert_A", (target.path, pname), (r * E, in_f),
                                       f"(r·num_experts, in_features) of {target.path}.{pname}", 0)
        out[f"{key}.lora_B.weight"] = ("expert_B", (target.path, pname), (out_f, r * E),
                                       f"(out_features, r·num_experts) of {target.path}.{pname}", 1)
    return out


# ------------------------------------------------------------------------------------------------ biases
def _is_bias(key: str) -> bool:
    return key == "bias" or key.endswith(".bias")


def _peft_copy_key(key: str, name: str) -> str:
    """How PEFT names entry `key` of adapter `name`'s modules_to_save copy: the name dropped only before a leaf."""
    return key if "." not in key else f"{name}.{key}"


def _bias_keys(base: dict[str, torch.Tensor], bias: str, targets: set[str], saved: list[str]) -> dict[str, str]:
    """PEFT key (no prefix) -> base key, for the base-model biases PEFT saves with an adapter."""
    out = {}
    if bias == "none":
        return out
    for clean in base:
        if not _is_bias(clean):
            continue
        owner = clean.rpartition(".")[0]
        if owner in targets:
            out[f"{owner}.base_layer.bias"] = clean
        elif bias == "all":
            holder = next((s for s in saved if clean.startswith(s + ".")), None)
            out[f"{holder}.original_module{clean[len(holder):]}" if holder else clean] = clean
    return out


