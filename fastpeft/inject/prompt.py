"""Prompt tuning and P-tuning injection: a `PromptTuningLayer` registered on the base model (AdapterHub's
`<base_model>.prompt_tuning`), holding the adapters in `prompt_tunings.<name>`, and its forward pre-hooks on the
top-level model (encoder-decoder models: on the encoder and the decoder) that put the virtual tokens into the input.
No model module is replaced; `unload` removes the container and its hooks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PromptTuningConfig, PTuningConfig
from ..errors import ConfigError, TargetError
from ..modules.base import seeded
from ..modules.base_layers import adapter_dtype
from ..modules.prompt import PromptEncoder, PromptTuning, PromptTuningLayer, repeat_to
from .swap import check_saved_overlap, container, wrap_saved
from .targets import base_model_path, join, resolve_modules_to_save

CONTAINER = "prompt_tuning"
SEQUENCE_LEVEL = ("ForSequenceClassification", "ForMultipleChoice", "ForQuestionAnswering")


@dataclass
class PromptPlan:
    base: str                       # path of the module that holds the container
    hidden: int                     # width of the input embeddings
    init: torch.Tensor | None       # prompt tuning's from_string initialisation (prompt_length, hidden)
    saved: list[str]
    token_labels: bool

    @property
    def targets(self) -> list[tuple[str]]:
        return [(join(self.base, CONTAINER),)]


def _what(config) -> str:
    return type(config).__name__


def input_embeddings(model: nn.Module, where: str) -> nn.Embedding:
    """The model's input token embeddings; a TargetError when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        emb = None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TargetError(f"{where}: {type(model).__name__} has no input token embeddings (get_input_embeddings() "
                          f"gave {type(emb).__name__}); prompt tuning puts learned embeddings into the input "
                          "sequence, so it needs a Hugging Face model that embeds input_ids "
                          "(e.g. AutoModelForCausalLM).")
    return emb


def plan(model: nn.Module, name: str, config: PromptTuningConfig | PTuningConfig) -> PromptPlan:
    where = _what(config)
    emb = input_embeddings(model, where)
    vocab, hidden = emb.weight.shape
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        for getter in ("get_encoder", "get_decoder"):
            if not callable(getattr(model, getter, None)):
                raise TargetError(f"{where}: the encoder-decoder {type(model).__name__} has no {getter}(); the "
                                  "prompt goes into the encoder's input.")
    base = base_model_path(model)
    holder = model.get_submodule(base)
    existing = holder._modules.get(CONTAINER)
    if existing is not None and not isinstance(existing, PromptTuningLayer) or (
            existing is None and hasattr(holder, CONTAINER)):
        raise TargetError(f"{where}: {join(base, CONTAINER)} already exists and is not a fastpeft container (a "
                          "model loaded with AdapterHub?); use a plain transformers model.")
    init = None
    if isinstance(config, PromptTuningConfig) and config.prompt_init == "from_string":
        ids = _token_ids(config, vocab)
        with torch.no_grad():
            init = emb(torch.tensor(repeat_to(ids, config.prompt_length), device=emb.weight.device)).detach()
        init = init.to("cpu", torch.float32)
    saved = resolve_modules_to_save(model, config.modules_to_save, where)
    check_saved_overlap(model, [], saved, where)
    token_labels = not type(model).__name__.endswith(SEQUENCE_LEVEL)
    return PromptPlan(base, hidden, init, saved, token_labels)


def _token_ids(config: PromptTuningConfig, vocab: int) -> list[int]:
    """prompt_init_text tokenized as PEFT does (tokenizer(text)["input_ids"], special tokens included)."""
    tokenizer = config.tokenizer
    fix = ('pass PromptTuningConfig(tokenizer=<the model\'s tokenizer>) or tokenizer_name_or_path="<its folder or '
           'hub id>", or use prompt_init="random_uniform"')
    if tokenizer is None and config.tokenizer_name_or_path:
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
        except Exception as exc:  # noqa: BLE001 - any failure to build it means the same to the user
            raise ConfigError(f"PromptTuningConfig.tokenizer_name_or_path: {config.tokenizer_name_or_path!r} gave no "
                              f"tokenizer ({type(exc).__name__}: {exc}); {fix}.") from None
    if tokenizer is None:
        raise ConfigError(f'PromptTuningConfig.tokenizer: prompt_init="from_string" tokenizes prompt_init_text, but '
                          f"no tokenizer was given; {fix}.")
    try:
        ids = tokenizer(config.prompt_init_text)["input_ids"] if callable(tokenizer) else \
            tokenizer.encode(config.prompt_init_text)
        ids = [int(i) for i in ids]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"PromptTuningConfig.tokenizer: {type(tokenizer).__name__} could not tokenize "
                          f"prompt_init_text ({type(exc).__name__}: {exc}); {fix}.") from None
    if not ids:
        raise ConfigError(f"PromptTuningConfig.prompt_init_text: {config.prompt_init_text!r} gives no tokens; use a "
                          "longer text.")
    bad = sorted({i for i in ids if not 0 <= i < vocab})
    if bad:
        raise ConfigError(f"PromptTuningConfig.tokenizer: token ids {bad[:5]} of prompt_init_text are outside the "
                          f"model's vocabulary (0..{vocab - 1}); pass the tokenizer that belongs to this model.")
    return ids


def build(config: PromptTuningConfig | PTuningConfig, hidden: int, init: torch.Tensor | None = None) -> nn.Module:
    """The adapter module of `config` (float32, CPU), initialised as the config says."""
    seed = config.init_weights_seed
    if isinstance(config, PromptTuningConfig):
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return PromptTuning(config.prompt_length, hidden, config.combine, init, config.random_uniform_scale, generator)
    with seeded(seed):
        return PromptEncoder(config.prompt_length, hidden, config.encoder_type, config.encoder_hidden_size,
                             config.encoder_num_layers, config.encoder_dropout, config.inference_mode)


def apply(model: nn.Module, name: str, config, prompt_plan: PromptPlan, undo: list[Callable]) -> None:
    weight = model.get_input_embeddings().weight
    layer = container(model, prompt_plan.base, CONTAINER, PromptTuningLayer, undo,
                      attach=lambda c: c.attach(model, prompt_plan.token_labels))
    module = build(config, prompt_plan.hidden, prompt_plan.init)
    layer.add(name, module.to(device=weight.device, dtype=adapter_dtype(weight)).train(layer.training))
    undo.append(lambda: layer.delete_adapter(name))
    wrap_saved(model, name, prompt_plan.saved, undo)
