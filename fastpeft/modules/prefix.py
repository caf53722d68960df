"""Prefix tuning's parameters (AdapterHub's names) and the pool that hands each attention layer its prefix.

One `PrefixTuning` per adapter and attention kind ("self_prefix"; T5 also "encoder_prefix", "cross_prefix") makes
the keys and values of all its n layers, viewed as (P, n, 2, H_kv, D) — the layout of AdapterHub's and PEFT's flat
prefixes, so index [p, layer, key/value, head, d]:

    reparameterised: KV = W_2 f(W_1 E + b_1) + b_2,   E = wte (P x hidden), W_2: (n·2·H_kv·D) x bottleneck
    flat:            KV = control_trans (a parameter of P·n·2·H_kv·D numbers)

A layer's prefix uses only its own rows of W_2, so every layer computes just its slice (inside the layer's
forward, which gradient checkpointing recomputes correctly). `eject()` gives the flat equivalent.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AdapterError
from .attention import pack_rows
from .base import Activation, AdapterContainer
from .batch import RowBatch, current_batch, row_names


class PrefixTuning(nn.Module):
    def __init__(self, n_layers: int, n_heads: int, head_dim: int, hidden: int, config):
        super().__init__()
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim
        self.prefix_length = config.prefix_length
        size = n_layers * 2 * n_heads * head_dim
        if config.flat:
            self.control_trans = nn.Parameter(torch.randn(config.prefix_length * size))
        else:
            self.wte = nn.Embedding(config.prefix_length, hidden)
            self.control_trans = nn.Sequential(nn.Linear(hidden, config.bottleneck_size),
                                               Activation(config.non_linearity),
                                               nn.Linear(config.bottleneck_size, size))
        self.dropout = nn.Dropout(config.dropout)

    @property
    def flat(self) -> bool:
        return isinstance(self.control_trans, nn.Parameter)

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """(P_K, P_V) of layer `index` (0..n-1), each (1, H_kv, P, D)."""
        P, H, D = self.prefix_length, self.n_heads, self.head_dim
        if self.flat:
            kv = self.control_trans.view(P, self.n_layers, 2, H, D)[:, index]
        else:
            first, act, last = self.control_trans
            h = act(first(self.wte.weight))
            rows = last.weight.view(self.n_layers, 2 * H * D, -1)[index]
            bias = last.bias.view(self.n_layers, 2 * H * D)[index]
            kv = torch.nn.functional.linear(h, rows, bias).view(P, 2, H, D)
        kv = self.dropout(kv).permute(1, 2, 0, 3)  # (2, H, P, D)
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)

    @torch.no_grad()
    def flat_prefix(self) -> Tensor:
        """All layers' keys and values as the flat vector (P·n·2·H_kv·D,), dropout off."""
        if self.flat:
            return self.control_trans.detach().clone()
        first, act, last = self.control_trans
        return last(act(first(self.wte.weight))).reshape(-1)

    def eject(self) -> None:
        """Replace the reparameterisation by the flat prefix it produces (same outputs, fewer parameters)."""
        if not self.flat:
            flat = nn.Parameter(self.flat_prefix(), requires_grad=self.control_trans[0].weight.requires_grad)
            del self.control_trans, self.wte
            self.control_trans = flat


class PrefixGroup(nn.ModuleDict):
    """One adapter's prefixes by attention kind, and `layers[kind]`: model layer index -> row in its PrefixTuning."""

    def __init__(self, prefixes: dict[str, PrefixTuning], layers: dict[str, list[int]]):
        super().__init__(prefixes)
        self.layers = {kind: {layer: i for i, layer in enumerate(ids)} for kind, ids in layers.items()}


class PrefixTuningPool(AdapterContainer):
    """`<base model>.prefix_tuning`: every prefix-tuning adapter of the model (`prefix_tunings.<name>`) and their
    gates (`prefix_gates.<name>.<kind>_<layer>`: Linear(hidden, 1 or 2), AdapterHub's gating)."""

    def __init__(self):
        super().__init__()
        self.prefix_tunings = nn.ModuleDict()
        self.prefix_gates = nn.ModuleDict()
        self.shift = {}  # adapter -> positions shifted by P (PEFT's layout)

    def store(self) -> nn.Module:
        return self.prefix_tunings

    def add(self, name: str, module: PrefixGroup, gates: nn.ModuleDict | None = None, shift: bool = False) -> None:
        self.prefix_tunings[name] = module
        if gates is not None:
            self.prefix_gates[name] = gates
        self.shift[name] = shift

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = list(self.prefix_tunings[name].parameters())
        return params + (list(self.prefix_gates[name].parameters()) if name in self.prefix_gates else [])

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        state = super().adapter_state(name)
        if name in self.prefix_gates:
            state.update({f"prefix_gates.{name}.{k}": v for k, v in self.prefix_gates[name].state_dict().items()})
        return state

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.prefix_gates:
            del self.prefix_gates[name]
        self.shift.pop(name, None)

    def prefix(self, kind: str, layer: int, hidden: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """The running adapters' prefixes for this layer, concatenated in order (a Stack reads them all)."""
        keys, values = [], []
        for name in self.running_adapters():
            group = self.prefix_tunings[name]
            if kind not in group or layer not in group.layers[kind]:
                continue
            k, v = group[kind].layer(group.layers[kind][layer])
            gates = self.prefix_gates[name] if name in self.prefix_gates else None
            if gates is not None and f"{kind}_{layer}" in gates:
                gate = gates[f"{kind}_{layer}"]  # float32 on half-precision models: the input follows it
                g = torch.sigmoid(gate(hidden.to(gate.weight.dtype))).mean(dim=1)   # (B, 1 or 2)
                k = k * g[:, 0].view(-1, 1, 1, 1).to(k.dtype)
                v = v * g[:, -1].view(-1, 1, 1, 1).to(v.dtype)
            keys.append(k)
            values.append(v)
        if not keys:
            return None
        if len(keys) == 1:
            return keys[0], values[0]
        rows = max(k.shape[0] for k in keys)
        return (torch.cat([k.expand(rows, -1, -1, -1) for k in keys], dim=2),
                torch.cat([v.expand(rows, -1, -1, -1) for v in values], dim=2))

    def position_shift(self) -> int:
        """How far real tokens' positions move (PEFT's layout: by the prefix length of a running adapter)."""
        return sum(self._shift_of(n) for n in self.running_adapters())

    def _shift_of(self, name: str | None) -> int:
        if name is None or name not in self.prefix_tunings or not self.shift.get(name):
            return 0
        return next(iter(self.prefix_tunings[name].values())).prefix_length

    def row_shifts(self, batch: RowBatch, rows: int) -> list[int]:
        """position_shift of each row of a multi-adapter batch (its own adapter's)."""
        return [self._shift_of(n) for n in row_names(self, batch, rows)]

    @torch.compiler.disable  # multi-adapter batches run eagerly (host-side routing)
    def batch_prefix(self, kind: str, layer: int, hidden: Tensor | None, batch: RowBatch, rows: int):
        """Each row's own adapter's prefix for this layer, for fp.ops.prefix_attention's per-row selection:
        (P_K, P_V, offsets, lengths) with the distinct adapters' prefixes packed along P (1, H_kv, ΣP, D) and row b
        reading [offsets[b], offsets[b] + lengths[b]) (length 0: no prefix); with gating, one gated (B, H_kv, P_max,
        D) prefix per row instead. None when no row has a prefix here. Without gradients it is kept for the batch
        (decode steps reuse it)."""
        gated = any(n in self.prefix_gates for n in batch.used)
        key = ("prefix", id(self), kind, layer, rows)
        if not gated and not torch.is_grad_enabled() and key in batch.memo:
            return batch.memo[key]
        names = row_names(self, batch, rows)
        made: dict[str, tuple[Tensor, Tensor] | None] = {}
        for n in names:
            if n is not None and n not in made:
                group = self.prefix_tunings[n] if n in self.prefix_tunings else None
                ok = group is not None and kind in group and layer in group.layers[kind]
                made[n] = group[kind].layer(group.layers[kind][layer]) if ok else None
        found = self._gated_rows(kind, layer, hidden, names, made) if gated else pack_rows(names, made)
        if not gated and not torch.is_grad_enabled():
            batch.memo[key] = found
        return found

    def _gated_rows(self, kind, layer, hidden, names, made):
        """One prefix per row, scaled by the row's gate (AdapterHub's gating), padded to the longest."""
        present = [made.get(n) for n in names]
        if not any(p is not None for p in present):
            return None
        k0 = next(p[0] for p in present if p is not None)
        longest = max(p[0].shape[2] for p in present if p is not None)
        keys, values, lengths = [], [], []
        for b, (n, kv) in enumerate(zip(names, present)):
            if kv is None:
                keys.append(k0.new_zeros((1, k0.shape[1], longest, k0.shape[3])))
                values.append(keys[-1])
                lengths.append(0)
                continue
            k, v = kv
            gates = self.prefix_gates[n] if n in self.prefix_gates else None
            if gates is not None and f"{kind}_{layer}" in gates:
                gate = gates[f"{kind}_{layer}"]
                g = torch.sigmoid(gate(hidden[b:b + 1].to(gate.weight.dtype))).mean(dim=1)   # (1, 1 or 2)
                k, v = k * g[:, 0].view(-1, 1, 1, 1).to(k.dtype), v * g[:, -1].view(-1, 1, 1, 1).to(v.dtype)
            pad = longest - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
            lengths.append(kv[0].shape[2])
        device = k0.device
        return (torch.cat(keys), torch.cat(values), torch.zeros(len(names), dtype=torch.int32, device=device),
                torch.tensor(lengths, dtype=torch.int32).to(device))


class PrefixSource:
    """An attention site's `prefix` (modules/attention.py): the running adapters' prefixes of one attention layer
    (`kind`, model layer `index`), or in a multi-adapter batch each row's own. With `position_bias` (T5's module
    that computes the relative position bias) and shifted positions (PEFT's layout: the prefix at positions 0..P-1,
    the queries at P + L_k - L_q + i), the prefix keys get the relative position bias."""

    def __init__(self, pool: PrefixTuningPool, kind: str, index: int, site, position_bias: nn.Module | None):
        self.pool, self.kind, self.index, self.site, self.position_bias = pool, kind, index, site, position_bias

    def __call__(self, module: nn.Module, query: Tensor, key: Tensor):
        pool = self.pool
        batch = current_batch(pool)
        if batch is not None:  # each row its own adapter's prefix (per-row selection inside the kernels)
            if self.position_bias is not None and any(pool.row_shifts(batch, query.shape[0])):
                raise AdapterError("prefix tuning: T5 prefixes in PEFT's layout (shift_positions=True) do not run in "
                                   "multi-adapter batches (their position bias is per adapter); run them one at a "
                                   "time.")
            found = pool.batch_prefix(self.kind, self.index, self.site.hidden, batch, query.shape[0])
            return None if found is None else (found[0], found[1], None, found[2], found[3])
        found = pool.prefix(self.kind, self.index, self.site.hidden)
        if found is None:
            return None
        bias = None
        if self.position_bias is not None and pool.position_shift():
            P, Lq, Lk = found[0].shape[2], query.shape[2], key.shape[2]
            bias = self.position_bias.compute_bias(Lq, P, device=query.device, past_seen_tokens=P + Lk - Lq)
        return (*found, bias, None, None)


class PositionShift:
    """A model forward pre-hook for PEFT's layout (shift_positions): the prefix occupies positions 0..P-1, so real
    tokens start at P (in a multi-adapter batch each row by its own adapter's prefix length). `from_padding`: the
    family counts positions of real tokens from pad_token_id + 1 (RoBERTa)."""

    def __init__(self, pool: PrefixTuningPool, pad_token_id: int | None, from_padding: bool):
        self.pool, self.pad, self.from_padding = pool, pad_token_id, from_padding

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = current_batch(self.pool)
        if batch is not None:
            rows = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
            shifts = self.pool.row_shifts(batch, rows)
            offset = torch.tensor(shifts).view(-1, 1) if any(shifts) else 0
        else:
            offset = self.pool.position_shift()
        if not isinstance(offset, Tensor) and not offset:
            return None
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            source = ids if ids is not None else kwargs["inputs_embeds"]
            if isinstance(offset, Tensor):
                offset = offset.to(source.device)
            if self.from_padding and ids is not None:  # real tokens counted from padding_idx + 1
                real = ids.ne(self.pad).int()
                positions = (torch.cumsum(real, dim=1) + past) * real + self.pad
                kwargs["position_ids"] = positions + offset * real
                return args, kwargs
            positions = torch.arange(past, past + source.shape[1], device=source.device).unsqueeze(0)
        if isinstance(offset, Tensor):
            offset = offset.to(positions.device)
        kwargs["position_ids"] = positions + offset
        return args, kwargs
