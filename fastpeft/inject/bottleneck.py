"""Bottleneck, Compacter and invertible adapter injection (AdapterHub's BnConfig), placed by per-family rows.

Each transformer block gets, per enabled site (mh_adapter: after attention; output_adapter: after the feed-forward
block), a BottleneckLayer registered where AdapterHub keeps it (so state-dict keys match its checkpoints) and run by
hooks: the residual x is read from the input of the module the family row names, the sub-layer output h is
transformed on its way out. Compacter's shared parameters sit in `<base>.shared_parameters.<name>`, invertible
adapters in `<base>.invertible_adapters.<name>`, as in AdapterHub.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..config import BnConfig
from ..errors import ConfigError, TargetError
from ..modules.bottleneck import BottleneckAdapter, BottleneckLayer, SharedParameters
from ..modules.invertible import InvertibleAdapters, check_invertible, make_invertible
from ..modules.base_layers import adapter_placement
from ..modules.phm import PHMShared
from .families import FAMILIES, NO_ROW_FIX, Site, family_of
from .swap import container
from .targets import base_model_path, blocks, join

SITES = ("mh_adapter", "output_adapter")


@dataclass
class SitePlan:
    path: str              # where the BottleneckLayer is (to be) registered
    parent: str            # the module it is an attribute of
    attr: str
    inner: str | None      # the ModuleDict inside it that holds the adapters (None: the layer itself)
    output: str            # module whose output is transformed
    residual: str          # module whose input holds the residual
    residual_arg: int
    norm: str | None
    bottleneck: int


@dataclass
class BottleneckPlan:
    hidden: int
    base: str                                   # path of the base model (holder of shared/invertible adapters)
    sites: list[SitePlan]
    shared: bool = False                        # Compacter parameters shared across layers
    embeddings: str | None = None               # invertible adapters run after this module
    output_embeddings: nn.Module | None = None  # ... and in reverse before this one
    saved: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[tuple[str]]:
        paths = [(s.path,) for s in self.sites]
        if self.shared:
            paths.append((join(self.base, "shared_parameters"),))
        if self.embeddings is not None:
            paths.append((join(self.base, "invertible_adapters"),))
        return paths


def _reduction(config: BnConfig, index: int):
    factor = config.reduction_factor
    return factor.get(str(index), factor["default"]) if isinstance(factor, dict) else factor


def bottleneck_width(config: BnConfig, hidden: int, index: int) -> int:
    """hidden / reduction_factor for layer `index`; a ConfigError unless that is a whole number >= 1."""
    factor = _reduction(config, index)
    width = hidden / factor
    if width < 1 or width != int(width):
        divisors = [hidden // w for w in range(1, hidden + 1) if hidden % w == 0 and hidden // w > 1]
        near = sorted(divisors, key=lambda f: abs(f - factor))[:3]
        raise ConfigError(f"{type(config).__name__}.reduction_factor: {factor!r} (layer {index}) does not divide the "
                          f"hidden size {hidden} (bottleneck {width:g}); use a factor that does, e.g. "
                          f"{', '.join(str(f) for f in sorted(near))}.")
    return int(width)


def plan(model: nn.Module, name: str, config: BnConfig) -> BottleneckPlan:
    where = type(config).__name__
    model_type, family = family_of(model)
    if family is None or family.bottleneck is None:
        supported = sorted(k for k, f in FAMILIES.items() if f.bottleneck is not None)
        raise TargetError(f"{where}: bottleneck adapters have no placement row for model_type={model_type!r} (where "
                          "a block's sub-layers and residuals are, fastpeft/inject/families.py); supported families: "
                          f"{', '.join(supported)}. {NO_ROW_FIX}")
    placement = family.bottleneck
    hidden = getattr(model.config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise TargetError(f"{where}: the model config has no integer hidden_size (got {hidden!r}); bottleneck "
                          "adapters size themselves from it: use a transformers model whose config sets it.")
    found = blocks(model, family.layers)
    if not found:
        raise TargetError(f"{where}: no transformer blocks (a ModuleList named {family.layers!r}) in "
                          f"{type(model).__name__}.")
    count = max(i for _, i in found) + 1
    outside = sorted(i for i in config.leave_out if i >= count)
    if outside:
        raise ConfigError(f"{where}.leave_out: layer(s) {outside} do not exist; this model has layers "
                          f"0..{count - 1}: list indices in that range.")
    if isinstance(config.reduction_factor, dict):
        unknown = sorted(k for k in config.reduction_factor if k != "default" and int(k) >= count)
        if unknown:
            raise ConfigError(f"{where}.reduction_factor: keys {unknown} name layers this model lacks "
                              f"(layers 0..{count - 1}); use keys '0'..'{count - 1}' and 'default'.")
    _check_options(config, placement.mh_adapter.norm is not None, model_type)
    sites = []
    for block, index in found:
        if index in config.leave_out:
            continue
        width = bottleneck_width(config, hidden, index)
        if config.phm_layer and (hidden % config.phm_dim or width % config.phm_dim):
            raise ConfigError(f"{where}.phm_dim: {config.phm_dim} must divide the hidden size {hidden} and the "
                              f"bottleneck {width} (layer {index}); choose a phm_dim that divides both, or another "
                              "reduction_factor.")
        for site_name in SITES:
            if getattr(config, site_name):
                sites.append(_site(model, block, getattr(placement, site_name), width, site_name))
    if config.phm_layer and config.shared_W_phm and len({s.bottleneck for s in sites}) > 1:
        raise ConfigError(f"{where}.shared_W_phm: the layers' bottleneck widths differ (a reduction_factor mapping), "
                          "so one shared W cannot serve them; use one reduction_factor or shared_W_phm=False.")
    result = BottleneckPlan(hidden, base_model_path(model), sites, shared=config.phm_layer and PHMShared.needed(config))
    if config.inv_adapter:
        if placement.embeddings is None:
            raise ConfigError(f"{where}.inv_adapter: invertible adapters are not placed for model_type="
                              f"{model_type!r} (no embeddings entry in its row); use inv_adapter=None.")
        check_invertible(hidden, config.inv_adapter_reduction_factor, f"{where}.inv_adapter_reduction_factor")
        result.embeddings = join(result.base, placement.embeddings)
        _require(model, result.embeddings, "the embedding output")
        get_out = getattr(model, "get_output_embeddings", None)
        result.output_embeddings = get_out() if callable(get_out) else None
    return result


def _check_options(config: BnConfig, post_ln: bool, model_type: str) -> None:
    where = type(config).__name__
    if post_ln and not config.original_ln_after:
        raise ConfigError(f"{where}.original_ln_after: False is not supported on post-LN blocks ({model_type}): the "
                          "block's own LayerNorm(h + x) always runs after the adapter; use original_ln_after=True.")
    if config.cross_adapter:
        raise ConfigError(f"{where}.cross_adapter: adapters after cross-attention are not supported yet; "
                          "use cross_adapter=False.")
    if config.stochastic_depth:
        raise ConfigError(f"{where}.stochastic_depth: not supported; use stochastic_depth=0.0.")


def _require(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise TargetError(f"BnConfig: {path} ({what}) does not exist in {type(model).__name__}; the model does not "
                          "follow its family's placement row.") from None


def _site(model: nn.Module, block: str, site: Site, width: int, site_name: str) -> SitePlan:
    sub = next((join(block, s) for s in site.sublayer if _exists(model, join(block, s))), None)
    if sub is None:
        raise TargetError(f"BnConfig: none of {[join(block, s) for s in site.sublayer]} exists ({site_name}).")
    output, residual = join(sub, site.output), join(sub, site.residual)
    _require(model, output, f"{site_name} sub-layer output")
    _require(model, residual, f"{site_name} residual input")
    norm = join(sub, site.norm) if site.norm else None
    if norm:
        _require(model, norm, f"{site_name} layer norm")
    attr, _, inner = site.container.partition(".")
    return SitePlan(join(sub, attr), sub, attr, inner or None, output, residual, site.residual_arg, norm, width)


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def apply(model: nn.Module, name: str, config: BnConfig, bn_plan: BottleneckPlan, undo: list[Callable]) -> None:
    device, dtype = adapter_placement(model)
    shared = None
    if bn_plan.shared:
        width = bn_plan.sites[0].bottleneck if bn_plan.sites else 1
        holder = container(model, bn_plan.base, "shared_parameters", SharedParameters, undo)
        shared = PHMShared(config, bn_plan.hidden, width).to(device=device, dtype=dtype)
        _add(holder, name, shared, undo)
    for site in bn_plan.sites:
        norm = model.get_submodule(site.norm) if site.norm else None
        layer = container(model, site.parent, site.attr, lambda: BottleneckLayer(norm, site.inner), undo,
                           attach=lambda c, s=site: c.attach(model.get_submodule(s.output),
                                                             model.get_submodule(s.residual), s.residual_arg))
        adapter = BottleneckAdapter(bn_plan.hidden, site.bottleneck, config, shared).to(device=device, dtype=dtype)
        _add(layer, name, adapter, undo)
    if bn_plan.embeddings is not None:
        inv = container(model, bn_plan.base, "invertible_adapters", InvertibleAdapters, undo,
                         attach=lambda c: c.attach(model.get_submodule(bn_plan.embeddings), bn_plan.output_embeddings))
        block = make_invertible(config.inv_adapter, bn_plan.hidden, config.non_linearity,
                                config.inv_adapter_reduction_factor)
        _add(inv, name, block.to(device=device, dtype=dtype), undo)


def _add(holder, name: str, module: nn.Module, undo: list[Callable]) -> None:
    holder.add(name, module.train(holder.training))
    undo.append(lambda: holder.delete_adapter(name))

