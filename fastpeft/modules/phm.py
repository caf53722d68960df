"""`PHMLinear` and `PHMShared`: Compacter's parameterized hypercomplex (PHM) layers, with AdapterHub's names.

    H = Σ_i A_i ⊗ W_i   (in x out),    y = x H + b                   (Zhang et al. 2021; Compacter, Mahabadi 2021)

A: (n, n, n) the "rule" matrices (n = phm_dim), W_i: (in/n, out/n) blocks. Compacter's options:
`factorized_phm_W` makes each block low rank, W_i = L_i R_i with L: (n, in/n, k), R: (n, k, out/n), k = phm_rank;
`factorized_phm_rule` makes each rule rank one, A_i = l_i r_i (l: (n, n, 1), r: (n, 1, n)); `shared_phm_rule` and
`shared_W_phm` move the rule and/or the down/up weights from each layer to one `PHMShared` per adapter, used by
all its layers. Parameter names, shapes and initialisations follow AdapterHub `adapters` 1.3.0 (`PHMLayer`,
`init_shared_parameters`), so its checkpoints map key for key. `forward` is one call of `fp.ops.phm_linear`,
which never forms H; `dense_weight()` forms Hᵀ differentiably for code that runs a dense kernel instead.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import BnConfig
from ..errors import ConfigError

POSITIONS = ("down", "up")


def _generator(seed: int | None) -> torch.Generator | None:
    """A private CPU generator seeded with `seed` (the global RNG stays untouched), or None for the global one."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def _param(*shape: int, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=requires_grad)


def _add_rule(module: nn.Module, n: int, factorized: bool, learn: bool) -> None:
    """The rule parameters: `phm_rule` (n, n, n), or its factors `phm_rule_left` (n, n, 1), `phm_rule_right`."""
    if factorized:
        module.phm_rule_left = _param(n, n, 1, requires_grad=learn)
        module.phm_rule_right = _param(n, 1, n, requires_grad=learn)
    else:
        module.phm_rule = _param(n, n, n, requires_grad=learn)


@torch.no_grad()
def _init_w(config: BnConfig, tensors: list[torch.Tensor], gen: torch.Generator | None) -> None:
    """Initialise W (or its factors L, R) block by block per `hypercomplex_nonlinearity`.

    Blocks are visited in AdapterHub's order (for each i: L_i then R_i). AdapterHub 1.3.0 uses glorot-normal
    whatever this field says (its first test is `if hypercomplex_nonlinearity:`); we honour the documented options.
    """
    kind = config.hypercomplex_nonlinearity
    for i in range(config.phm_dim):
        for t in tensors:
            if kind == "glorot-uniform":
                nn.init.xavier_uniform_(t[i], generator=gen)
            elif kind == "glorot-normal":
                nn.init.xavier_normal_(t[i], generator=gen)
            elif kind == "normal":
                t[i].normal_(0.0, config.phm_init_range, generator=gen)
            else:
                raise ConfigError(f"BnConfig.hypercomplex_nonlinearity: got {kind!r}; "
                                  'use "glorot-uniform", "glorot-normal" or "normal".')


@torch.no_grad()
def _init_rule(config: BnConfig, tensors: list[torch.Tensor], std: float, bound: float,
               gen: torch.Generator | None) -> None:
    """Initialise rule tensors per `phm_c_init`: normal(0, std) or uniform(-bound, bound)."""
    for t in tensors:
        if config.phm_c_init == "normal":
            t.normal_(0.0, std, generator=gen)
        elif config.phm_c_init == "uniform":
            t.uniform_(-bound, bound, generator=gen)
        else:
            raise ConfigError(f"BnConfig.phm_c_init: got {config.phm_c_init!r}; use \"normal\" or \"uniform\".")


def _check_divides(n: int, size: int, what: str) -> None:
    if size % n:
        raise ConfigError(f"BnConfig.phm_dim: phm_dim={n} does not divide {what}={size}; choose a phm_dim that "
                          f"divides both the hidden size and the bottleneck width (hidden // reduction_factor).")


class PHMShared(nn.Module):
    """The PHM parameters one Compacter adapter shares across its layers (`shared_phm_rule`, `shared_W_phm`).

    Registered on this module with AdapterHub's names: `phm_rule` (n, n, n) or `phm_rule_left` (n, n, 1) /
    `phm_rule_right` (n, 1, n); `W_down_left` (n, p, k), `W_down_right` (n, k, q), `W_up_left` (n, q, k),
    `W_up_right` (n, k, p), or unfactorized `W_down` (n, p, q), `W_up` (n, q, p); p = hidden/n, q = bottleneck/n.
    The shared rule starts at normal(0, phm_init_range) or uniform(-1, 1) (AdapterHub's shared initialisation).
    """

    def __init__(self, config: BnConfig, hidden: int, bottleneck: int):
        super().__init__()
        n, k = config.phm_dim, config.phm_rank
        _check_divides(n, hidden, "hidden")
        _check_divides(n, bottleneck, "bottleneck")
        self.config = config
        self.hidden, self.bottleneck = int(hidden), int(bottleneck)
        self.shared_rule, self.shared_W = bool(config.shared_phm_rule), bool(config.shared_W_phm)
        self.factorized_rule, self.factorized_W = bool(config.factorized_phm_rule), bool(config.factorized_phm_W)
        p, q = hidden // n, bottleneck // n
        if self.shared_W:
            if self.factorized_W:
                self.W_down_left, self.W_down_right = _param(n, p, k), _param(n, k, q)
                self.W_up_left, self.W_up_right = _param(n, q, k), _param(n, k, p)
            else:
                self.W_down, self.W_up = _param(n, p, q), _param(n, q, p)
        if self.shared_rule:
            _add_rule(self, n, self.factorized_rule, bool(config.learn_phm))
        self.reset_parameters()

    @staticmethod
    def needed(config: BnConfig) -> bool:
        """Whether `config` shares anything (otherwise a PHMShared would hold no parameters)."""
        return bool(config.shared_phm_rule or config.shared_W_phm)

    def reset_parameters(self) -> None:
        """W (down then up) by `hypercomplex_nonlinearity`, then the rule by `phm_c_init`; seeded if configured."""
        gen = _generator(self.config.init_weights_seed)
        if self.shared_W:
            for pos in POSITIONS:
                w, w_right = self.weights(pos)
                _init_w(self.config, [w] if w_right is None else [w, w_right], gen)
        if self.shared_rule:
            rules = [self.phm_rule_left, self.phm_rule_right] if self.factorized_rule else [self.phm_rule]
            _init_rule(self.config, rules, self.config.phm_init_range, 1.0, gen)

    def rule(self) -> torch.Tensor | None:
        """The (n, n, n) rule (l_i r_i when factorized), or None when the rule is per layer."""
        if not self.shared_rule:
            return None
        if self.factorized_rule:
            return torch.bmm(self.phm_rule_left, self.phm_rule_right)
        return self.phm_rule

    def weights(self, position: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(w, w_right) for the "down" or "up" projection (w_right None when unfactorized); None if W is per layer."""
        if position not in POSITIONS:
            raise ConfigError(f"PHMShared.weights: position {position!r} is neither 'down' nor 'up'.")
        if not self.shared_W:
            return None
        if self.factorized_W:
            return getattr(self, f"W_{position}_left"), getattr(self, f"W_{position}_right")
        return getattr(self, f"W_{position}"), None

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={self.hidden}, bottleneck={self.bottleneck}, phm_dim={c.phm_dim}, phm_rank={c.phm_rank}, "
                f"shared_rule={self.shared_rule}, shared_W={self.shared_W}, factorized_rule={self.factorized_rule}, "
                f"factorized_W={self.factorized_W}")


class PHMLinear(nn.Module):
    """One PHM projection y = x (Σ_i A_i ⊗ W_i) + b, AdapterHub's `PHMLayer` (names `W_left`, `W_right`, `W`,
    `phm_rule`, `phm_rule_left`, `phm_rule_right`, `b`).

    Only the per-layer parameters are registered here; the `PHMShared` (if any) is held by plain reference, so
    `state_dict()` has exactly AdapterHub's per-layer keys and the owner of the shared module moves/saves it.
    Per-layer rules start at normal(0, 0.01) or uniform(-0.01, 0.01); W as `hypercomplex_nonlinearity` says
    (AdapterHub 1.3.0 always uses glorot-normal there, a bug; we implement the documented options); b at zero.
    """

    def __init__(self, in_features: int, out_features: int, config: BnConfig, position: str,
                 shared: PHMShared | None = None):
        super().__init__()
        n, k = config.phm_dim, config.phm_rank
        _check_divides(n, in_features, "in_features")
        _check_divides(n, out_features, "out_features")
        if position not in POSITIONS:
            raise ConfigError(f"PHMLinear: position {position!r} is neither 'down' nor 'up'; pass 'down' for the "
                              f"down-projection and 'up' for the up-projection.")
        self.config = config
        self.in_features, self.out_features, self.position = int(in_features), int(out_features), position
        self.shared_rule, self.shared_W = bool(config.shared_phm_rule), bool(config.shared_W_phm)
        self.factorized_rule, self.factorized_W = bool(config.factorized_phm_rule), bool(config.factorized_phm_W)
        if PHMShared.needed(config):
            if shared is None:
                field = "shared_phm_rule" if self.shared_rule else "shared_W_phm"
                raise ConfigError(f"BnConfig.{field}: the config shares parameters across layers "
                                  f"(shared_phm_rule={self.shared_rule}, shared_W_phm={self.shared_W}), so "
                                  f"PHMLinear needs the adapter's PHMShared; pass shared=PHMShared(config, hidden, "
                                  f"bottleneck) or set {field}=False.")
            self._check_shared(shared)
        self._shared = (shared,)  # a tuple: not a submodule, so its parameters stay out of this state_dict
        p, q = in_features // n, out_features // n
        if not self.shared_rule:
            _add_rule(self, n, self.factorized_rule, bool(config.learn_phm))
        if not self.shared_W:
            if self.factorized_W:
                self.W_left, self.W_right = _param(n, p, k), _param(n, k, q)
            else:
                self.W = _param(n, p, q)
        if config.phm_bias:
            self.b = _param(out_features)
        else:
            self.register_parameter("b", None)
        self.reset_parameters()

    def _check_shared(self, shared: PHMShared) -> None:
        if not isinstance(shared, PHMShared):
            raise ConfigError(f"PHMLinear: shared must be a PHMShared, got {type(shared).__name__}.")
        if self.shared_W:
            w, w_right = shared.weights(self.position)
            n, rows = w.shape[0], w.shape[1]
            cols = (w_right if w_right is not None else w).shape[2]
            if (n * rows, n * cols) != (self.in_features, self.out_features):
                raise ConfigError(f"BnConfig.shared_W_phm: the shared {self.position!r} weights are sized for "
                                  f"{n * rows} -> {n * cols} features but this layer is {self.in_features} -> "
                                  f"{self.out_features}; build PHMShared with the same hidden size and bottleneck.")
        if self.shared_rule and shared.rule().shape[0] != self.config.phm_dim:
            raise ConfigError(f"BnConfig.phm_dim: the shared rule has phm_dim={shared.rule().shape[0]}, this layer "
                              f"{self.config.phm_dim}; build PHMShared from the same config.")

    @property
    def shared(self) -> PHMShared | None:
        """The adapter's shared parameters (not a submodule of this layer)."""
        return self._shared[0]

    def reset_parameters(self) -> None:
        """W by `hypercomplex_nonlinearity`, b = 0, then the rule by `phm_c_init` (AdapterHub's order)."""
        gen = _generator(self.config.init_weights_seed)
        if not self.shared_W:
            _init_w(self.config, [self.W_left, self.W_right] if self.factorized_W else [self.W], gen)
        if self.b is not None:
            with torch.no_grad():
                self.b.zero_()
        if not self.shared_rule:
            rules = [self.phm_rule_left, self.phm_rule_right] if self.factorized_rule else [self.phm_rule]
            _init_rule(self.config, rules, 0.01, 0.01, gen)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(rule (n, n, n), w, w_right, bias): what `forward` computes with (w_right None when W is unfactorized)."""
        if self.shared_rule:
            rule = self.shared.rule()
        elif self.factorized_rule:
            rule = torch.bmm(self.phm_rule_left, self.phm_rule_right)
        else:
            rule = self.phm_rule
        if self.shared_W:
            w, w_right = self.shared.weights(self.position)
        elif self.factorized_W:
            w, w_right = self.W_left, self.W_right
        else:
            w, w_right = self.W, None
        return rule, w, w_right, self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rule, w, w_right, b = self.factors()
        return ops.phm_linear(x, rule, w, b, w_right=w_right)

    def dense_weight(self) -> torch.Tensor:
        """Hᵀ, (out_features, in_features) in nn.Linear layout, differentiable wrt the rule and the factors."""
        rule, w, w_right, _ = self.factors()
        blocks = w if w_right is None else torch.bmm(w, w_right)  # (n, p, q)
        n, p, q = blocks.shape
        # H[a p + d, b q + c] = Σ_i A_i[a, b] W_i[d, c], so Hᵀ[b q + c, a p + d] is the same sum
        return torch.einsum("iab,idc->bcad", rule.to(blocks.dtype), blocks).reshape(n * q, n * p)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, position={self.position!r}, "
                f"phm_dim={c.phm_dim}, phm_rank={c.phm_rank}, shared_rule={self.shared_rule}, "
                f"shared_W={self.shared_W}, factorized_rule={self.factorized_rule}, "
                f"factorized_W={self.factorized_W}, bias={self.b is not None}")
