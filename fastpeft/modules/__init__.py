"""nn.Module wrappers around the ops: one file per method family. They call fastpeft.ops, never kernels."""
from .lora import LoRALinear
from .modules_to_save import ModulesToSave

__all__ = ["LoRALinear", "ModulesToSave"]
