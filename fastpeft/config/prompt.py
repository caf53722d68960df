"""Prompt tuning and P-tuning configs (PEFT's)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._base import AdapterConfig
from ._checks import check_dropout, check_int, check_modules_to_save, fail


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning (Lester et al. 2021) with AdapterHub's options: `prompt_length` learned embeddings are put
    before the input embeddings (combine="prefix") or after its first token (combine="prefix_after_bos"); the
    attention mask and labels (-100) are extended to match. prompt_init="random_uniform" draws them from
    U(-random_uniform_scale, random_uniform_scale); "from_string" copies the model's own token embeddings of
    `prompt_init_text` (tokenized by `tokenizer`, or AutoTokenizer(`tokenizer_name_or_path`)), repeated or cut to
    prompt_length. modules_to_save: modules trained whole beside the prompt (PEFT's; e.g. ["classifier"]).
    """

    method: ClassVar[str] = "prompt_tuning"
    aliases: ClassVar[dict[str, str]] = {"num_virtual_tokens": "prompt_length",
                                         "prompt_tuning_init_text": "prompt_init_text"}

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | None = None
    random_uniform_scale: float = 0.5
    combine: str = "prefix"
    tokenizer_name_or_path: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    init_weights_seed: int | None = None
    modules_to_save: list[str] | None = None
    num_virtual_tokens: int | None = field(default=None, repr=False, compare=False)
    prompt_tuning_init_text: str | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        check_int(self, "prompt_length", 1, "10")
        if self.prompt_init == "text":  # PEFT's name for it
            self.prompt_init = "from_string"
        if self.prompt_init not in ("random_uniform", "from_string"):
            fail(self, "prompt_init", f"got {self.prompt_init!r}", 'use "random_uniform" or "from_string"')
        if self.prompt_init == "from_string" and not (isinstance(self.prompt_init_text, str) and self.prompt_init_text):
            fail(self, "prompt_init_text", 'is missing: prompt_init="from_string" initialises the prompt from the '
                 "embeddings of a text", 'pass prompt_init_text="Classify the sentiment:" (and a tokenizer), or '
                 'use prompt_init="random_uniform"')
        if isinstance(self.random_uniform_scale, bool) or not isinstance(self.random_uniform_scale, (int, float)) \
                or not self.random_uniform_scale > 0:
            fail(self, "random_uniform_scale", f"got {self.random_uniform_scale!r}", "use a positive number, e.g. 0.5")
        if self.combine not in ("prefix", "prefix_after_bos"):
            fail(self, "combine", f"got {self.combine!r}", 'use "prefix" or "prefix_after_bos"')
        check_int(self, "init_weights_seed", 0, "42", optional=True)
        check_modules_to_save(self)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer")  # an object, not part of the saved config
        return out


@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning (Liu et al. 2021, PEFT's PromptEncoderConfig): `prompt_length` virtual token embeddings produced by a
    prompt encoder from learned inputs E: encoder_type="MLP": W_3 relu(W_2 relu(W_1 E)) (hidden width
    `encoder_hidden_size`, default the model's hidden size); "LSTM": a bidirectional `encoder_num_layers`-layer
    LSTM over E, then W_2 relu(W_1 ·). Combined with the input as prompt tuning's combine="prefix".
    inference_mode=True (PEFT's name): no encoder, the virtual token embeddings are learned directly; a loaded
    checkpoint is such an adapter, because a saved P-tuning adapter holds the encoder's output (as PEFT's).
    modules_to_save: modules trained whole beside the prompt (PEFT's; e.g. ["classifier"]).
    """

    method: ClassVar[str] = "p_tuning"
    aliases: ClassVar[dict[str, str]] = {"num_virtual_tokens": "prompt_length",
                                         "encoder_reparameterization_type": "encoder_type"}

    prompt_length: int = 20
    encoder_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    init_weights_seed: int | None = None
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    num_virtual_tokens: int | None = field(default=None, repr=False, compare=False)
    encoder_reparameterization_type: str | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        check_int(self, "prompt_length", 1, "20")
        if isinstance(self.encoder_type, str):
            self.encoder_type = self.encoder_type.upper()
        if self.encoder_type not in ("MLP", "LSTM"):
            fail(self, "encoder_type", f"got {self.encoder_type!r}", 'use "MLP" or "LSTM"')
        check_int(self, "encoder_hidden_size", 1, "256", optional=True)
        check_int(self, "encoder_num_layers", 1, "2")
        check_dropout(self, "encoder_dropout")
        check_int(self, "init_weights_seed", 0, "42", optional=True)
        check_modules_to_save(self)
        if not isinstance(self.inference_mode, bool):
            fail(self, "inference_mode", f"got {self.inference_mode!r}", "use True or False")
