"""Invertible adapters (MAD-X, Pfeiffer et al. 2020): NICE and GLOW coupling blocks on the embedding output.

The last dim of x (size `dim`) is split into x1 (d1 = dim // 2) and x2 (d2 = dim - d1). Every subnet is
Linear(n, n // reduction_factor) → non-linearity → Linear(·, m), as in AdapterHub `adapters` 1.3.0, whose
parameter names and shapes these blocks keep (`F.0.weight`, `G.2.bias`, `s1.0.weight`, ...).

    NICE (additive):   y1 = x1 + F(x2)                   y2 = x2 + G(y1)                 log|det J| = 0
              reverse: x2 = y2 - G(y1)                   x1 = y1 - F(x2)

    GLOW (affine):     (s_a, t_a) = s2(x2)   y1 = e(s_a) ⊙ x1 + t_a
                       (s_b, t_b) = s1(y1)   y2 = e(s_b) ⊙ x2 + t_b
              reverse: (s_b, t_b) = s1(y1)   x2 = (y2 - t_b) / e(s_b)
                       (s_a, t_a) = s2(x2)   x1 = (y1 - t_a) / e(s_a)
                       e(s) = exp(c · 0.636 · atan(s / c))   (soft clamp c = `clamp`: |log e| < c)
                       log|det J| = Σ log e(s_a) + Σ log e(s_b)   (negated for the reverse pass)

A subnet's output r is split into (s, t) as the first / second half of its last dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .base import Activation, AdapterContainer

INVERTIBLE_KINDS = ("nice", "glow")


def subnet(dims_in: int, dims_out: int, non_linearity: str | None, reduction_factor: float) -> nn.Sequential:
    """Linear(dims_in, dims_in // reduction_factor) → non-linearity → Linear(·, dims_out)."""
    if not reduction_factor > 0:
        raise ConfigError(f"inv_adapter_reduction_factor: {reduction_factor!r} must be positive.")
    hidden = int(dims_in // reduction_factor)
    if hidden < 1:
        raise ConfigError(f"inv_adapter_reduction_factor: {reduction_factor!r} gives a hidden width of {hidden} for "
                          f"a subnet input of {dims_in}; use a reduction factor of at most {dims_in}.")
    return nn.Sequential(nn.Linear(dims_in, hidden), Activation(non_linearity), nn.Linear(hidden, dims_out))


def check_invertible(dim: int, reduction_factor: float, where: str) -> None:
    """What make_invertible(kind, dim, ..., reduction_factor) refuses, said before anything is built (`where`: the
    config field): a hidden size too small to split, or a factor that leaves a subnet without hidden units."""
    smaller = _split_sizes(dim)[0]  # the smaller half is the narrowest subnet input
    if not reduction_factor > 0 or int(smaller // reduction_factor) < 1:
        raise ConfigError(f"{where}: {reduction_factor!r} leaves the invertible adapter's subnets no hidden unit (their "
                          f"input is half the hidden size {dim}, {smaller}); use a positive factor of at most "
                          f"{smaller}.")


def _split_sizes(dim: int) -> tuple[int, int]:
    if dim < 2:
        raise ConfigError(f"invertible adapter: the hidden size {dim} is too small to split; it needs at least 2.")
    return dim // 2, dim - dim // 2


class NICECoupling(nn.Module):
    """Additive (NICE) coupling on the last dim: volume-preserving, exactly invertible."""

    def __init__(self, dim: int, non_linearity: str | None = "relu", reduction_factor: float = 2):
        super().__init__()
        self.dim = dim
        self.split_len1, self.split_len2 = _split_sizes(dim)
        self.F = subnet(self.split_len2, self.split_len1, non_linearity, reduction_factor)
        self.G = subnet(self.split_len1, self.split_len2, non_linearity, reduction_factor)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        """y = coupling(x) (rev=False) or x = coupling⁻¹(y) (rev=True), on the last dim."""
        a, b = x.split([self.split_len1, self.split_len2], dim=-1)
        if not rev:
            y1 = a + self.F(b)
            y2 = b + self.G(y1)
            return torch.cat((y1, y2), dim=-1)
        x2 = b - self.G(a)
        x1 = a - self.F(x2)
        return torch.cat((x1, x2), dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """forward(y, rev=True)."""
        return self.forward(y, rev=True)


class GLOWCoupling(nn.Module):
    """Affine (GLOW / RealNVP) coupling on the last dim with a soft-clamped scale; `last_log_det` after each call.

    AdapterHub 1.3.0's GLOW block does not run on (batch, seq, dim) inputs (its forward concatenates on dim 1 and
    uses x itself as its first scale and shift), so its GLOW outputs cannot be reproduced. This block keeps its
    parameter names and shapes (`s1` = subnet(d1, 2·d2), `s2` = subnet(d2, 2·d1)), so its checkpoints load.
    """

    def __init__(self, dim: int, non_linearity: str | None = "relu", reduction_factor: float = 2,
                 clamp: float = 5.0):
        super().__init__()
        if not (clamp > 0 and math.isfinite(clamp)):
            raise ConfigError(f"invertible adapter: clamp {clamp!r} must be a positive finite number.")
        self.dim = dim
        self.clamp = float(clamp)
        self.split_len1, self.split_len2 = _split_sizes(dim)
        self.s1 = subnet(self.split_len1, 2 * self.split_len2, non_linearity, reduction_factor)
        self.s2 = subnet(self.split_len2, 2 * self.split_len1, non_linearity, reduction_factor)
        self.last_log_det: torch.Tensor | None = None

    def log_e(self, s: torch.Tensor) -> torch.Tensor:
        """log e(s) = clamp · 0.636 · atan(s / clamp)."""
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    @staticmethod
    def _halves(r: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return r[..., :n], r[..., n:]

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        """y = coupling(x) (rev=False) or x = coupling⁻¹(y) (rev=True); sets `last_log_det` (leading dims)."""
        a, b = x.split([self.split_len1, self.split_len2], dim=-1)
        if not rev:
            s_a, t_a = self._halves(self.s2(b), self.split_len1)
            log_a = self.log_e(s_a)
            y1 = torch.exp(log_a) * a + t_a
            s_b, t_b = self._halves(self.s1(y1), self.split_len2)
            log_b = self.log_e(s_b)
            y2 = torch.exp(log_b) * b + t_b
            self.last_log_det = log_a.sum(-1) + log_b.sum(-1)
            return torch.cat((y1, y2), dim=-1)
        s_b, t_b = self._halves(self.s1(a), self.split_len2)
        log_b = self.log_e(s_b)
        x2 = (b - t_b) / torch.exp(log_b)
        s_a, t_a = self._halves(self.s2(x2), self.split_len1)
        log_a = self.log_e(s_a)
        x1 = (a - t_a) / torch.exp(log_a)
        self.last_log_det = -(log_a.sum(-1) + log_b.sum(-1))
        return torch.cat((x1, x2), dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """forward(y, rev=True)."""
        return self.forward(y, rev=True)


def init_bert_weights(module: nn.Module) -> None:
    """AdapterHub's init for these blocks: every Linear weight ~ N(0, 0.02²), bias zero."""
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.zero_()


def make_invertible(kind: str, dim: int, non_linearity: str | None = "relu",
                    reduction_factor: float = 2) -> NICECoupling | GLOWCoupling:
    """The `inv_adapter` block of `kind` ("nice" or "glow") over `dim`, initialised as AdapterHub does."""
    key = str(kind).lower()
    if key == "nice":
        block: NICECoupling | GLOWCoupling = NICECoupling(dim, non_linearity, reduction_factor)
    elif key == "glow":
        block = GLOWCoupling(dim, non_linearity, reduction_factor)
    else:
        raise ConfigError(f"inv_adapter: {kind!r} is not an invertible adapter type; use one of "
                          f"{', '.join(INVERTIBLE_KINDS)}.")
    block.apply(init_bert_weights)
    return block


class InvertibleAdapters(AdapterContainer):
    """Invertible adapters by name (AdapterHub's `invertible_adapters`): the first running one transforms the
    embedding output, and its inverse runs on the input of the output embeddings (MAD-X)."""

    def attach(self, embeddings: nn.Module, output_embeddings: nn.Module | None) -> None:
        self.hook(embeddings.register_forward_hook(lambda module, args, output: self._apply(output, rev=False)))
        if output_embeddings is not None:
            self.hook(output_embeddings.register_forward_pre_hook(
                lambda module, args: (self._apply(args[0], rev=True),) + tuple(args[1:])))

    def _apply(self, hidden: torch.Tensor, rev: bool) -> torch.Tensor:
        names = self.running_adapters()
        return self._modules[names[0]](hidden, rev=rev) if names else hidden
