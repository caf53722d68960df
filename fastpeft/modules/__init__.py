"""nn.Module wrappers around the ops: one file per method family. They call fastpeft.ops, never kernels."""
from .base import AdapterContainer, AdapterLayer
from .bottleneck import BottleneckAdapter, BottleneckLayer
from .ia3 import IA3Linear
from .invertible import GLOWCoupling, NICECoupling
from .llama_adapter import AdaptionPrompt, LlamaAdapterPool
from .lora import LoRALinear
from .modules_to_save import ModulesToSave
from .phm import PHMLinear, PHMShared
from .prompt import PromptEncoder, PromptTuning, PromptTuningLayer

__all__ = ["AdapterContainer", "AdapterLayer", "BottleneckAdapter", "BottleneckLayer", "GLOWCoupling", "IA3Linear",
           "LoRALinear", "ModulesToSave", "NICECoupling", "PHMLinear", "PHMShared", "PromptEncoder", "PromptTuning",
           "PromptTuningLayer", "AdaptionPrompt", "LlamaAdapterPool"]
