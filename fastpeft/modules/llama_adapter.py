"""LLaMA-Adapter's parameters (PEFT's names) and the pool that hands each attention layer its adaption terms.

Per adapter and adapted layer: an adaption prompt A (1, adapter_len, hidden), initialised N(0, 1), and a gate g (1,),
initialised 0 (PEFT's `adaption_prompt`, `adaption_gate`; Zhang et al. 2023, "LLaMA-Adapter"). In that layer's
attention call the prompt's keys and values come from the layer's own projections, without position:

    A_K = A W_k (+ b_k),  A_V = A W_v (+ b_v)   viewed as (1, H_kv, adapter_len, D)

and modules.attention.site_attention adds g · softmax(Q A_Kᵀ · scale) A_V to the attention output (before the output
projection), through fp.ops.prefix_attention with zero real keys. At g = 0 the model computes what it did before.
The projections run inside the attention module's forward, so gradient checkpointing recomputes them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import pack_rows
from .base import AdapterContainer
from .batch import context_of, current_batch, no_adapters, row_names


class AdaptionPrompt(nn.Module):
    """One layer's adaption prompt and gate."""

    def __init__(self, length: int, hidden: int):
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.empty(1, length, hidden).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1))

    def keys_values(self, k_proj: nn.Module, v_proj: nn.Module, heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
        """(A_K, A_V), each (1, H_kv, adapter_len, D)."""
        prompt = self.adaption_prompt
        dtype = getattr(getattr(k_proj, "weight", None), "dtype", None)
        if dtype is not None and dtype.is_floating_point and dtype != prompt.dtype:
            prompt = prompt.to(dtype)
        length = prompt.shape[1]
        keys = k_proj(prompt).view(1, length, heads, head_dim).transpose(1, 2)
        values = v_proj(prompt).view(1, length, heads, head_dim).transpose(1, 2)
        return keys, values


class LlamaAdapterGroup(nn.ModuleDict):
    """One adapter's prompts by model layer index (keys "0", "1", ...: the layers it adapts, PEFT's top layers)."""

    def __init__(self, layers: list[int], length: int, hidden: int):
        super().__init__({str(i): AdaptionPrompt(length, hidden) for i in layers})

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.keys()]


class LlamaAdapterPool(AdapterContainer):
    """`<base model>.llama_adapter`: every LLaMA-Adapter of the model (`adaption_prompts.<name>.<layer>`). Each
    running adapter that adapts a layer adds its own gated term there (PEFT runs one adapter at a time)."""

    def __init__(self):
        super().__init__()
        self.adaption_prompts = nn.ModuleDict()

    def store(self) -> nn.Module:
        return self.adaption_prompts

    def terms(self, module: nn.Module, layer: int, k_name: str, v_name: str, heads: int, head_dim: int,
              rows: int) -> list[tuple]:
        """(A_K, A_V, gate, None, None) of every running adapter that adapts `layer` (whose attention module is
        `module`); in a multi-adapter batch one term: the rows' adaption prompts packed for per-row selection, the
        gates per row (0 for a row without one)."""
        batch = current_batch(self)
        key = str(layer)
        if batch is not None:
            return self._batch_terms(module, key, k_name, v_name, heads, head_dim, batch, rows)
        found = []
        for name in self.running_adapters():
            group = self.adaption_prompts[name]
            if key not in group:
                continue
            prompt = group[key]
            a_k, a_v = prompt.keys_values(module.get_submodule(k_name), module.get_submodule(v_name), heads, head_dim)
            found.append((a_k, a_v, prompt.adaption_gate, None, None))
        return found

    @torch.compiler.disable  # multi-adapter batches run eagerly (host-side routing)
    def _batch_terms(self, module, key, k_name, v_name, heads, head_dim, batch, rows) -> list[tuple]:
        names = row_names(self, batch, rows)
        made = {}
        with context_of(self).running(no_adapters(self)):  # the prompts' keys and values: the base projections
            for n in dict.fromkeys(x for x in names if x is not None):
                group = self.adaption_prompts[n]
                made[n] = group[key].keys_values(module.get_submodule(k_name), module.get_submodule(v_name), heads,
                                                 head_dim) if key in group else None
        packed = pack_rows(names, made)
        if packed is None:
            return []
        zero = next(p for p in self.parameters()).new_zeros(1)
        gates = torch.cat([self.adaption_prompts[n][key].adaption_gate if n is not None and made[n] is not None
                           else zero for n in names]).view(rows, 1, 1, 1)
        return [(packed[0], packed[1], gates, packed[2], packed[3])]


class AdaptionSource:
    """An attention site's `adaption` (modules/attention.py): the pool's terms for model layer `index`, whose prompt
    keys and values come from the attention module's `k_name` / `v_name` projections (H_kv heads of head_dim)."""

    def __init__(self, pool: LlamaAdapterPool, index: int, k_name: str, v_name: str, heads: int, head_dim: int):
        self.pool, self.index, self.k_name, self.v_name = pool, index, k_name, v_name
        self.heads, self.head_dim = heads, head_dim

    def __call__(self, module: nn.Module, rows: int) -> list[tuple]:
        return self.pool.terms(module, self.index, self.k_name, self.v_name, self.heads, self.head_dim, rows)
