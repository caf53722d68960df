"""What every checkpoint format shares: file names, atomic writes, reading and checking the files, and module
names as they read without fastpeft's wrappers (the names PEFT's keys use)."""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import CheckpointError, TargetError
from ..inject import add_adapter, delete_adapter
from ..inject.swap import wrappers
from ..modules import AdapterLayer, ModulesToSave
from ..modules.base_layers import linear_features
from .gather import host_copies, write_once

# What to do about weights that do not match their config (the formats' tensor checks say this after the keys)
MISMATCH_FIX = ("load it into the base model it was made for, or save the adapter again from the model it was trained "
                "on (fp.save_adapter or PeftModel.save_pretrained)")
INCOMPLETE_FIX = "the file is incomplete: save the adapter again (fp.save_adapter or PeftModel.save_pretrained)"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def write_atomic(path: str, data: bytes) -> None:
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


def check_files(directory: str, config_path: str, weights_path: str) -> None:
    if not os.path.isdir(directory):
        raise CheckpointError(f"load_adapter: {directory!r} is not a directory; pass the folder that holds "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by fp.save_adapter or PEFT's "
                              "save_pretrained).")
    if not os.path.isfile(config_path):
        entries = os.listdir(directory)
        inner = sorted(d for d in entries if os.path.isfile(os.path.join(directory, d, CONFIG_NAME)))
        hint = f" Subfolders with an adapter (PEFT saves named adapters there): {', '.join(inner)}." if inner else ""
        if "config.json" in entries and not inner:
            hint = (" It holds a full model (config.json): load that with from_pretrained; fp.load_adapter reads the "
                    "folder fp.save_adapter, model.save_pretrained of a model with adapters, or Trainer wrote.")
        elif any(d.startswith("checkpoint-") for d in entries) and not inner:
            hint = (" Its checkpoint-<step> folders hold no adapter either: the run saved a model without fastpeft "
                    "adapters, or the adapters were added after the Trainer saved.")
        raise CheckpointError(f"load_adapter: {config_path} is missing; the folder must hold {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} as written by fp.save_adapter or PeftModel.save_pretrained.{hint}")
    if not os.path.isfile(weights_path):
        pickle = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        fix = ("only adapter_model.bin (pickle) is there, which fastpeft does not read; re-save it with PEFT's "
               "save_pretrained(..., safe_serialization=True)" if pickle
               else "save the adapter again with fp.save_adapter or PeftModel.save_pretrained")
        raise CheckpointError(f"load_adapter: {weights_path} is missing; {fix}.")


def read_json(path: str) -> dict:
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


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
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
                                  "are floating point, so the file was not written for an adapter: save the adapter "
                                  "again with fp.save_adapter or PeftModel.save_pretrained.")
    return tensors


def is_set(value) -> bool:
    """True for a value that turns an option on (not None, False, 0, or empty)."""
    return value not in (None, False, 0, "", [], {})


def few(keys: list[str], prefix: str, n: int = 5) -> str:
    return ", ".join(repr(prefix + k) for k in keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def clean_name(name: str, wrapper_paths: set[str]) -> str | None:
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


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state_dict tensors (not detached) under their names without wrappers."""
    paths = {p for p, _ in wrappers(model)}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        clean = clean_name(key, paths)
        if clean is not None:
            out[clean] = value
    return out


def clean_module_names(model: nn.Module) -> list[str]:
    """Module names of the base model, as if no fastpeft adapter were injected."""
    paths = {p for p, _ in wrappers(model)}
    names = (clean_name(n, paths) for n, _ in model.named_modules())
    return list(dict.fromkeys(n for n in names if n is not None))


def short_names(paths: list[str], names: Iterable[str], matches: Callable) -> list[str]:
    """The paths' leaf names when they match exactly these paths among `names`, else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return leaves if {n for n in names if matches(n, leaves)} == set(paths) else sorted(paths)


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, a Conv1D or a fastpeft wrapper of one."""
    if isinstance(module, AdapterLayer):
        return module.in_features, module.out_features
    return linear_features(module)


def write_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], fields: dict,
                     prefix: str = PREFIX) -> None:
    """adapter_model.safetensors (keys get PEFT's prefix; prompt-learning methods have none) then
    adapter_config.json, each written atomically."""
    text = json.dumps({k: fields[k] for k in sorted(fields)}, indent=2) + "\n"  # pattern dicts keep their order
    write_files(directory, WEIGHTS_NAME, {prefix + k: v for k, v in tensors.items()}, text)


def write_files(directory: str | os.PathLike, weights_name: str, tensors: dict[str, torch.Tensor],
                config_text: str) -> None:
    """`weights_name` (safetensors) then adapter_config.json in `directory` (created if needed), each atomically.
    The tensors of a sharded model are gathered first (every rank must save) and rank 0 alone writes (gather.py)."""
    tensors, gathered_on = host_copies(tensors, "save_adapter")
    directory = os.fspath(directory)

    if os.path.exists(directory) and not os.path.isdir(directory) or _file_above(directory):
        raise CheckpointError(f"save_adapter: {directory} is not a directory (a file is in the way at "
                              f"{_file_above(directory) or directory}); pass a folder path, e.g. 'out/my-adapter'.")

    def write():
        os.makedirs(directory, exist_ok=True)
        write_atomic(os.path.join(directory, weights_name), safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_atomic(os.path.join(directory, CONFIG_NAME), config_text.encode())

    write_once(gathered_on, write, "save_adapter")


def _file_above(directory: str) -> str | None:
    """The first existing path above `directory` that is a file (where makedirs would fail), if any."""
    parent = os.path.dirname(os.path.abspath(directory))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent if parent and os.path.isfile(parent) else None


def read_tensors(weights_path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's tensors keyed by module path (PEFT's prefix removed), and that prefix."""
    tensors = read_safetensors(weights_path)
    prefix = PREFIX if tensors and all(k.startswith(PREFIX) for k in tensors) else ""  # PEFT always writes it
    return {k[len(prefix):]: v for k, v in tensors.items()}, prefix


def plan_for_checkpoint(plan: Callable, model: nn.Module, name: str, config, config_path: str, raw: dict):
    """The injection plan of a checkpoint's config; a config that does not fit the model is a CheckpointError."""
    try:
        return plan(model, name, config)
    except TargetError as exc:
        made_for = raw.get("base_model_name_or_path")
        raise CheckpointError(f"load_adapter: {config_path} does not fit this {type(model).__name__}: "
                              f"{exc.args[0].split('; ')[0].split('. ')[0]}. The adapter was made for another base "
                              f"model{f' ({made_for})' if made_for else ''}: load it into the base model it was made "
                              "for.") from None


def add_and_fill(model: nn.Module, name: str, config, fill: Callable[[list[Callable]], None]) -> None:
    """add_adapter, then fill(undo) copies the tensors in (appending undo steps for anything outside the adapter);
    on any failure the steps are undone and the adapter removed again."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the throwaway initialisation leaves the caller's RNG alone
        add_adapter(model, name, config)
    undo: list[Callable] = []
    try:
        with torch.no_grad():
            fill(undo)
    except BaseException:
        with torch.no_grad():
            for step in reversed(undo):
                step()
        delete_adapter(model, name)
        raise


def saved_requirements(model: nn.Module, saved: list[str]) -> dict[str, tuple]:
    """The tensors a checkpoint holds for its modules_to_save copies: key -> ("saved", (path, key), shape, what,
    None); the copies are made of the modules as they are now."""
    required = {}
    for s in saved:
        module = model.get_submodule(s)
        module = module.original_module if isinstance(module, ModulesToSave) else module
        for key, value in module.state_dict().items():
            required[f"{s}.{key}"] = ("saved", (s, key), tuple(value.shape), f"the model's {s}.{key}", None)
    return required


def fill_saved(model: nn.Module, name: str, where: tuple[str, str], tensor: torch.Tensor) -> None:
    path, key = where
    model.get_submodule(path).modules_to_save[name].state_dict(keep_vars=True)[key].copy_(tensor)


def peft_modules_to_save(model: nn.Module, saved: list[str]) -> list[str] | None:
    """modules_to_save as PEFT's config lists them (PEFT picks them by a plain suffix test, no dot boundary)."""
    if not saved:
        return None
    return short_names(saved, clean_module_names(model), lambda n, keys: any(n.endswith(k) for k in keys))


def check_fields(data: dict, known: set[str], ignored: set[str], path: str, method: str,
                 unsupported: dict[str, str] | None = None) -> None:
    """Refuse a config that turns on anything fastpeft would silently compute wrong."""
    for key, value in data.items():
        if key in known or key in ignored or not is_set(value):
            continue
        what = (unsupported or {}).get(key, f"the unknown option {key!r}")
        raise CheckpointError(f"load_adapter: {path} sets {key}={value!r}: {what} is not supported by fastpeft. "
                              f"Use a {method} adapter without it (or load it with PEFT).")


def present_modules_to_save(model: nn.Module, saved):
    """A config's modules_to_save without the entries this model lacks: PEFT's task models list heads
    ("classifier", "score") whether or not the model has them."""
    if not isinstance(saved, list):
        return saved
    present = clean_module_names(model)
    return [m for m in saved if not isinstance(m, str) or any(n == m or n.endswith("." + m) for n in present)] or None


def check_tensors(tensors: dict, required: dict[str, tuple], weights_path: str, prefix: str, model: nn.Module,
                  shape_hint: str) -> None:
    """Every required tensor present with its shape, nothing else: else a CheckpointError naming the keys."""
    unexpected = sorted(set(tensors) - set(required))
    if unexpected:
        raise CheckpointError(f"load_adapter: {weights_path} has {len(unexpected)} tensor(s) that match no module "
                              f"this adapter adapts or saves in {type(model).__name__}: {few(unexpected, prefix)}; "
                              f"the weights and the config come from different adapters or base models: {MISMATCH_FIX}.")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise CheckpointError(f"load_adapter: {weights_path} lacks {len(missing)} tensor(s) its config calls for: "
                              f"{few(missing, prefix)}; {INCOMPLETE_FIX}.")
    for key, (_, _, shape, what, _) in required.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"load_adapter: {weights_path}: tensor {prefix + key!r} has shape "
                                  f"{tuple(tensors[key].shape)} but {what} is {shape}: {shape_hint}.")


def saved_copy_tensors(model: nn.Module, name: str, saved: list[str]) -> dict[str, torch.Tensor]:
    """PEFT's keys for adapter `name`'s modules_to_save copies: path + "." + state_dict key."""
    return {f"{path}.{key}": value for path in saved
            for key, value in model.get_submodule(path).modules_to_save[name].state_dict().items()}


def peft_target_modules(model: nn.Module, targets: list[str], saved: list[str], layers_to_transform) -> list[str]:
    """target_modules as PEFT's config lists them: the leaf names when they pick exactly these layers (PEFT never
    targets modules_to_save or layers inside them), else the full paths. With layers_to_transform always full
    paths: PEFT then targets them as listed, whatever its own layer-index parsing would say."""
    if layers_to_transform is not None:
        return sorted(targets)
    names = [n for n in clean_module_names(model) if n and not any(n == s or n.startswith(s + ".") for s in saved)]
    return short_names(targets, names, lambda n, keys: any(n == k or n.endswith("." + k) for k in keys))
