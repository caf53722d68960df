"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): learned virtual token embeddings put into the
model's input sequence.

    prompt tuning:  V = E                                   (E: prompt_length x hidden, learned)
    P-tuning (MLP): V = W_3 relu(W_2 relu(W_1 E + b_1) + b_2) + b_3
    P-tuning (LSTM): V = W_2 relu(W_1 BiLSTM(E) + b_1) + b_2
    input:          [V; x_1 .. x_n]  (combine="prefix")   or   [x_1; V; x_2 .. x_n]  (combine="prefix_after_bos")

`PromptTuning` keeps AdapterHub's parameter name (`prompt_embedding`), `PromptEncoder` PEFT's (`embedding`,
`mlp_head`, `lstm_head`), so their checkpoints map. `PromptTuningLayer` is the container (AdapterHub's
`<base_model>.prompt_tuning.prompt_tunings.<name>`) and owns the forward pre-hooks that insert the prompt:

* decoder-only and encoder-only models: one hook on the top-level model turns `input_ids` into `inputs_embeds` with
  the prompt inserted, and extends `attention_mask` (ones), token-level `labels` (-100), `position_ids` and
  `token_type_ids` (zeros) to match. The outputs keep the virtual positions (as PEFT's): logits are
  (batch, prompt_length + n, vocab), the virtual tokens at positions 0..P-1 ("prefix") or 1..P ("prefix_after_bos").
* encoder-decoder models (T5): the prompt goes into the encoder's input (a hook on the encoder); a hook on the decoder
  extends the cross-attention mask. The decoder's inputs, labels and outputs are unchanged.
* generation with a KV cache: only the first (prefill) call inserts the prompt; when the cache already holds tokens,
  the hook only extends the 2-D attention mask (and shifts given position_ids), so the positions follow the cache.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..errors import AdapterError
from .base import AdapterContainer

COMBINES = ("prefix", "prefix_after_bos")


class PromptTuning(nn.Module):
    """`prompt_length` learned embeddings (AdapterHub's PromptTuning: parameter `prompt_embedding.weight`)."""

    def __init__(self, prompt_length: int, hidden: int, combine: str = "prefix", init: torch.Tensor | None = None,
                 random_uniform_scale: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        if combine not in COMBINES:
            raise AdapterError(f"PromptTuning: combine={combine!r}; use one of {COMBINES}.")
        self.combine = combine
        self.prompt_embedding = nn.Embedding(prompt_length, hidden)
        with torch.no_grad():
            if init is not None:
                self.prompt_embedding.weight.copy_(init)
            else:
                w = torch.rand(prompt_length, hidden, generator=generator)
                self.prompt_embedding.weight.copy_((w * 2 - 1) * random_uniform_scale)

    @property
    def prompt_length(self) -> int:
        return self.prompt_embedding.num_embeddings

    def forward(self) -> torch.Tensor:
        """The virtual token embeddings, (prompt_length, hidden)."""
        return self.prompt_embedding.weight


class PromptEncoder(nn.Module):
    """PEFT's P-tuning PromptEncoder (same parameter names and shapes): an embedding of the virtual tokens, then an
    MLP (Linear-ReLU-Linear-ReLU-Linear, width `hidden_size`) or a bidirectional LSTM + MLP head.

    inference_mode=True: no heads; the virtual token embeddings are `embedding.weight` itself. That is what a
    saved P-tuning adapter holds (PEFT saves the encoder's output), so a loaded checkpoint is such an encoder.
    """

    combine = "prefix"

    def __init__(self, prompt_length: int, token_dim: int, encoder_type: str = "MLP", hidden_size: int | None = None,
                 num_layers: int = 2, dropout: float = 0.0, inference_mode: bool = False):
        super().__init__()
        self.token_dim = token_dim
        self.hidden_size = hidden_size or token_dim
        self.encoder_type = None if inference_mode else encoder_type.upper()
        self.embedding = nn.Embedding(prompt_length, token_dim)
        h = self.hidden_size
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=h, num_layers=num_layers,
                                     dropout=dropout if num_layers > 1 else 0.0, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        elif self.encoder_type == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, token_dim))
        elif self.encoder_type is not None:
            raise AdapterError(f"PromptEncoder: encoder_type={encoder_type!r}; use 'MLP' or 'LSTM'.")

    @property
    def prompt_length(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> torch.Tensor:
        """The virtual token embeddings, (prompt_length, token_dim) (the same for every row of a batch)."""
        x = self.embedding.weight
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]
        if self.encoder_type == "MLP":
            return self.mlp_head(x)
        return x


def insert(x: torch.Tensor, virtual: torch.Tensor, combine: str) -> torch.Tensor:
    """[virtual; x] ("prefix") or [x_1; virtual; x_2..] ("prefix_after_bos") along dim 1."""
    if combine == "prefix":
        return torch.cat([virtual, x], dim=1)
    return torch.cat([x[:, :1], virtual, x[:, 1:]], dim=1)


def _fill(like: torch.Tensor, length: int, value) -> torch.Tensor:
    return torch.full((like.shape[0], length, *like.shape[2:]), value, dtype=like.dtype, device=like.device)


def extend_positions(pos: torch.Tensor, length: int, combine: str) -> torch.Tensor:
    """Position ids (..., n) with `length` virtual positions inserted; the real tokens after them shift by length."""
    steps = torch.arange(length, dtype=pos.dtype, device=pos.device)
    first = pos[..., :1]
    if combine == "prefix":
        return torch.cat([first + steps, pos + length], dim=-1)
    return torch.cat([first, first + 1 + steps, pos[..., 1:] + length], dim=-1)


class PromptTuningLayer(AdapterContainer):
    """Prompt tuning / P-tuning adapters by name, and the hooks that put the running adapters' virtual tokens into
    the input (several running adapters: their prompts one after another, in the active order)."""

    def __init__(self):
        super().__init__()
        self.prompt_tunings = nn.ModuleDict()
        self._model: list[nn.Module] = []     # the top-level model (a list: not a submodule)
        self._token_labels = True
        self._signatures: dict[int, inspect.Signature] = {}

    def store(self) -> nn.Module:
        return self.prompt_tunings

    def attach(self, model: nn.Module, token_labels: bool) -> None:
        """Hook `model` (encoder-decoder: its encoder and decoder). token_labels: labels are per token (B, n) and
        get -100 at the virtual positions (causal LM, token classification); else (sequence classification)
        they are left alone."""
        self._model[:] = [model]
        self._token_labels = token_labels
        if getattr(model.config, "is_encoder_decoder", False):
            self.hook(model.get_encoder().register_forward_pre_hook(self._encoder_hook, with_kwargs=True))
            self.hook(model.get_decoder().register_forward_pre_hook(self._decoder_hook, with_kwargs=True))
        else:
            self.hook(model.register_forward_pre_hook(self._model_hook, with_kwargs=True))

    def detach(self) -> None:
        super().detach()
        self._model.clear()

    # -------------------------------------------------------------------------------------------- the prompt
    def prompt(self) -> tuple[torch.Tensor | None, str]:
        """The running adapters' virtual token embeddings (P, hidden) and their combine mode (None: none running)."""
        names = self.running_adapters()
        if not names:
            return None, "prefix"
        modules = [self.prompt_tunings[n] for n in names]
        combines = {m.combine for m in modules}
        if len(combines) > 1:
            raise AdapterError(f"prompt tuning: the active adapters {names} combine their prompts differently "
                               f"({sorted(combines)}); activate only adapters with one combine mode.")
        virtual = modules[0]() if len(modules) == 1 else torch.cat([m() for m in modules], dim=0)
        return virtual, combines.pop()

    def prompt_length(self) -> int:
        return sum(self.prompt_tunings[n].prompt_length for n in self.running_adapters())

    def combine(self) -> str:
        """The running adapters' combine mode, without computing their prompts."""
        names = self.running_adapters()
        return self.prompt_tunings[names[0]].combine if names else "prefix"

    # -------------------------------------------------------------------------------------------- the hooks
    def _bind(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """Every argument of module.forward by name (positional ones included)."""
        if not args:
            return dict(kwargs)
        sig = self._signatures.get(id(module))
        if sig is None:
            sig = self._signatures[id(module)] = inspect.signature(module.forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
        out = {}
        for key, value in bound.items():
            if sig.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif sig.parameters[key].kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise AdapterError(f"prompt tuning: {type(module).__name__} was called with extra positional "
                                       "arguments; pass inputs by name (input_ids=..., attention_mask=...).")
            else:
                out[key] = value
        return out

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.running_adapters():
            return None
        kw = self._bind(module, args, kwargs)
        past = kw.get("past_key_values")
        cached = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        if cached:
            return (), self._decode_step(kw, cached)
        return (), self._insert(kw, type(module).__name__, self._token_labels)

    def _encoder_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.running_adapters():
            return None
        return (), self._insert(self._bind(module, args, kwargs), type(module).__name__, False)

    def _decoder_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        length = self.prompt_length()
        if not length:
            return None
        kw = self._bind(module, args, kwargs)
        mask, hidden = kw.get("encoder_attention_mask"), kw.get("encoder_hidden_states")
        if mask is None or hidden is None or mask.dim() != 2 or mask.shape[-1] + length != hidden.shape[1]:
            return (), kw
        kw["encoder_attention_mask"] = insert(mask, _fill(mask, length, 1), self.combine())
        return (), kw

    def _insert(self, kw: dict, where: str, token_labels: bool) -> dict:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            return kw
        virtual, combine = self.prompt()
        if embeds is None:
            embeds = self._model[0].get_input_embeddings()(ids)
        batch, n = embeds.shape[:2]
        if combine == "prefix_after_bos" and n < 1:
            raise AdapterError(f"prompt tuning ({where}): combine='prefix_after_bos' needs at least one input token "
                               "(the first one the prompt goes after); pass one, or use combine='prefix'.")
        length = virtual.shape[0]
        kw["input_ids"] = None
        kw["inputs_embeds"] = insert(embeds, virtual.to(embeds.dtype)[None].expand(batch, -1, -1), combine)
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or tuple(mask.shape) != (batch, n):
                raise AdapterError(f"prompt tuning ({where}): attention_mask has shape {tuple(mask.shape)} but the "
                                   f"input is ({batch}, {n}); pass a 2-D mask (batch, sequence) of the input's shape "
                                   f"(the {length} virtual tokens are added to it).")
            kw["attention_mask"] = insert(mask, _fill(mask, length, 1), combine)
        labels = kw.get("labels")
        if labels is not None and token_labels and labels.dim() >= 2:
            if tuple(labels.shape[:2]) != (batch, n):
                raise AdapterError(f"prompt tuning ({where}): labels have shape {tuple(labels.shape)} but the input "
                                   f"is ({batch}, {n}); pass per-token labels of the input's shape (the virtual "
                                   "tokens get -100).")
            kw["labels"] = insert(labels, _fill(labels, length, -100), combine)
        pos = kw.get("position_ids")
        if pos is not None:
            if pos.shape[-1] != n:
                raise AdapterError(f"prompt tuning ({where}): position_ids have shape {tuple(pos.shape)} but the "
                                   f"input has {n} tokens; pass one position per input token.")
            kw["position_ids"] = extend_positions(pos, length, combine)
        types = kw.get("token_type_ids")
        if types is not None:
            if tuple(types.shape) != (batch, n):
                raise AdapterError(f"prompt tuning ({where}): token_type_ids have shape {tuple(types.shape)} but the "
                                   f"input is ({batch}, {n}).")
            kw["token_type_ids"] = insert(types, _fill(types, length, 0), combine)
        return kw

    def _decode_step(self, kw: dict, cached: int) -> dict:
        """A call with a filled KV cache: the prompt is in the cache already; extend the mask, shift positions."""
        length, combine = self.prompt_length(), self.combine()
        tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        n = tokens.shape[1] if tokens is not None else 0
        mask = kw.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise AdapterError("prompt tuning: generation with a prompt adapter needs a 2-D attention mask and a "
                               "dynamic KV cache (the default); a 4-D mask (e.g. from a static cache) cannot be "
                               "extended by the virtual tokens. Use cache_implementation='dynamic'.")
        if mask is not None and mask.shape[-1] == cached + n - length:
            kw["attention_mask"] = insert(mask, _fill(mask, length, 1), combine)
        elif mask is not None and mask.shape[-1] != cached + n:
            raise AdapterError(f"prompt tuning: attention_mask covers {mask.shape[-1]} tokens but the KV cache holds "
                               f"{cached} (with {length} virtual tokens) and {n} are new; pass the mask of the real "
                               f"tokens ({cached + n - length}).")
        pos = kw.get("position_ids")
        if pos is not None:
            kw["position_ids"] = pos + length
        return kw


def repeat_to(ids: list[int], length: int) -> list[int]:
    """PEFT's text init: the token ids cut to `length`, or repeated until they reach it."""
    return (ids * math.ceil(length / len(ids)))[:length]
