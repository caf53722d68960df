"""fastpeft: fast parameter-efficient fine-tuning.

    import fastpeft as fp
    fp.add_adapter(model, "default", fp.LoRAConfig(r=16, alpha=32, target_modules="all-linear"))

Importing fastpeft never initialises CUDA and never compiles anything; kernels load on first CUDA call.
"""
from . import ops, serve  # noqa: F401  (fp.ops, fp.serve)
from .checkpoint import load_adapter, save_adapter
from .config import (AdaLoRAConfig, AdapterConfig, BnConfig, CompacterConfig, CompacterPlusPlusConfig,
                     DoubleSeqBnConfig, DoubleSeqBnInvConfig, IA3Config, LlamaAdapterConfig, LoRAConfig, ParBnConfig,
                     PrefixTuningConfig, PromptTuningConfig, PTuningConfig, SeqBnConfig, SeqBnInvConfig)
from .errors import (AdapterError, BackendError, CheckpointError, ConfigError, FastPEFTError, InputError,
                     TargetError)
from .inject import (Stack, adapter_batch, adapter_ids, adapters, add_adapter, delete_adapter, disable_adapters,
                     eject_prefix_tuning, merge_adapter, prepare_for_kbit_training, set_active_adapters,
                     trainable_parameters, unload, unmerge_adapter)
from .inject.adalora import RankAllocator
from .version import __version__  # noqa: F401  (fp.__version__)

__all__ = [
    "ops", "AdapterConfig", "LoRAConfig", "IA3Config", "AdaLoRAConfig", "RankAllocator", "BnConfig", "SeqBnConfig",
    "DoubleSeqBnConfig", "ParBnConfig", "SeqBnInvConfig", "DoubleSeqBnInvConfig", "CompacterConfig",
    "CompacterPlusPlusConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig", "LlamaAdapterConfig",
    "Stack",
    "add_adapter", "set_active_adapters", "disable_adapters", "merge_adapter", "unmerge_adapter",
    "delete_adapter", "unload", "trainable_parameters", "adapters", "save_adapter", "load_adapter",
    "eject_prefix_tuning", "adapter_batch", "adapter_ids", "prepare_for_kbit_training",
    "FastPEFTError", "ConfigError", "TargetError", "AdapterError", "CheckpointError", "BackendError",
    "InputError",
]
