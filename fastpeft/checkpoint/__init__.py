"""Save and load adapters in PEFT's on-disk format (LoRA, IA3, AdaLoRA) and AdapterHub's (bottleneck, Compacter,
invertible adapters: adapterhub.py), so adapters move between fastpeft and those libraries both ways.

    fp.save_adapter(model, "out/chat", "default")   # PeftModel.from_pretrained(base, "out/chat") reads it
    fp.load_adapter(model, "peft-dir", name="chat")  # reads what PeftModel.save_pretrained wrote

A checkpoint is a directory with `adapter_config.json` (PEFT's config fields) and `adapter_model.safetensors`
(never pickle), in the layout PEFT uses for the method (lora.py, ia3.py). Loading reads and checks everything
(config fields, every key, shape and dtype) before the model changes; a failure after that removes the half-loaded
adapter again. Saving writes each file to a temporary name and renames it.
"""
from __future__ import annotations

import functools
import os

from torch import nn

from ..config import (AdaLoRAConfig, BnConfig, IA3Config, LlamaAdapterConfig, LoRAConfig, PrefixTuningConfig,
                      PromptTuningConfig, PTuningConfig)
from ..errors import AdapterError, CheckpointError
from ..inject import adapters
from ..inject.state import register_installer, require_state
from ..inject.wrapped import refuse_sharded, unwrap_model
from . import adalora, adapterhub, hf, ia3, lora, prefix
from . import llama_adapter as llama_adapter_format
from . import prompt as prompt_format
from .files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_files, read_json, write_checkpoint
from .gather import reshard_for_save
from .folders import resolve

# PEFT's peft_type -> (config class, format)
FORMATS = {"LORA": (LoRAConfig, lora), "IA3": (IA3Config, ia3), "ADALORA": (AdaLoRAConfig, adalora),
           "PREFIX_TUNING": (PrefixTuningConfig, prefix), "PROMPT_TUNING": (PromptTuningConfig, prompt_format),
           "P_TUNING": (PTuningConfig, prompt_format), "ADAPTION_PROMPT": (LlamaAdapterConfig, llama_adapter_format)}


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> None:
    """Write adapter `name` of `model` to `directory` (created if needed) in PEFT's format (AdapterHub's for
    bottleneck, Compacter and invertible adapters: adapter_config.json + adapter.safetensors).

    Files are replaced atomically (written to a temporary file in `directory`, then renamed). `model` may be
    wrapped (DDP, torch.compile: see inject/wrapped.py). A model sharded by FSDP2 must be saved on every rank: its
    shards are gathered and rank 0 writes the files (gather.py).
    """
    model = unwrap_model(model, "save_adapter")
    state = require_state(model, "save_adapter")
    state.check_known([name], "save_adapter")
    reshard_for_save(model)  # FSDP2: take shards, never the unsharded tensors it frees when it reshards
    config = state.configs[name]
    if isinstance(config, BnConfig) or (isinstance(config, PrefixTuningConfig)
                                        and not prefix.peft_compatible(model, name, config)):
        adapterhub.export(model, name, config, os.fspath(directory))
        return
    fmt = next((f for cls, f in FORMATS.values() if type(config) is cls), None)
    if fmt is None:
        raise CheckpointError(f"save_adapter: adapter {name!r} is a {type(config).__name__}; PEFT-format "
                              f"checkpoints exist for {', '.join(c.__name__ for c, _ in FORMATS.values())}.")
    tensors, fields = fmt.export(model, name, config, state.modules[name], state.saved[name])
    write_checkpoint(directory, tensors, fields, prefix=getattr(fmt, "KEY_PREFIX", PREFIX))


# A field only the configs of one PEFT type write (whatever its value): how a config labelled with another type shows
SIGNATURES = {"LORA": ("LoRA", "lora_alpha"), "ADALORA": ("AdaLoRA", "init_r"), "IA3": ("IA3", "feedforward_modules"),
              "PREFIX_TUNING": ("prefix tuning", "prefix_projection"), "PROMPT_TUNING": ("prompt tuning",
                                                                                    "prompt_tuning_init"),
              "P_TUNING": ("P-tuning", "encoder_reparameterization_type"),
              "ADAPTION_PROMPT": ("LLaMA-Adapter", "adapter_len")}


def _check_label(raw: dict, peft_type: str, config_path: str) -> None:
    """A config whose peft_type names another method than its fields (a hand-edited or mislabelled file)."""
    if SIGNATURES[peft_type][1] in raw:
        return
    others = [(t, label, key) for t, (label, key) in SIGNATURES.items() if t != peft_type and key in raw]
    if others:
        t, label, key = others[0]
        raise CheckpointError(f"load_adapter: {config_path} has peft_type={peft_type!r} but the fields of a {label} "
                              f"config ({key}, no {SIGNATURES[peft_type][1]}); set peft_type to {t!r} if it is a "
                              f"{label} adapter, or save the adapter again.")


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load the adapter in `directory` (written by fp.save_adapter or PEFT's save_pretrained) as `name`.

    `directory` may also be a folder of several adapters (model.save_pretrained, trainer.save_model(), a Trainer
    checkpoint-<step>): `name` then picks its subfolder `name` when there is one, else the adapter at its root; a
    Trainer output folder without a final save_model() stands for its last checkpoint (folders.py).
    The adapter is added as fp.add_adapter would add it (active if it is the model's first adapter), then its
    tensors are copied in, cast to the dtype and device of the adapter's parameters. Raises CheckpointError, with
    the model unchanged, when the files are missing, corrupted, use features fastpeft lacks, or do not fit the
    model. Returns the model.
    """
    outer, model = model, unwrap_model(model, "load_adapter", changes_trainable=True)
    refuse_sharded(model, "load_adapter", adds=True)
    if name in adapters(model):
        raise AdapterError(f"load_adapter: the model already has an adapter named {name!r}; pass another "
                           f"name=... or fp.delete_adapter(model, {name!r}) first.")
    directory = resolve(os.fspath(directory), name)
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(config_path):
        raw = read_json(config_path)
        if adapterhub.is_adapterhub(raw):
            adapterhub.load(model, name, raw, directory, config_path)
            return outer
    check_files(directory, config_path, weights_path)
    raw = read_json(config_path)
    peft_type = raw.get("peft_type")
    if peft_type not in FORMATS:
        raise CheckpointError(f"load_adapter: {config_path} has peft_type={peft_type!r}; fastpeft.load_adapter "
                              f"reads {', '.join(repr(t) for t in FORMATS)} adapters: load it with PEFT "
                              "(peft.PeftModel.from_pretrained) instead.")
    _check_label(raw, peft_type, config_path)
    FORMATS[peft_type][1].load(model, name, raw, config_path, weights_path)
    return outer


# model.save_pretrained and Trainer's checkpoints write the adapters of a model holding any (hf.py)
register_installer(functools.partial(hf.install, save_adapter=save_adapter), hf.uninstall)

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]
