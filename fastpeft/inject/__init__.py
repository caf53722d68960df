"""The thin injection layer: target resolution, per-family tables, module swapping, adapter bookkeeping."""
from .api import (Stack, adapters, add_adapter, delete_adapter, disable_adapters, merge_adapter, set_active_adapters,
                  trainable_parameters, unload, unmerge_adapter)
from .batch import adapter_batch, adapter_ids
from .kbit import prepare_for_kbit_training
from .prefix import eject as eject_prefix_tuning

__all__ = ["Stack", "add_adapter", "set_active_adapters", "disable_adapters", "merge_adapter", "unmerge_adapter",
           "delete_adapter", "unload", "trainable_parameters", "adapters",
           "eject_prefix_tuning", "adapter_batch", "adapter_ids", "prepare_for_kbit_training"]
