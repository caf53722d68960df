"""`LoRALinear`: LoRA and DoRA adapters around an nn.Linear or a GPT-2 Conv1D, kept intact as `base_layer`.

    LoRA:  y = base(x) + Σ_active s_i · drop_i(x) A_iᵀ B_iᵀ,      s_i = alpha_i / r_i (alpha_i / √r_i for rsLoRA)
    DoRA:  y = m / ‖W + s B A‖ ⊙ (x Wᵀ + s · drop(x) Aᵀ Bᵀ) + b    (the norm a constant for autograd, as PEFT)
    AdaLoRA (SVD form): the per-rank scale is s · E, E (r,) learned singular values (zero where pruned)

Every active LoRA adapter whose dropout is off runs in one call of `fp.ops.lora_linear` (their A, B and scales
concatenated along the rank), fused with the base GEMM; a DoRA adapter runs `fp.ops.dora_linear` and must be the
only running adapter of its layer. Merging folds the update into the base weight; the original weight is stashed
(on the CPU for CUDA models) so that unmerging restores it bit for bit.

On a quantized base (base_layers.quantized_kind: bitsandbytes 4-bit/8-bit, torchao) the base product is the
layer's own forward and each adapter's term is added in the adapters' float32, as PEFT computes it:
y = base(x) + (B (A drop(x))) · s, in multi-adapter batches too (the base product once, each row group's term
added to its rows); DoRA as PEFT computes it there, its norm from the library's dequantized weight. AdaLoRA and
merging are refused there.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..errors import AdapterError
from .base import AdapterLayer
from .base_layers import adapter_dtype, dequantized_weight, is_conv1d, linear_features, packed_4bit, quantized_kind
from .batch import RowBatch, SlotTables, context_of, current_batch


class _Buffers(nn.Module):
    """Non-persistent buffers by name (the per-rank scale vectors): they follow .to(), stay out of state_dict."""

    def set(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def remove(self, name: str) -> None:
        del self._buffers[name]

    def _apply(self, fn, recurse=True):
        """.to()/.half() move the scales but keep them float32 (a bf16 alpha / r would lose digits)."""
        super()._apply(fn, recurse)
        for key, value in self._buffers.items():
            if value is not None and value.dtype != torch.float32:
                self._buffers[key] = value.float()
        return self


class LoRALinear(AdapterLayer):
    """LoRA adapters (any number, any ranks) on one linear layer."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.quantized = quantized_kind(base_layer)  # None, or the kind whose forward computes the base product
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scale = _Buffers()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters: m (out,), PEFT's name
        self.lora_E = nn.ParameterDict()  # AdaLoRA adapters: the singular values E (r,)
        self._original_weight: torch.Tensor | None = None
        self._weight_sq_norm: tuple[tuple, torch.Tensor] | None = None  # ‖W_n‖², valid while W is unchanged
        self._weight_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # DoRA ‖W + sBA‖ per adapter, with its key
        self._tables = SlotTables()  # the adapters by slot, for multi-adapter batches

    # ---------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    init_weights: bool | str = True, use_dora: bool = False, svd: bool = False,
                    scaling: float | None = None) -> None:
        """A LoRA adapter of rank r; `use_dora` adds DoRA's magnitude; `svd` makes it AdaLoRA's SVD form
        (E = 0 and A, B ~ N(0, 0.02²) at init, as PEFT; the per-rank scale is `scaling` · E)."""
        w = self.base_layer.weight
        if self.quantized and svd:
            raise AdapterError(f"AdaLoRA adapters are not supported on quantized layers ({self.quantized}) yet; use "
                               "LoRA (or rsLoRA, DoRA) here, or load the base model without quantization.")
        dtype = torch.float32 if self.quantized else adapter_dtype(w)  # PEFT's float32 adapters on quantized bases
        a = torch.empty(r, self.in_features, device=w.device, dtype=dtype)
        b = torch.zeros(self.out_features, r, device=w.device, dtype=dtype)
        if svd:
            nn.init.normal_(a, std=0.02)
            nn.init.normal_(b, std=0.02)
        elif init_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights is False and not svd:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.r[name], self.alpha[name], self.dropout[name] = r, float(alpha), float(dropout)
        if scaling is None:
            scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.set_scaling(name, scaling)
        if svd:
            e = torch.zeros(r, device=w.device, dtype=dtype)
            if init_weights is False:
                nn.init.normal_(e, std=1.0)
            self.lora_E[name] = nn.Parameter(e)
        if use_dora and self.quantized:  # with the norm the forward computes: exactly the identity at B = 0
            with torch.no_grad():
                norm = self._quantized_norm(name, dequantized_weight(self.base_layer).to(dtype))
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))
        elif use_dora:  # m starts as ‖W + s B A‖ (= ‖W‖ when B = 0): the adapter starts as the identity
            norm = ops.dora_weight_norm(w, a, self.lora_B[name], self.scaling[name], fan_in_fan_out=self.fan_in_fan_out)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))
        self._tables.clear()

    def set_scaling(self, name: str, scaling: float) -> None:
        self.scaling[name] = float(scaling)
        device = self.lora_A[name].device
        self.lora_scale.set(name, torch.full((self.r[name],), float(scaling), device=device, dtype=torch.float32))
        self._tables.clear()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into this layer's weight; unmerge_adapter first.")
        for table in (self.lora_A, self.lora_B):
            del table[name]
        self.lora_scale.remove(name)
        for table in (self.lora_magnitude_vector, self.lora_E):
            if name in table:
                del table[name]
        self._weight_norms.pop(name, None)
        for table in (self.r, self.alpha, self.scaling, self.dropout):
            table.pop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self._tables.clear()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        extra = [t[name] for t in (self.lora_magnitude_vector, self.lora_E) if name in t]
        return [self.lora_A[name], self.lora_B[name], *extra]

    def rank_scale(self, name: str) -> torch.Tensor:
        """The per-rank scale (r,) float32: s repeated, or s · E for an AdaLoRA adapter (then differentiable)."""
        if name in self.lora_E:
            return self.lora_E[name].float() * self.scaling[name]
        return getattr(self.lora_scale, name)

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = current_batch(self)
        if batch is not None and not self.disabled:
            return self._batch_forward(x, batch)
        names = self.running_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_names(x, names)

    def _forward_names(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The forward with these adapters running (not merged)."""
        if self.quantized:
            return self._quantized_forward(x, names)
        if any(self.is_dora(n) for n in names):
            return self._dora_forward(x, names)
        fused, extra = self._group_by_dropout(names)
        a, b, s = self._stack(fused)
        p = self.dropout[fused[0]] if self.training and len(fused) == 1 else 0.0
        y = ops.lora_linear(x, self.base_layer.weight, self.base_layer.bias, a, b, s, dropout_p=p,
                            fan_in_fan_out=self.fan_in_fan_out)
        for name in extra:  # a second adapter with active dropout needs its own mask: plain PyTorch
            h = nn.functional.dropout(x, self.dropout[name], training=True).to(self.lora_A[name].dtype)
            y = y + (((h @ self.lora_A[name].t()) * self.rank_scale(name)) @ self.lora_B[name].t()).to(y.dtype)
        return y

    def _quantized_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """y = base(x), the quantization library's own product, + Σ (B_i (A_i drop_i(x))) · s_i in the adapters'
        float32, rounded once to y's dtype (PEFT's order, so zero-initialised adapters leave y unchanged)."""
        if self.quantized == "bnb_4bit" and not any(self.is_dora(n) for n in names):
            y = self._lora_4bit_forward(x, names)
            if y is not None:
                return y
        y = self.base_layer(x)
        if any(self.is_dora(n) for n in names):
            return y + self._quantized_dora_term(x, y, names)
        for n in names:
            y = y + self._lora_term(x, n, y.dtype)
        return y

    @torch.compiler.disable  # the 4-bit op is an autograd.Function around launches (not a registered op)
    def _lora_4bit_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
        """On CUDA (a Triton backend), the whole layer in fastpeft's 4-bit op (fastpeft/ops/lora_4bit.py): the base
        product from the packed weight, the adapters' term in its epilogue, in the layer's compute dtype as the
        library's forward runs it. None where the op's backend is the reference (the library's forward then runs)."""
        layer = self.base_layer
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            return None  # bitsandbytes repacked W for its own CPU kernel (eval on an AVX512-BF16 CPU): it reads it
        compute = layer.compute_dtype or x.dtype
        if ops.lora_4bit.path(x.device, compute, x.numel() // max(x.shape[-1], 1)) == "torch":
            return None
        fused, extra = self._group_by_dropout(names)
        a, b, s = self._stack(fused)
        p = self.dropout[fused[0]] if self.training and len(fused) == 1 else 0.0
        bias = layer.bias.to(compute) if layer.bias is not None else None
        y = ops.lora_linear_4bit(x.to(compute), packed_4bit(layer.weight.data, layer.weight.quant_state), bias, a, b, s, dropout_p=p)
        for n in extra:  # a second adapter with active dropout needs its own mask
            y = y + self._lora_term(x, n, y.dtype)
        return y.to(x.dtype)

    def _quantized_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s B A‖ along the input features, B A formed as PEFT's DoRA layer forms it (B (A I))ᵀ."""
        a, b = self.lora_A[name], self.lora_B[name]
        eye = torch.eye(a.shape[1], device=a.device, dtype=a.dtype)
        lora_weight = nn.functional.linear(nn.functional.linear(eye, a), b).t()
        return torch.linalg.norm(weight + self.scaling[name] * lora_weight.detach(), dim=1)

    def _quantized_dora_term(self, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
        """DoRA on a quantized base, PEFT's formula: with c = m / ‖W + s B A‖ (a constant for autograd), W the
        library's dequantized weight and z = x Wᵀ the base output without bias (y − b, or x Wᵀ from the dropped x
        when dropout is on): (c − 1) ⊙ z + c ⊙ (B (A drop(x))) · s, rounded once to y's dtype."""
        if len(names) > 1:
            dora = next(n for n in names if self.is_dora(n))
            raise AdapterError(f"adapters {names} are active on one layer, and DoRA adapter {dora!r} runs alone on "
                               "its layer: activate only it there (fp.set_active_adapters).")
        n = names[0]
        a, b = self.lora_A[n], self.lora_B[n]
        h = x.to(a.dtype)
        weight = dequantized_weight(self.base_layer).to(h.dtype)
        scale = (self.lora_magnitude_vector[n] / self._quantized_norm(n, weight).detach()).view(1, -1)
        bias = self.base_layer.bias
        if self.training and self.dropout[n] > 0.0:
            h = nn.functional.dropout(h, self.dropout[n], training=True)
            z = nn.functional.linear(h, weight)
        else:
            z = y - bias if bias is not None else y
        lora = nn.functional.linear(nn.functional.linear(h, a), b)
        return ((scale - 1) * z + scale * lora * self.scaling[n]).to(y.dtype)

    def _lora_term(self, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """(B (A drop(x))) · s in the adapter's dtype, rounded once to `dtype` (PEFT's order)."""
        a, b = self.lora_A[name], self.lora_B[name]
        h = x.to(a.dtype)
        if self.training and self.dropout[name] > 0.0:
            h = nn.functional.dropout(h, self.dropout[name], training=True)
        return (nn.functional.linear(nn.functional.linear(h, a), b) * self.scaling[name]).to(dtype)

    def _quantized_batch_forward(self, x: torch.Tensor, routing, mine: dict[int, str]) -> torch.Tensor:
        """A multi-adapter batch on a quantized base: the library's product for the whole batch once, then each
        row group's own adapter term added to its rows (PEFT's mixed-batch forward)."""
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base_layer(x2)
        for slot, rows in routing.segments():
            if slot in mine:
                rows, n = rows.to(x.device), mine[slot]
                h = x2.index_select(0, rows)
                term = self._quantized_dora_term(h, y.index_select(0, rows), [n]) if self.is_dora(n) else \
                    self._lora_term(h, n, y.dtype)
                y = y.index_add(0, rows, term)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    # ---------------------------------------------------------------------------------------- batched forward
    @torch.compiler.disable  # multi-adapter batches run eagerly (host-side routing)
    def _batch_forward(self, x: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        """Each row with its own adapter (or none): one fp.ops.multi_lora_linear call for every LoRA adapter of the
        batch, whatever their ranks; DoRA adapters, and AdaLoRA ones being trained, run row group by row group."""
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged into this layer's weight; a multi-adapter "
                               "batch needs unmerged adapters: call fp.unmerge_adapter(model) first.")
        routing = batch.routing(x, where="LoRA layer")
        bank, mine, used = self._tables.get(self, batch, self._slot_source, self._bank)
        if not used:
            return self.base_layer(x)
        if self.quantized:
            return self._quantized_batch_forward(x, routing, mine)
        if any(self.is_dora(n) or (n in self.lora_E and self.lora_E[n].requires_grad and torch.is_grad_enabled())
               for n in used):
            return self._grouped_forward(x, routing, mine)
        h = self._dropped_input(x, routing, used) if self.training else None
        return ops.multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, bank=bank, adapter_index=routing,
                                     fan_in_fan_out=self.fan_in_fan_out, adapter_input=h)

    def _slot_source(self, name: str) -> tuple:
        """What the bank holds of adapter `name`: changes when its tensors move or are replaced."""
        ctx = context_of(self)
        e = self.lora_E[name] if name in self.lora_E else None
        extra = (e.data_ptr(), e._version, self.scaling[name]) if e is not None else (
            getattr(self.lora_scale, name).data_ptr(),)
        return (ctx.ids[name], self.lora_A[name].data_ptr(), self.lora_B[name].data_ptr(), *extra)

    def _bank(self, names: dict[int, str]) -> ops.LoRABank:
        size = max(names, default=-1) + 1
        a, b, s = [None] * size, [None] * size, [None] * size
        for slot, n in names.items():
            a[slot], b[slot], s[slot] = self.lora_A[n], self.lora_B[n], self.rank_scale(n).detach()
        return ops.LoRABank(a, b, s, where=f"LoRA layer ({self.in_features} -> {self.out_features})")

    def _dropped_input(self, x: torch.Tensor, routing, used: list[str]) -> torch.Tensor | None:
        """Each token's input after its own adapter's dropout (None when no used adapter drops)."""
        ctx = context_of(self)
        rates = {ctx.ids[n]: self.dropout[n] for n in used if self.dropout[n] > 0.0}
        if not rates:
            return None
        p = torch.zeros(max(rates) + 2, device=x.device, dtype=torch.float32)  # last entry: tokens without one
        p[list(rates)] = torch.tensor(list(rates.values()), device=x.device)
        slot = routing.token_slot.long().where(routing.token_slot >= 0, p.shape[0] - 1).clamp(max=p.shape[0] - 1)
        p_tok = p[slot].view(*x.shape[:-1], 1)
        keep = torch.rand(x.shape, device=x.device) >= p_tok
        return (x * keep / (1.0 - p_tok)).to(x.dtype)

    def _grouped_forward(self, x: torch.Tensor, routing, mine: dict[int, str]) -> torch.Tensor:
        """Row group by row group: the base output, each group's rows replaced by its adapter's forward."""
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base_layer(x2)
        for slot, rows in routing.segments():
            if slot in mine:
                rows = rows.to(x.device)
                y = y.index_copy(0, rows, self._forward_names(x2.index_select(0, rows), [mine[slot]]))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _dora_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        if len(names) > 1:
            dora = next(n for n in names if self.is_dora(n))
            raise AdapterError(f"adapters {names} are active on one layer, and DoRA adapter {dora!r} runs alone on "
                               "its layer: activate only it there (fp.set_active_adapters), or merge the others.")
        n = names[0]
        weight, scale = self.base_layer.weight, self.rank_scale(n)
        p = self.dropout[n] if self.training else 0.0
        return ops.dora_linear(x, weight, self.base_layer.bias, self.lora_A[n], self.lora_B[n], scale,
                               self.lora_magnitude_vector[n], dropout_p=p, fan_in_fan_out=self.fan_in_fan_out,
                               weight_norm=self._cached_weight_norm(n, scale))

    def _cached_weight_norm(self, name: str, scale: torch.Tensor) -> torch.Tensor | None:
        """In eval mode, ‖W + s B A‖ (and ‖W_n‖²) kept while W, A and B are unchanged: decode steps reuse them.
        Training recomputes them every call (edits through `.data` would not show in the version counters)."""
        if self.training or torch.compiler.is_compiling():
            return None
        w, a, b = self.base_layer.weight, self.lora_A[name], self.lora_B[name]

        def version(t):
            return (t._version, t.data_ptr(), t.dtype, t.device)

        w_key = version(w)
        if self._weight_sq_norm is None or self._weight_sq_norm[0] != w_key:
            self._weight_sq_norm = (w_key, ops.dora_weight_sq_norm(w.detach(), fan_in_fan_out=self.fan_in_fan_out))
        key = (w_key, version(a), version(b), self.scaling[name])
        cached = self._weight_norms.get(name)
        if cached is None or cached[0] != key:
            norm = ops.dora_weight_norm(w, a, b, scale.detach(), fan_in_fan_out=self.fan_in_fan_out,
                                        weight_sq_norm=self._weight_sq_norm[1])
            self._weight_norms[name] = cached = (key, norm)
        return cached[1]

    def train(self, mode: bool = True):
        self._weight_sq_norm, self._weight_norms = None, {}  # like PEFT's DoRA cache: eval mode only
        return super().train(mode)

    def _group_by_dropout(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Adapters without active dropout share one fused call; each one with dropout needs its own mask."""
        if not self.training:
            return names, []
        plain = [n for n in names if self.dropout[n] == 0.0]
        noisy = [n for n in names if self.dropout[n] > 0.0]
        return (plain, noisy) if plain else (noisy[:1], noisy[1:])

    def _stack(self, names: list[str]):
        if len(names) == 1:
            n = names[0]
            return self.lora_A[n], self.lora_B[n], self.rank_scale(n)
        a = torch.cat([self.lora_A[n] for n in names], dim=0)
        b = torch.cat([self.lora_B[n] for n in names], dim=1)
        s = torch.cat([self.rank_scale(n) for n in names])
        return a, b, s

    # ---------------------------------------------------------------------------------------------- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """B diag(s) A in float32, in the base weight's layout."""
        delta = (self.lora_B[name].float() * self.rank_scale(name).detach()) @ self.lora_A[name].float()
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight, in order after those merged before, in float32 from the
        original weight W0 with one rounding: LoRA W += s·B·A; DoRA W = m / ‖W0 + s·B·A‖ ⊙ (W + s·B·A) (PEFT)."""
        if self.quantized:
            raise AdapterError(f"adapter {name!r}: merging into a quantized base ({self.quantized}) is not supported: "
                               "adding s·B·A to the dequantized weight and quantizing again would round it, and "
                               "unmerging could not restore the weights exactly. Keep the adapter unmerged, or load "
                               "the base model without quantization to merge. Nothing was changed.")
        weight = self.base_layer.weight
        if self._original_weight is None:
            stash_device = "cpu" if weight.device.type != "cpu" else weight.device
            self._original_weight = weight.detach().to(stash_device, copy=True)
        original = self._original_weight.to(weight.device, torch.float32, copy=True)
        merged = original.clone()
        out_axis = 0 if self.fan_in_fan_out else 1  # the axis the norm runs along (the input features)
        for n in [*self.merged_adapters, name]:
            delta = self.delta_weight(n).to(weight.device)
            merged += delta
            if self.is_dora(n):
                norm = torch.linalg.vector_norm(original + delta, dim=out_axis)
                factor = self.lora_magnitude_vector[n].float() / norm
                merged *= factor[None, :] if self.fan_in_fan_out else factor[:, None]
        weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight as it was before the first merge, bit for bit."""
        if self._original_weight is not None:
            self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}], "
                f"active={self.active_adapters}, merged={self.merged_adapters}")


def orthogonality(name: str, layers: list[LoRALinear]) -> torch.Tensor:
    """mean over AdaLoRA adapter `name`'s A and B on `layers` of ‖AAᵀ - I‖_F and ‖BᵀB - I‖_F (PEFT's penalty)."""
    terms = []
    for layer in layers:
        for p, gram in ((layer.lora_A[name], lambda t: t @ t.t()), (layer.lora_B[name], lambda t: t.t() @ t)):
            cov = gram(p)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


class OrthogonalPenalty:
    """AdaLoRA's forward hook on the model: output.loss += orth_reg_weight · orthogonality(name, layers) while the
    adapter is active (as PEFT). The weight is read from the config on every call."""

    def __init__(self, name: str, config, layers: list[LoRALinear]):
        self.name, self.config, self.layers = name, config, layers

    def __call__(self, model: nn.Module, args, output):
        loss = getattr(output, "loss", None)
        active = any(self.name in layer.active_adapters for layer in self.layers)
        if not active or not isinstance(loss, torch.Tensor):
            return output
        weight = self.config.orth_reg_weight
        if weight > 0:
            output.loss = loss + weight * orthogonality(self.name, self.layers).to(loss.dtype)
        return output
