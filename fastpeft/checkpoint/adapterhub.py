"""Bottleneck, Compacter and invertible adapters in AdapterHub `adapters`' on-disk format, both ways.

A directory with `adapter_config.json` ({"config": BnConfig fields, "hidden_size", "model_type", "model_class",
"name", "version"}) and the weights: fastpeft writes `adapter.safetensors`; it reads that or AdapterHub's
`pytorch_adapter.bin` (through `torch.load(weights_only=True)`, which refuses anything but tensors). Keys are the
model paths of AdapterHub's modules (`<block>.output_adapters.adapters.<name>.adapter_up.weight`,
`<base>.shared_parameters.<name>.phm_rule`, `<base>.invertible_adapters.<name>.F.0.weight`, ...), which is where
fastpeft registers the same modules, so a key maps to a parameter by its path with the adapter name replaced.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from ..config import BnConfig, PrefixTuningConfig
from ..errors import CheckpointError, ConfigError
from ..inject.state import require_state
from ..inject.wrapped import model_class
from ..version import __version__
from .files import CONFIG_NAME, add_and_fill, read_safetensors, write_files

SAFETENSORS_NAME = "adapter.safetensors"
PICKLE_NAME = "pytorch_adapter.bin"


def is_adapterhub(raw: dict) -> bool:
    """An adapter_config.json written by AdapterHub `adapters` (or by this module)."""
    return isinstance(raw.get("config"), dict) and "peft_type" not in raw


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's parameters by model path, as AdapterHub names them."""
    state = require_state(model, "save_adapter")
    out = {}
    for path in state.modules[name]:
        out.update({f"{path}.{key}": value for key, value in model.get_submodule(path).adapter_state(name).items()})
    return out


def export(model: nn.Module, name: str, config: BnConfig | PrefixTuningConfig, directory: str) -> None:
    """Write adapter `name` as AdapterHub's save_adapter does (safetensors weights), each file atomically."""
    fields = {k: v for k, v in config.to_dict().items() if k != "method" or isinstance(config, PrefixTuningConfig)}
    if isinstance(config, PrefixTuningConfig):
        fields["architecture"] = "prefix_tuning"
    model_config = getattr(model, "config", None)
    meta = {"config": fields, "hidden_size": getattr(model_config, "hidden_size", None),
            "model_class": model_class(model).__name__, "model_name": getattr(model_config, "_name_or_path", "") or "",
            "model_type": getattr(model_config, "model_type", None), "name": name, "version": f"fastpeft.{__version__}"}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_files(directory, SAFETENSORS_NAME, adapter_tensors(model, name), text)


def load(model: nn.Module, name: str, raw: dict, directory: str, config_path: str) -> nn.Module:
    """Add adapter `name` from an AdapterHub-format directory; nothing changes unless every tensor fits."""
    config = _config(raw, config_path)
    _check_model(model, raw, config_path)
    tensors, weights_path = _read_weights(directory)
    saved_name = raw.get("name")

    def fill(undo):
        wanted = adapter_tensors(model, name)
        renamed = {_rename(k, saved_name, name): v for k, v in tensors.items()}
        prefixes = _prefix_candidates(model)
        matched = {}
        for key, value in renamed.items():
            target = next((p + key for p in prefixes if p + key in wanted), None)
            if target is None:
                target = next((k for k in wanted if k.endswith("." + key) or key.endswith("." + k)), None)
            if target is None:
                raise CheckpointError(f"load_adapter: {weights_path}: tensor {key!r} has no place in this "
                                      f"{type(model).__name__} with adapter config {config_path}; was it saved for "
                                      "another model?")
            matched[target] = value
        missing = sorted(set(wanted) - set(matched))
        if missing:
            raise CheckpointError(f"load_adapter: {weights_path} lacks {len(missing)} tensor(s) the adapter needs, "
                                  f"e.g. {missing[:3]}; the file is incomplete or for another configuration.")
        for key, value in matched.items():
            target = wanted[key]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"load_adapter: {weights_path}: {key} has shape {tuple(value.shape)}, the "
                                      f"model expects {tuple(target.shape)}; the adapter was made for another "
                                      "model size.")
        for key, value in matched.items():
            wanted[key].copy_(value.to(wanted[key].dtype))

    add_and_fill(model, name, config, fill)
    return model


def _config(raw: dict, config_path: str) -> BnConfig | PrefixTuningConfig:
    data = dict(raw["config"])
    architecture = data.pop("architecture", "bottleneck")
    method = data.pop("method", None)
    if method == "prefix_tuning" and architecture == "prefix_tuning":
        cls = PrefixTuningConfig  # fastpeft's own prefix layout (AdapterHub keeps prefixes per attention head)
    elif architecture in (None, "bottleneck"):
        cls = BnConfig
    else:
        raise CheckpointError(f"load_adapter: {config_path} describes an AdapterHub {architecture!r} adapter; "
                              "fastpeft reads AdapterHub bottleneck, Compacter and invertible adapters.")
    try:
        return cls.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"load_adapter: {config_path}: {exc}") from None


def _check_model(model: nn.Module, raw: dict, config_path: str) -> None:
    model_config = getattr(model, "config", None)
    for field in ("model_type", "hidden_size"):
        saved, ours = raw.get(field), getattr(model_config, field, None)
        if saved is not None and ours is not None and saved != ours:
            raise CheckpointError(f"load_adapter: {config_path} was saved for {field}={saved!r}, but this model has "
                                  f"{field}={ours!r}; load it into the base model it was made for.")


def _read_weights(directory: str) -> tuple[dict[str, torch.Tensor], str]:
    path = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(path):
        return read_safetensors(path), path
    path = os.path.join(directory, PICKLE_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"load_adapter: {directory} holds {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor "
                              f"{PICKLE_NAME}; save the adapter again.")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a truncated file, ...
        raise CheckpointError(f"load_adapter: {path} could not be read as a weights-only torch file ({exc}); it is "
                              "corrupted or holds more than tensors.") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"load_adapter: {path} does not hold a dict of tensors.")
    return tensors, path


def _rename(key: str, saved: str | None, name: str) -> str:
    """The key with the saved adapter name (the segment after a container) replaced by `name`."""
    if not saved or saved == name:
        return key
    return re.sub(rf"(^|\.)(adapters|invertible_adapters|shared_parameters|prefix_tunings|prefix_gates)\."
                  rf"{re.escape(saved)}\.",
                  rf"\1\2.{name}.", key)


def _prefix_candidates(model: nn.Module) -> list[str]:
    """Key prefixes to try: none, and the base model's path (a checkpoint saved from a model without a head)."""
    base = getattr(model, "base_model", model)
    path = next((n for n, m in model.named_modules() if m is base), "")
    return ["", path + "."] if path else [""]

