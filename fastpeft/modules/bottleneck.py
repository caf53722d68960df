"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, Compacter) as AdapterHub `adapters` defines them.

`BottleneckAdapter` holds one adapter with AdapterHub's parameter names (adapter_down.0, adapter_up, scaling,
adapter_norm_before/after, gate; PHM layers for Compacter) and computes its block with one call of
`fp.ops.bottleneck_adapter`:

    sequential:  out = LN_a(s · f(LN_b(u) W_dᵀ + b_d) W_uᵀ + b_u [⊙ gate] (+ res))   (+ res, unless before LN_a)
    parallel:    out = LN_a(s · f(x W_dᵀ + b_d) W_uᵀ + b_u [⊙ gate]) + h

`BottleneckLayer` is the set of adapters at one site of a block (after attention: `mh_adapter`; after the
feed-forward block: `output_adapter`). Given the sub-layer's output h and the block's residual x it runs the active
adapters in order (a Stack), as AdapterHub's `bottleneck_layer_forward` does:

    pre:   res = h; u = h + x (original_ln_before), then u = LN(u) where the model has a post-LN norm;
           res = u when residual_before_ln is False ("post_add": res = h + x before the norm)
    post:  the model itself then adds x (pre-LN) or computes LN(out + x) (post-LN): AdapterHub's
           original_ln_after. Without original_ln_after, pre-LN blocks return out - x (the model adds x back).

A PHM (Compacter) projection is run as the dense n·(d/n)x(m/n) Kronecker sum it defines, formed once per call
(d·m·n work, next to M·d·m for the adapter) so that the fused kernel runs it; gradients reach the rules and factors.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import BnConfig
from .base import AdapterContainer, Activation
from .phm import PHMLinear, PHMShared
from .taps import Tap


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter of width `bottleneck` on hidden size `hidden`, configured by a BnConfig."""

    def __init__(self, hidden: int, bottleneck: int, config: BnConfig, shared: PHMShared | None = None):
        super().__init__()
        self.hidden, self.bottleneck = hidden, bottleneck
        self.is_parallel = config.is_parallel
        self.original_ln_before, self.original_ln_after = config.original_ln_before, config.original_ln_after
        self.residual_before_ln = config.residual_before_ln
        self.adapter_residual_before_ln = config.adapter_residual_before_ln and not config.is_parallel
        self.non_linearity = config.non_linearity.lower()
        self.dropout = float(config.dropout)
        seq: list[nn.Module] = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            seq.append(self.adapter_norm_before)
        if config.phm_layer:
            seq.append(PHMLinear(hidden, bottleneck, config, "down", shared))
            self.adapter_up = PHMLinear(bottleneck, hidden, config, "up", shared)
        else:
            seq.append(nn.Linear(hidden, bottleneck))
            self.adapter_up = nn.Linear(bottleneck, hidden)
        seq.append(Activation(self.non_linearity))
        self.adapter_down = nn.Sequential(*seq)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))
        else:
            self.scaling = float(config.scaling)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        if config.use_gating:
            self.gate = nn.Linear(hidden, 1)
        self._init(config, shared)

    @property
    def down(self) -> nn.Module:
        return self.adapter_down[-2]

    def _init(self, config: BnConfig, shared: PHMShared | None) -> None:
        """AdapterHub's init_weights: "bert" N(0, 0.02) weights, zero biases; "mam_adapter" Kaiming-uniform down,
        zero up (the adapter starts as the identity); "houlsby" truncated N(0, 0.01) weights, zero biases.
        PHM layers keep their own initialisation (zeroed up-projection under "mam_adapter")."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if config.init_weights_seed is not None:
                torch.manual_seed(config.init_weights_seed)
            linears = [m for m in (self.down, self.adapter_up, getattr(self, "gate", None)) if isinstance(m, nn.Linear)]
            for layer in linears:
                if config.init_weights == "bert" or layer is getattr(self, "gate", None):
                    layer.weight.normal_(0.0, 0.02)
                elif config.init_weights == "mam_adapter" and layer is self.down:
                    nn.init.kaiming_uniform_(layer.weight, a=5 ** 0.5)
                elif config.init_weights == "mam_adapter":
                    layer.weight.zero_()
                else:
                    nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                layer.bias.zero_()
            if config.init_weights == "mam_adapter" and isinstance(self.adapter_up, PHMLinear):
                for p in self.adapter_up.parameters():
                    if p.dim() == 1 or p is getattr(self.adapter_up, "W_right", None) or p is getattr(
                            self.adapter_up, "W", None):
                        p.zero_()

    def _dense(self, dtype: torch.dtype):
        """(W_d, b_d, W_u, b_u) as dense nn.Linear-layout tensors in `dtype`."""
        out = []
        for layer in (self.down, self.adapter_up):
            if isinstance(layer, PHMLinear):
                w, b = layer.dense_weight(), layer.b
            else:
                w, b = layer.weight, layer.bias
            out += [w.to(dtype), b.to(dtype) if b is not None else None]
        return out

    def run(self, u: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """AdapterHub's Adapter.forward output for input u and adapter residual (parallel: residual = h)."""
        dtype = u.dtype

        def pair(norm):
            return None if norm is None else (norm.weight.to(dtype), norm.bias.to(dtype))

        scaling = self.scaling.to(dtype) if isinstance(self.scaling, torch.Tensor) else self.scaling
        gate = getattr(self, "gate", None)
        return ops.bottleneck_adapter(
            u, residual, *self._dense(dtype), non_linearity=self.non_linearity, scaling=scaling,
            ln_before=pair(getattr(self, "adapter_norm_before", None)),
            ln_after=pair(getattr(self, "adapter_norm_after", None)),
            gate=None if gate is None else (gate.weight.to(dtype), gate.bias.to(dtype)),
            adapter_residual_before_ln=self.adapter_residual_before_ln,
            dropout=self.dropout if self.training else 0.0)

    def step(self, hidden: torch.Tensor, x: torch.Tensor, norm: nn.Module | None, h: torch.Tensor,
             last: bool) -> torch.Tensor:
        """AdapterHub's pre_forward then forward. A parallel adapter reads the block input x; when it is the last
        of the stack its output already includes post_forward's + h."""
        if self.is_parallel:
            return self.run(x, h if last else torch.zeros_like(x))
        residual = hidden if self.residual_before_ln is True else None
        if self.original_ln_before:
            hidden = hidden + x
            if norm is not None:
                if self.residual_before_ln == "post_add":
                    residual = hidden
                hidden = norm(hidden)
        return self.run(hidden, hidden if residual is None else residual)

    def finish(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the sub-layer returns so that the model's own residual add (and post-LN norm) completes
        AdapterHub's post_forward."""
        return hidden if self.original_ln_after else hidden - x


class BottleneckLayer(AdapterContainer):
    """The bottleneck adapters at one site of one block, run by hooks: the residual is read from the input of
    `residual_module`, the sub-layer output h is transformed on the way out of `output_module`."""

    def __init__(self, norm: nn.Module | None, inner: str | None = "adapters"):
        super().__init__()
        self._inner = inner  # adapters live in this ModuleDict attribute, or (None) are children of the layer
        if inner:
            self.add_module(inner, nn.ModuleDict())
        object.__setattr__(self, "_norm", norm)  # the model's post-LN norm: used, not owned
        self._residual = Tap()  # the block's residual x, from the residual module's input to the sub-layer's output

    def store(self) -> nn.Module:
        return self._modules[self._inner] if self._inner else self

    def attach(self, output_module: nn.Module, residual_module: nn.Module, residual_arg: int) -> None:
        self.hook(residual_module.register_forward_pre_hook(self._tap(residual_arg), with_kwargs=True))
        self.hook(output_module.register_forward_hook(self._transform_output))

    def _tap(self, index: int):
        def tap(module, args, kwargs):
            values = list(args) + list(kwargs.values())
            self._residual.put(values[index] if index < len(values) else None)
        return tap

    def _transform_output(self, module, args, output):
        x = self._residual.take()
        names = self.running_adapters()
        if not names:
            return None
        if x is None:
            raise RuntimeError("bottleneck adapter: the block's residual input was not seen before the sub-layer "
                               "output; the model's forward does not follow its family's placement row.")
        h = output[0] if isinstance(output, tuple) else output
        hidden = h
        for i, name in enumerate(names):
            hidden = self.store()._modules[name].step(hidden, x, self._norm, h, last=i == len(names) - 1)
        out = self.store()._modules[names[-1]].finish(hidden, x)
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}"


class SharedParameters(AdapterContainer):
    """Parameters one Compacter adapter shares across its layers (AdapterHub's `shared_parameters`), by name."""

