"""Save and load LoRA adapters in PEFT's on-disk format, so adapters move between fastpeft and PEFT both ways.

    fp.save_adapter(model, "out/chat", "default")   # PeftModel.from_pretrained(base, "out/chat") reads it
    fp.load_adapter(model, "peft-dir", name="chat")  # reads what PeftModel.save_pretrained wrote

A checkpoint is a directory with `adapter_config.json` (PEFT's LoraConfig fields) and `adapter_model.safetensors`
(never pickle). Tensor keys are PEFT's: "base_model.model." + module path + one of
  .lora_A.weight (r, in) and .lora_B.weight (out, r)   each layer the adapter wraps
  .<key>                                               each state_dict entry of a `modules_to_save` module (its copy)
  .base_layer.bias                                     bias="lora_only" and "all": the bias of each wrapped layer
  every other "*.bias" entry of the model              bias="all"; inside a modules_to_save module PEFT names them
                                                       <path>.original_module.<key> and <path>.modules_to_save.<key>
Loading reads and checks everything (config fields, every key, shape and dtype) before the model changes; a failure
after that removes the half-loaded adapter again. Saving writes each file to a temporary name and renames it.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import LoRAConfig
from .errors import AdapterError, CheckpointError, TargetError
from .inject import adapters, add_adapter, delete_adapter
from .inject import lora as lora_inject
from .inject.api import wrappers
from .inject.state import require_state
from .inject.targets import name_matches
from .modules import LoRALinear, ModulesToSave
from .modules.lora import is_conv1d

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json fields -> LoRAConfig fields
_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
           "exclude_modules": "exclude_modules", "layers_to_transform": "layers_to_transform",
           "layers_pattern": "layers_pattern", "modules_to_save": "modules_to_save", "bias": "bias",
           "use_rslora": "use_rslora", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}
# Fields that do not change what a loaded adapter computes: metadata, the layer type (fan_in_fan_out follows it,
# as in PEFT), and initialisation schemes (the loaded tensors replace the initial ones).
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out", "init_lora_weights", "megatron_core", "runtime_config",
            "qalora_group_size", "ensure_weight_tying", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config"}
# PEFT features fastpeft does not implement: a checkpoint that turns one on is refused.
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "a bias on lora_B", "layer_replication": "layer replication",
                "target_parameters": "LoRA on parameters (target_parameters)",
                "trainable_token_indices": "trainable tokens", "use_qalora": "QALoRA",
                "alora_invocation_tokens": "activated LoRA (aLoRA)", "use_bdlora": "block-diagonal LoRA",
                "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
                "velora_config": "VeLoRA", "megatron_config": "Megatron parallel layers"}


# -------------------------------------------------------------------------------------------------------- saving
def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> None:
    """Write LoRA adapter `name` of `model` to `directory` (created if needed) in PEFT's format.

    Files are replaced atomically (written to a temporary file in `directory`, then renamed). The config lists the
    layers the adapter wraps (leaf names when those pick exactly the same layers, else full module paths), so PEFT
    and fastpeft target the same layers when they load it.
    """
    state = require_state(model, "save_adapter")
    state.check_known([name], "save_adapter")
    config = state.configs[name]
    if not isinstance(config, LoRAConfig):
        raise CheckpointError(f"save_adapter: adapter {name!r} is a {type(config).__name__}; only LoRA adapters "
                              "can be saved in PEFT's format so far.")
    targets, saved = state.modules[name], state.saved[name]
    tensors: dict[str, torch.Tensor] = {}
    for path in targets:
        layer = model.get_submodule(path)
        tensors[f"{path}.lora_A.weight"] = layer.lora_A[name]
        tensors[f"{path}.lora_B.weight"] = layer.lora_B[name]
    for path in saved:
        copy = model.get_submodule(path).modules_to_save[name]
        for key, value in copy.state_dict().items():
            tensors[f"{path}.{key}"] = value
            if config.bias == "all" and _is_bias(key):  # PEFT's bias="all" also keeps the copy's biases like this
                tensors[f"{path}.modules_to_save.{_peft_copy_key(key, name)}"] = value
    base = _base_state(model)
    for key, clean in _bias_keys(base, config.bias, set(targets), saved).items():
        tensors[key] = base[clean]
    # Own CPU copies: safetensors refuses tensors that share memory (e.g. tied weights).
    tensors = {PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _write_atomic(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata={"format": "pt"}))
    fields = _peft_config(model, config, targets, saved)  # keys sorted; pattern dicts keep their order,
    text = json.dumps({k: fields[k] for k in sorted(fields)}, indent=2) + "\n"  # which decides the first match
    _write_atomic(os.path.join(directory, CONFIG_NAME), text.encode())


def _write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and os.replace."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0o666 minus the umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _peft_config(model: nn.Module, config: LoRAConfig, targets: list[str], saved: list[str]) -> dict:
    """The adapter_config.json PEFT writes for an equivalent LoraConfig."""
    names = [n for n in _clean_module_names(model)  # PEFT never targets modules_to_save or layers inside them
             if n and not any(n == s or n.startswith(s + ".") for s in saved)]
    if config.layers_to_transform is None:
        target_modules = _short_names(targets, names, name_matches)
    else:  # full paths: PEFT then targets them as listed, whatever its own layer-index parsing would say
        target_modules = sorted(targets)
    modules_to_save = None
    if saved:  # PEFT picks modules_to_save by a plain suffix test (no dot boundary)
        modules_to_save = _short_names(saved, _clean_module_names(model),
                                       lambda n, keys: any(n.endswith(k) for k in keys))
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
        "fan_in_fan_out": any(is_conv1d(model.get_submodule(p).base_layer) for p in targets),
        "use_dora": False, "lora_bias": False, "layer_replication": None, "target_parameters": None,
        "trainable_token_indices": None,
    }


def _short_names(paths: list[str], names: Iterable[str], matches: Callable) -> list[str]:
    """The paths' leaf names when they match exactly these paths among `names`, else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return leaves if {n for n in names if matches(n, leaves)} == set(paths) else sorted(paths)


# -------------------------------------------------------------------------------------------------------- loading
def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load the LoRA adapter in `directory` (written by fp.save_adapter or PEFT's save_pretrained) as `name`.

    The adapter is added as fp.add_adapter would add it (active if it is the model's first adapter), then its
    tensors are copied in, cast to the dtype and device of the adapter's parameters. With bias="all"/"lora_only"
    the checkpoint's biases replace the base model's, as in PEFT (delete_adapter does not restore them).
    Raises CheckpointError, with the model unchanged, when the files are missing, corrupted, use LoRA features
    fastpeft lacks, or do not fit the model. Returns the model.
    """
    if name in adapters(model):
        raise AdapterError(f"load_adapter: the model already has an adapter named {name!r}; pass another "
                           f"name=... or fp.delete_adapter(model, {name!r}) first.")
    directory = os.fspath(directory)
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    _check_files(directory, config_path, weights_path)
    raw = _read_json(config_path)
    config = _config_from_peft(raw, config_path, model)
    tensors = _read_safetensors(weights_path)
    prefix = PREFIX if tensors and all(k.startswith(PREFIX) for k in tensors) else ""  # PEFT always writes it
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    try:
        lora_plan = lora_inject.plan(model, name, config)
    except TargetError as exc:
        raise CheckpointError(f"load_adapter: {config_path} does not fit this {type(model).__name__}: {exc} "
                              f"Was the adapter made for another base model (base_model_name_or_path="
                              f"{raw.get('base_model_name_or_path')!r})?") from None
    assignments = _match(model, config, lora_plan, tensors, weights_path, prefix)
    _apply(model, name, config, assignments)
    return model


def _check_files(directory: str, config_path: str, weights_path: str) -> None:
    if not os.path.isdir(directory):
        raise CheckpointError(f"load_adapter: {directory!r} is not a directory; pass the folder that holds "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by fp.save_adapter or PEFT's "
                              "save_pretrained).")
    if not os.path.isfile(config_path):
        inner = sorted(d for d in os.listdir(directory) if os.path.isfile(os.path.join(directory, d, CONFIG_NAME)))
        hint = f" Subfolders with an adapter (PEFT saves named adapters there): {', '.join(inner)}." if inner else ""
        raise CheckpointError(f"load_adapter: {config_path} is missing; the folder must hold {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} as written by fp.save_adapter or PeftModel.save_pretrained.{hint}")
    if not os.path.isfile(weights_path):
        pickle = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        fix = ("only adapter_model.bin (pickle) is there, which fastpeft does not read; re-save it with PEFT's "
               "save_pretrained(..., safe_serialization=True)" if pickle
               else "save the adapter again with fp.save_adapter or PeftModel.save_pretrained")
        raise CheckpointError(f"load_adapter: {weights_path} is missing; {fix}.")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"load_adapter: {path} is not readable JSON ({exc}); the file is corrupted, "
                              "save the adapter again.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"load_adapter: {path} holds a JSON {type(data).__name__}, not an object of "
                              "LoraConfig fields; save the adapter again.")
    return data


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, read and parsed in full (a truncated or corrupted file fails here)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises SafetensorError, and a few others for odd headers
        raise CheckpointError(f"load_adapter: {path} is not a valid safetensors file ({exc}); it is truncated "
                              "or corrupted, save the adapter again.") from None
    for key, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise CheckpointError(f"load_adapter: {path}: tensor {key!r} has dtype {value.dtype}; adapter tensors "
                                  "are floating point. The file was not written for a LoRA adapter.")
    return tensors


def _config_from_peft(data: dict, path: str, model: nn.Module) -> LoRAConfig:
    """The LoRAConfig an adapter_config.json describes; refuses anything fastpeft would silently compute wrong."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"load_adapter: {path} has peft_type={peft_type!r}; fastpeft.load_adapter reads "
                              "LoRA adapters (peft_type \"LORA\") only.")
    for key, value in data.items():
        if key in _FIELDS or key in _IGNORED or not _is_set(value):
            continue
        what = _UNSUPPORTED.get(key, f"the unknown option {key!r}")
        raise CheckpointError(f"load_adapter: {path} sets {key}={value!r}: {what} is not supported by fastpeft. "
                              f"Use a LoRA adapter without it (or load it with PEFT).")
    kwargs = {ours: data[theirs] for theirs, ours in _FIELDS.items() if data.get(theirs) is not None}
    if data.get("init_lora_weights") in (True, False, "gaussian"):
        kwargs["init_weights"] = data["init_lora_weights"]
    saved = kwargs.get("modules_to_save")
    if isinstance(saved, list):  # PEFT's task models list heads ("classifier", "score") that may not exist
        present = _clean_module_names(model)
        kwargs["modules_to_save"] = [m for m in saved if not isinstance(m, str)
                                     or any(n == m or n.endswith("." + m) for n in present)] or None
    try:
        return LoRAConfig(**kwargs)
    except (ValueError, TypeError, AttributeError) as exc:  # ConfigError, or a field of the wrong JSON type
        raise CheckpointError(f"load_adapter: {path} holds a LoRA config fastpeft cannot use: {exc} (fastpeft "
                              "calls lora_alpha alpha and lora_dropout dropout.)") from None


def _is_set(value) -> bool:
    """True for a value that turns an option on (not None, False, 0, or empty)."""
    return value not in (None, False, 0, "", [], {})


def _match(model: nn.Module, config: LoRAConfig, lora_plan, tensors: dict, path: str, prefix: str) -> list[tuple]:
    """Pair every checkpoint tensor with its destination, checking names and shapes; nothing is changed."""
    targets = {p: r for p, r, _ in lora_plan.targets}
    required: dict[str, tuple] = {}
    for p, r in targets.items():
        in_f, out_f = _in_out(model.get_submodule(p))
        required[f"{p}.lora_A.weight"] = ("lora_A", p, (r, in_f), f"(r, in_features) of {p}", 0)
        required[f"{p}.lora_B.weight"] = ("lora_B", p, (out_f, r), f"(out_features, r) of {p}", 1)
    for s in lora_plan.saved:
        module = model.get_submodule(s)  # the module its copy will be made of
        module = module.original_module if isinstance(module, ModulesToSave) else module
        for key, value in module.state_dict().items():
            required[f"{s}.{key}"] = ("saved", (s, key), tuple(value.shape), f"the model's {s}.{key}", None)
    base = _base_state(model)
    optional = {key: ("bias", base[clean], tuple(base[clean].shape), f"the model's {clean}", None)
                for key, clean in _bias_keys(base, config.bias, set(targets), lora_plan.saved).items()}

    def redundant(key: str) -> bool:  # PEFT's bias="all" copies of modules_to_save biases: the same values again
        return config.bias == "all" and any(key.startswith(f"{s}.modules_to_save.") for s in lora_plan.saved)

    unexpected = [k for k in tensors if k not in required and k not in optional and not redundant(k)]
    if unexpected:
        wrapped = ", ".join(sorted(targets)[:3]) + (f" (+{len(targets) - 3} more)" if len(targets) > 3 else "")
        raise CheckpointError(f"load_adapter: {path} has {len(unexpected)} tensor(s) that match no module this "
                              f"adapter wraps or saves in {type(model).__name__}: {_few(unexpected, prefix)}. "
                              f"From its config the adapter wraps {wrapped or 'nothing'}, bias={config.bias!r}, "
                              f"modules_to_save={config.modules_to_save!r}; the weights and the config come from "
                              "different adapters or base models.")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise CheckpointError(f"load_adapter: {path} lacks {len(missing)} tensor(s) its config calls for: "
                              f"{_few(missing, prefix)}; the file is incomplete or belongs to another adapter.")
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


def _apply(model: nn.Module, name: str, config: LoRAConfig, assignments: list[tuple]) -> None:
    """Add the adapter and copy the tensors in; on any failure remove it and restore the biases."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the throwaway initialisation leaves the caller's RNG alone
        add_adapter(model, name, config)
    old_biases = []
    try:
        with torch.no_grad():
            for kind, where, tensor in assignments:
                if kind == "lora_A":
                    model.get_submodule(where).lora_A[name].copy_(tensor)
                elif kind == "lora_B":
                    model.get_submodule(where).lora_B[name].copy_(tensor)
                elif kind == "saved":
                    path, key = where
                    model.get_submodule(path).modules_to_save[name].state_dict(keep_vars=True)[key].copy_(tensor)
                else:
                    old_biases.append((where, where.detach().clone()))
                    where.copy_(tensor)
    except BaseException:
        with torch.no_grad():
            for target, old in old_biases:
                target.copy_(old)
        delete_adapter(model, name)
        raise


def _few(keys: list[str], prefix: str, n: int = 5) -> str:
    return ", ".join(repr(prefix + k) for k in keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------- names without wrappers
def _clean_name(name: str, wrapper_paths: set[str]) -> str | None:
    """A model key or module name as it reads without fastpeft's wrappers (None for adapter parts)."""
    parts, real, skip = [], [], False
    for part in name.split("."):
        real.append(part)
        if skip:
            if part not in ("base_layer", "original_module"):
                return None
            skip = False
            continue
        parts.append(part)
        skip = ".".join(real) in wrapper_paths
    return ".".join(parts)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state_dict tensors (not detached) under their names without wrappers."""
    paths = {p for p, _ in wrappers(model)}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        clean = _clean_name(key, paths)
        if clean is not None:
            out[clean] = value
    return out


def _clean_module_names(model: nn.Module) -> list[str]:
    """Module names of the base model, as if no fastpeft adapter were injected."""
    paths = {p for p, _ in wrappers(model)}
    names = (_clean_name(n, paths) for n, _ in model.named_modules())
    return list(dict.fromkeys(n for n in names if n is not None))


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


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, a Conv1D or a LoRALinear."""
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


__all__ = ["save_adapter", "load_adapter"]
