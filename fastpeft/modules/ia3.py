"""`IA3Linear`: (IA)³ scaling vectors around an nn.Linear or a GPT-2 Conv1D, kept intact as `base_layer`.

    attention targets (k, v):   y = (x Wᵀ + b) ⊙ Π_active l_i        l_i: (out,)
    feed-forward targets:       y = (x ⊙ Π_active l_i) Wᵀ + b        l_i: (in,)    (Liu et al. 2022; PEFT)

One call of `fp.ops.ia3_linear`: the scaling is folded into the base GEMM. Merging multiplies the vector into
the weight (and, for output scaling, the bias); the originals are stashed so unmerging restores them bit for bit.
Around a LoRA layer (a layer holding adapters of both methods) the vector scales that layer's output (or input).
In a multi-adapter batch each row scales by its own adapter's vector (fp.ops.multi_ia3_linear).
On a quantized base (base_layers.quantized_kind) the layer's own forward computes the product and the vector scales
its float32 input or output, as PEFT's quantized IA3 layers do (in a multi-adapter batch each row's vector around
one call of it); merging is refused there.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..errors import AdapterError
from .base import AdapterLayer
from .base_layers import adapter_dtype, is_conv1d, linear_features, quantized_kind
from .batch import RowBatch, SlotTables, context_of, current_batch


class IA3Linear(AdapterLayer):
    """IA3 adapters (any number; their vectors multiply) on one linear layer."""

    def __init__(self, base_layer: nn.Module, *, is_feedforward: bool):
        super().__init__(base_layer)
        self.fan_in_fan_out = base_layer.fan_in_fan_out if isinstance(base_layer, AdapterLayer) else is_conv1d(
            base_layer)
        self.is_feedforward = bool(is_feedforward)
        self.quantized = quantized_kind(base_layer)  # None, or the kind whose forward computes the base product
        if isinstance(base_layer, AdapterLayer):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = linear_features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self._originals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._tables = SlotTables()  # the vectors by slot, for multi-adapter batches

    def add_adapter(self, name: str, *, init_weights: bool = True) -> None:
        w = self.base_layer.weight
        size = self.in_features if self.is_feedforward else self.out_features
        dtype = torch.float32 if self.quantized else adapter_dtype(w)  # PEFT's float32 vectors on quantized bases
        vector = torch.ones(size, device=w.device, dtype=dtype)
        if not init_weights:  # random scales around one (tests: the adapter then changes the output)
            vector.add_(torch.randn_like(vector), alpha=0.2)
        self.ia3_l[name] = nn.Parameter(vector)
        self._tables.clear()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into this layer's weight; unmerge_adapter first.")
        del self.ia3_l[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self._tables.clear()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]]

    def scale(self, names: list[str]) -> torch.Tensor:
        """Π l_i over `names` (float32 for half-precision bases)."""
        vector = self.ia3_l[names[0]]
        for n in names[1:]:
            vector = vector * self.ia3_l[n]
        return vector

    @property
    def wraps_adapters(self) -> bool:
        """Whether the base layer is itself an adapter layer (LoRA adapters on the same layer)."""
        return isinstance(self.base_layer, AdapterLayer)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = current_batch(self)
        if batch is not None and not self.disabled:
            return self._batch_forward(x, batch)
        names = self.running_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scale = self.scale(names)
        if self.quantized in ("bnb_4bit", "bnb_8bit"):  # PEFT's bitsandbytes layers: all in float32
            h = x if x.dtype == torch.float32 else x.float()
            y = self.base_layer(h * scale) if self.is_feedforward else self.base_layer(h)
            return (y if self.is_feedforward else y * scale).to(y.dtype)
        if self.quantized or (self.wraps_adapters and self.base_layer.running_adapters()):  # around another forward
            # (torchao's quantized product, or the LoRA layer this wraps): the scale in its dtype, rounded once
            if self.is_feedforward:
                return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
            y = self.base_layer(x)
            return (y.to(scale.dtype) * scale).to(y.dtype)
        return ops.ia3_linear(x, self.base_layer.weight, self.base_layer.bias,
                              in_scale=scale if self.is_feedforward else None,
                              out_scale=None if self.is_feedforward else scale, fan_in_fan_out=self.fan_in_fan_out)

    @torch.compiler.disable  # multi-adapter batches run eagerly (host-side routing)
    def _batch_forward(self, x: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        """Each row scaled by its own adapter's vector (rows of the inner LoRA layer's adapters by none)."""
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged into this layer's weight; a multi-adapter "
                               "batch needs unmerged adapters: call fp.unmerge_adapter(model) first.")
        bank, _, used = self._tables.get(self, batch, self._slot_source, self._bank)
        if not used:
            return self.base_layer(x)
        routing = batch.routing(x, where="IA3 layer")
        if self.wraps_adapters or self.quantized:  # around another forward (the inner LoRA layer adds its rows'
            # low-rank terms; a quantized layer's library computes the product)
            if self.is_feedforward:
                return self.base_layer(ops.multi_ia3_scale(x, bank=bank, adapter_index=routing))
            return ops.multi_ia3_scale(self.base_layer(x), bank=bank, adapter_index=routing)
        return ops.multi_ia3_linear(x, self.base_layer.weight, self.base_layer.bias, bank=bank, adapter_index=routing,
                                    feedforward=self.is_feedforward, fan_in_fan_out=self.fan_in_fan_out)

    def _slot_source(self, name: str) -> tuple:
        return (context_of(self).ids[name], self.ia3_l[name].data_ptr())

    def _bank(self, names: dict[int, str]) -> ops.IA3Bank:
        vectors = [None] * (max(names, default=-1) + 1)
        for slot, n in names.items():
            vectors[slot] = self.ia3_l[n]
        return ops.IA3Bank(vectors, where=f"IA3 layer ({self.in_features} -> {self.out_features})")

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W (and b, for output scaling) = round(original ⊙ Π_merged l), one rounding from the original."""
        if self.quantized:
            raise AdapterError(f"adapter {name!r}: merging into a quantized base ({self.quantized}) is not supported: "
                               "scaling the dequantized weight and quantizing again would round it, and unmerging "
                               "could not restore the weights exactly. Keep the adapter unmerged, or load the base "
                               "model without quantization to merge. Nothing was changed.")
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self._originals is None:
            stash = "cpu" if weight.device.type != "cpu" else weight.device
            self._originals = (weight.detach().to(stash, copy=True),
                               bias.detach().to(stash, copy=True) if bias is not None else None)
        scale = self.scale([*self.merged_adapters, name]).float().to(weight.device)
        # the vector runs along the weight's input axis (feed-forward) or output axis; Conv1D stores (in, out)
        along_rows = self.is_feedforward == self.fan_in_fan_out
        shaped = scale[:, None] if along_rows else scale[None, :]
        weight.copy_((self._originals[0].to(weight.device, torch.float32) * shaped).to(weight.dtype))
        if bias is not None and not self.is_feedforward:
            bias.copy_((self._originals[1].to(bias.device, torch.float32) * scale).to(bias.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight and bias as they were before the first merge, bit for bit."""
        if self._originals is not None:
            self.base_layer.weight.copy_(self._originals[0])
            if self._originals[1] is not None:
                self.base_layer.bias.copy_(self._originals[1])
        self._originals = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return (f"in_features={self.in_features}, out_features={self.out_features}, scales the {kind}, "
                f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}")
