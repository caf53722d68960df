"""The LLaMA-Adapter config (PEFT's adaption prompts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._base import AdapterConfig
from ._checks import check_int


@dataclass
class LlamaAdapterConfig(AdapterConfig):
    """LLaMA-Adapter (Zhang et al. 2023; PEFT's AdaptionPromptConfig): in the top `adapter_layers` layers (None: all),
    `adapter_len` learned prompt tokens A give keys and values through the layer's own k/v projections (no
    position), attended with their own softmax and added under a zero-initialised gate g per layer:

        O = attention(Q, K, V) + g · softmax(Q (A W_k)ᵀ · scale) (A W_v)      (identity at g = 0)
    """

    method: ClassVar[str] = "llama_adapter"

    adapter_len: int = 10
    adapter_layers: int | None = None
    init_weights_seed: int | None = None

    def validate(self) -> None:
        check_int(self, "adapter_len", 1, "10")
        check_int(self, "adapter_layers", 1, "8", optional=True)
        check_int(self, "init_weights_seed", 0, "42", optional=True)
