"""`LoRAExperts`: LoRA adapters on the fused 3-D expert tensors of a transformers mixture-of-experts layer.

The experts module (MixtralExperts, Qwen3MoeExperts, GptOssExperts, ...) stays intact as `base_layer`. For each
targeted tensor W (E experts) and adapter, A (r·E, in) and B (out, r·E) in PEFT's layout (A_e = A[e·r:(e+1)·r],
B_e = B[:, e::E]); the rows routed to expert e get

    proj_e(x) = base_e(x) + Σ_active s · (drop(x) A_eᵀ) B_eᵀ          s = alpha / r (alpha / √r with rsLoRA)

where base_e is the layer's own product (x W_eᵀ, or x W_e + b_e for transposed layouts with biases). The forward is
transformers' grouped experts computation (pairs (token, expert) sorted by expert, offsets per expert), with the
model's own routing weights, gating (`_apply_gate` / act_fn), biases and post-expert norm; B_e A_e is never formed.
Each adapter's term goes through fastpeft/ops/moe_lora.py's `expert_lora` (on CUDA the multi-LoRA segment kernels
with slot = expert, added in place into the base product; in a multi-adapter batch, an adapter's pairs are the rows
it adds into, one call per adapter present).
With no adapter running it is the experts module's own forward. Merging adds s·B_e A_e to W_e (float32, one
rounding from the original weights, which are kept to unmerge bit for bit).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AdapterError, TargetError
from ..ops import moe_lora as ops_moe
from .base import AdapterLayer
from .base_layers import adapter_dtype
from .batch import context_of, current_batch

try:  # transformers' grouped product (5.x); without it, one product per expert
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_linear = None


def expert_features(experts: nn.Module, name: str, spec) -> tuple[int, int]:
    """(in_features, out_features) of expert tensor `name` laid out as `spec` (families.ExpertParam); refuses a
    tensor or module that does not have that layout."""
    kind = type(experts).__name__
    param = getattr(experts, name, None)
    shape = tuple(param.shape) if isinstance(param, torch.Tensor) else None
    num = getattr(experts, "num_experts", None)
    if shape is None or len(shape) != 3 or shape[0] != num:
        raise TargetError(f"LoRAConfig.target_parameters: {kind}.{name} has shape {shape} with num_experts={num}; "
                          "fastpeft adapts fused expert tensors (num_experts, d1, d2). Transformers' layout for this "
                          "class changed: report it, or target the linear layers with target_modules.")
    transposed = getattr(experts, "is_transposed", spec.transposed)
    if bool(transposed) != spec.transposed:
        raise TargetError(f"LoRAConfig.target_parameters: {kind}.is_transposed={transposed} but fastpeft's table "
                          f"(fastpeft/inject/families.py EXPERTS) says {spec.transposed}; the installed transformers "
                          "changed this layout: update the table's row.")
    if spec.bias is not None and not isinstance(getattr(experts, spec.bias, None), torch.Tensor):
        raise TargetError(f"LoRAConfig.target_parameters: {kind} has no bias {spec.bias!r} that fastpeft's table "
                          "lists for it; update the row in fastpeft/inject/families.py EXPERTS.")
    return (shape[1], shape[2]) if spec.transposed else (shape[2], shape[1])


def _init_pair(a: torch.Tensor, b: torch.Tensor, r: int, init_weights) -> None:
    """PEFT's initialisation of its lora_A / lora_B linears: Kaiming-uniform A (or N(0, 1/r²) with "gaussian"),
    zero B; init_weights=False leaves both as nn.Linear initialises them (random: not the identity)."""
    if init_weights == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init_weights is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))


class LoRAExperts(AdapterLayer):
    """LoRA adapters (any number; each on some of the layer's expert tensors, with its own rank per tensor)."""

    def __init__(self, base_layer: nn.Module, layout):
        super().__init__(base_layer)
        self.layout = layout  # families.ExpertsLayout of the experts class
        self.num_experts = int(base_layer.num_experts)
        self.features = {n: expert_features(base_layer, n, spec) for n, spec in layout.params.items()}
        self.lora_A = nn.ModuleDict({n: nn.ParameterDict() for n in layout.params})
        self.lora_B = nn.ModuleDict({n: nn.ParameterDict() for n in layout.params})
        self.targets: dict[str, list[str]] = {}  # adapter -> its tensors, in the module's parameter order
        self.r: dict[str, dict[str, int]] = {}
        self.alpha: dict[str, dict[str, float]] = {}
        self.scaling: dict[str, dict[str, float]] = {}
        self.dropout: dict[str, float] = {}
        self._original: dict[str, torch.Tensor] = {}  # tensor name -> its weights before the first merge

    def __getattr__(self, name: str):
        """Model code may read the experts' attributes (num_experts, config, the tensors: unadapted, as in PEFT)."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    # ---------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, targets: dict[str, tuple[int, float]], *, dropout: float = 0.0,
                    use_rslora: bool = False, init_weights: bool | str = True) -> None:
        """Adapter `name` on the tensors `targets` ({tensor: (r, alpha)})."""
        order = [n for n, _ in self.base_layer.named_parameters(recurse=False) if n in targets]  # PEFT's nesting
        E = self.num_experts
        self.targets[name], self.r[name], self.alpha[name], self.scaling[name] = order, {}, {}, {}
        for pname in order:
            r, alpha = targets[pname]
            in_f, out_f = self.features[pname]
            w = getattr(self.base_layer, pname)
            dtype = adapter_dtype(w)
            a = torch.empty(r * E, in_f, device=w.device, dtype=dtype)
            b = torch.zeros(out_f, r * E, device=w.device, dtype=dtype)
            _init_pair(a, b, r, init_weights)
            self.lora_A[pname][name] = nn.Parameter(a)
            self.lora_B[pname][name] = nn.Parameter(b)
            self.r[name][pname], self.alpha[name][pname] = r, float(alpha)
            self.scaling[name][pname] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout[name] = float(dropout)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into this layer's expert weights; unmerge_adapter first.")
        for pname in self.targets.pop(name):
            del self.lora_A[pname][name]
            del self.lora_B[pname][name]
        for table in (self.r, self.alpha, self.scaling, self.dropout):
            table.pop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.targets)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [t[p][name] for p in self.targets[name] for t in (self.lora_A, self.lora_B)]

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        batch = current_batch(self)
        if batch is not None and not self.disabled:
            return self._batch_forward(hidden_states, top_k_index, top_k_weights, batch)
        names = self.running_adapters()
        if not names:
            return self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return self._grouped(hidden_states, top_k_index, top_k_weights, [(n, None) for n in names])

    @torch.compiler.disable  # multi-adapter batches run eagerly (host-side routing)
    def _batch_forward(self, hidden_states, top_k_index, top_k_weights, batch) -> torch.Tensor:
        """Each (token, expert) pair with its token's adapter: the term of adapter a for the pairs of a's rows."""
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged into this layer's expert weights; a "
                               "multi-adapter batch needs unmerged adapters: call fp.unmerge_adapter(model) first.")
        ctx = context_of(self)
        mine = {ctx.ids[n]: n for n in self.adapter_names if n in ctx.ids}
        tokens = hidden_states.shape[0]
        x = hidden_states
        if not batch.per_token:
            rows = len(batch.slots)
            if tokens % rows:
                raise AdapterError(f"experts layer: the batch names {rows} adapters, one per row, but this layer sees "
                                   f"{tokens} tokens, not a multiple; pass one adapter name per row of the input.")
            x = hidden_states.view(rows, tokens // rows, hidden_states.shape[-1])
        token_slot = batch.routing(x, where="LoRA experts layer").token_slot.long()
        top_k = top_k_index.shape[-1]
        pair_slot = token_slot.repeat_interleave(top_k)  # in (token, k) order; _grouped sorts it with the pairs
        chosen = [(n, pair_slot == slot) for slot, n in sorted(mine.items())]
        chosen = [(n, mask) for n, mask in chosen if bool(mask.any())]
        if not chosen:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return self._grouped(hidden_states, top_k_index, top_k_weights, chosen)

    def _grouped(self, hidden_states, top_k_index, top_k_weights, chosen) -> torch.Tensor:
        """transformers' grouped experts forward with adapter terms; `chosen`: (adapter, pair mask or None)."""
        base = self.base_layer
        if getattr(base, "_is_expert_parallel", False):
            raise AdapterError("LoRA on expert tensors does not support expert parallelism (the experts module is "
                               "sharded over devices); run the model without expert parallelism.")
        E, top_k, tokens = self.num_experts, top_k_index.shape[-1], hidden_states.shape[0]
        expert_ids, perm = torch.sort(top_k_index.reshape(-1))
        x = hidden_states[perm // top_k]
        weights = top_k_weights.reshape(-1)[perm]
        counts = torch.histc(expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int(), bins=E,
                             min=0, max=E - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        sizes = [int(c) for c in counts.tolist()]  # one synchronisation per layer call
        groups = [(n, None if m is None else torch.nonzero(m[perm]).flatten()) for n, m in chosen]
        first = "gate_up_proj" if getattr(base, "has_gate", True) else "up_proj"
        y = self._project(first, x, expert_ids, offsets, sizes, groups)
        if getattr(base, "has_gate", True):
            y = self._gate(y)
        else:
            y = base.act_fn(y)
        y = self._project("down_proj", y, expert_ids, offsets, sizes, groups)
        if getattr(base, "has_post_expert_norm", False):
            y = base.post_expert_norm(y)
        y = y * weights.unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
        y = y[inverse].view(tokens, top_k, y.shape[-1]).sum(dim=1)
        return y.to(hidden_states.dtype)

    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if hasattr(base, "_apply_gate"):
            return base._apply_gate(gate_up)
        if self.layout.gate != "chunk":
            raise AdapterError(f"{type(base).__name__} has no _apply_gate (an older transformers?) and its gating is "
                               "its own; upgrade transformers to adapt its expert tensors.")
        gate, up = gate_up.chunk(2, dim=-1)
        return base.act_fn(gate) * up

    def _project(self, pname: str, x, expert_ids, offsets, sizes, groups) -> torch.Tensor:
        """One expert projection of the sorted rows x: the base product plus each adapter's term on its rows."""
        base, spec = self.base_layer, self.layout.params.get(pname)
        weight = getattr(base, pname)
        bias = getattr(base, spec.bias)[expert_ids] if spec is not None and spec.bias else None
        transposed = bool(getattr(base, "is_transposed", spec.transposed if spec else False))
        y = self._base_product(x, weight, bias, offsets, sizes, transposed)
        for name, rows in groups:
            if pname not in self.targets[name]:
                continue
            a, b = self.lora_A[pname][name], self.lora_B[pname][name]
            h, p = x, self.dropout[name]
            if self.training and p > 0.0:  # dropout on the adapter's input, as PEFT's lora_dropout
                h = nn.functional.dropout(x, p, training=True)
            group_sizes = sizes if rows is None else torch.bincount(expert_ids[rows], minlength=self.num_experts
                                                                    ).tolist()
            # y[rows of e] += s (h A_eᵀ) B_eᵀ: in place on the kernel path (rows listed expert by expert)
            y = ops_moe.expert_lora(h, a, b, self.scaling[name][pname], group_sizes, out=y, rows=rows)
        return y

    @staticmethod
    def _base_product(x, weight, bias, offsets, sizes, transposed) -> torch.Tensor:
        if _grouped_linear is not None:
            return _grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)
        pieces, start = [], 0  # transformers without the grouped product: one GEMM per expert with rows
        for e, n in enumerate(sizes):
            if n:
                w = weight[e] if transposed else weight[e].t()
                pieces.append(x[start:start + n].to(w.dtype) @ w)
                start += n
        y = torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[2] if transposed else weight.shape[1])
        return y + bias if bias is not None else y

    # ---------------------------------------------------------------------------------------------- merging
    def delta_weight(self, name: str, pname: str) -> torch.Tensor:
        """s·B_e A_e of every expert (float32), in the tensor's own layout."""
        a, b = self.lora_A[pname][name].float(), self.lora_B[pname][name].float()
        return ops_moe.expert_delta_weight(a.detach(), b.detach(), self.scaling[name][pname], self.num_experts,
                                   self.layout.params[pname].transposed)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the expert tensors, after those merged before: W = W0 + Σ s·B_e A_e in float32
        from the original W0, rounded once."""
        for pname in self.targets[name]:
            weight = getattr(self.base_layer, pname)
            if pname not in self._original:
                stash = "cpu" if weight.device.type != "cpu" else weight.device
                self._original[pname] = weight.detach().to(stash, copy=True)
            merged = self._original[pname].to(weight.device, torch.float32, copy=True)
            for n in [*self.merged_adapters, name]:
                if pname in self.targets[n]:
                    merged += self.delta_weight(n, pname).to(weight.device)
            weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every merged expert tensor as it was before the first merge, bit for bit."""
        for pname, original in self._original.items():
            getattr(self.base_layer, pname).copy_(original)
        self._original = {}
        self.merged_adapters = []

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: {self.r[n]}" for n in self.adapter_names)
        return (f"{type(self.base_layer).__name__}, num_experts={self.num_experts}, adapters=[{ranks}], "
                f"active={self.active_adapters}, merged={self.merged_adapters}")
