"""Adapter configs: one dataclass per method, validated on creation with errors that name the field and the fix.

Field names follow the seed libraries: AdapterHub `adapters` for hyperparameters (`r`, `alpha`, `dropout`),
PEFT for targeting (`target_modules`, `layers_to_transform`, `modules_to_save`, `bias`, `use_rslora`);
PEFT's spellings `lora_alpha`, `lora_dropout` and `init_lora_weights` are accepted as aliases.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ._base import AdapterConfig
from ._checks import NON_LINEARITIES
from .bottleneck import (BnConfig, CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig, DoubleSeqBnInvConfig,
                         ParBnConfig, SeqBnConfig, SeqBnInvConfig)
from .ia3 import IA3Config
from .llama_adapter import LlamaAdapterConfig
from .lora import AdaLoRAConfig, LoRAConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig, PTuningConfig

CONFIGS: dict[str, type[AdapterConfig]] = {cls.method: cls for cls in (
    LoRAConfig, IA3Config, AdaLoRAConfig, BnConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig,
    LlamaAdapterConfig)}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """The config a `to_dict()` output describes."""
    method = data.get("method")
    if method not in CONFIGS:
        raise ConfigError(f"config_from_dict: the config's method={method!r} is not a fastpeft method; use one of "
                          f"{', '.join(sorted(CONFIGS))}.")
    return CONFIGS[method].from_dict(data)


__all__ = ["AdapterConfig", "LoRAConfig", "AdaLoRAConfig", "IA3Config", "BnConfig", "SeqBnConfig", "DoubleSeqBnConfig",
           "ParBnConfig", "SeqBnInvConfig", "DoubleSeqBnInvConfig", "CompacterConfig", "CompacterPlusPlusConfig",
           "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig", "LlamaAdapterConfig", "NON_LINEARITIES",
           "CONFIGS", "config_from_dict"]
