"""nn.Module wrappers around the ops: one file per method family. They call fastpeft.ops, never kernels."""
from .base import AdapterLayer
from .ia3 import IA3Linear
from .lora import LoRALinear
from .modules_to_save import ModulesToSave

__all__ = ["AdapterLayer", "IA3Linear", "LoRALinear", "ModulesToSave"]
