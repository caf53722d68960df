"""Bottleneck adapter microbenchmark: an activation copy (the floor), fastpeft's bottleneck_adapter and an eager
AdapterHub-style PyTorch module.

    fastpeft bench bottleneck             # CUDA: hidden sizes 4096 and 8192, bf16, M 1..16384 (CPU: --quick)
    fastpeft bench bottleneck --quick     # d 256 and 1024, fewer repetitions (the default without CUDA)
    fastpeft bench bottleneck --shapes 4096x4096 --m 1,4096 --reduction-factors 16 --modes fwd,fwdbwd

The bottleneck adapter block (Houlsby / Pfeiffer; x, r: M x d, W_d: m x d, b_d: m, W_u: d x m, b_u: d, all in the
benchmark dtype; m = d // reduction_factor; f = relu, s = 1.0, no layer norms, no gating, no dropout):
    y = r + s · (f(x W_dᵀ + b_d) W_uᵀ + b_u)
A shape is the hidden size written d x d (--shapes 4096x4096: the adapter maps d features back to d; K must
equal N); the axis beside shape and M is the reduction factor rf (--reduction-factors 16,64).
Implementations, timed side by side on the same inputs:
    base      the floor: a device-to-device copy of the activations, y = empty_like(x); y.copy_(x) (fwd); in
              fwd+bwd also dx = empty_like(dY); dx.copy_(dY) in the backward, i.e. two M x d copies (through a
              torch.autograd.Function, so the driver's autograd.grad times it like the others)
    fastpeft  fastpeft.ops.bottleneck_adapter(x, r, W_d, b_d, W_u, b_u, non_linearity="relu", scaling=1.0)
    torch     eager PyTorch written the AdapterHub way: nn.Linear(d, m) down, nn.ReLU(), nn.Linear(m, d) up,
              times scaling, plus the residual; its parameters share storage with the others' weights
There is no `peft` impl: PEFT has no bottleneck adapters. The driver's "vs peft" column and pivot stay empty;
"vs torch" (torch ms / ms: > 1 is faster than the AdapterHub-style module) and its pivot take their place.
Modes: "fwd" (under torch.no_grad) and "fwd+bwd" (forward, then torch.autograd.grad for a fixed dY with
respect to x, r, W_d, b_d, W_u and b_u; for base, with respect to x only).

FLOPs (useful work; base moves data and does none):
    forward   4Mdm (x W_dᵀ, then f(.) W_uᵀ) + 2Mm (b_d, f) + 3Md (b_u, s, + r)
    backward  8Mdm (dF = dY W_u, dx = dS W_d, dW_d = dSᵀ x, dW_u = s dYᵀ f) + 3Mm (s, f', db_d = Σ dS)
              + Md (db_u = s Σ dY); dr = dY is free
Bytes (minimum traffic, e bytes per element, every operand read once and every result written once per pass;
the M x m intermediates are left out, as in fastpeft/bench/lora.py; P = 2dm + m + d the adapter's parameters):
    forward   base 2eMd (read x, write y)       adapter e(3Md + P)   read x, r and the weights; write y
    backward  base 2eMd (read dY, write dx)     adapter e(4Md + 2P)  read dY, x, the weights; write dx, dr and the
                                                                     weight gradients
    fwd+bwd = forward + backward (base: the two copies, 4eMd; the adapter's own activation minimum, reading x,
    r, dY and writing y, dx once each, is 5eMd, so the floor sits slightly below it).
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and dx, dr, dW_d, db_d,
dW_u, db_u in fwd+bwd; base: y = x and dx = dY) against fastpeft.reference.bottleneck.bottleneck_adapter in
float64, checked once per case on the first pool item.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import driver, grid
from .driver import Run
from .grid import GridFamily, time_case
from .options import positive_ints
from .report import Column
from .roofline import Row

IMPLS = ("base", "fastpeft", "torch")
NON_LINEARITY = "relu"
SCALING = 1.0
M_FULL = [1, 16, 128, 512, 2048, 4096, 8192, 16384]
FULL = {"shapes": [(4096, 4096), (8192, 8192)], "m": M_FULL, "reduction_factors": [16, 64]}
QUICK = {"shapes": [(256, 256), (1024, 1024)], "m": [1, 64, 512, 2048], "reduction_factors": [16, 64]}


def bottleneck_width(d: int, rf: int) -> int:
    """m = d // reduction_factor, at least 1 (AdapterHub's, as fastpeft.reference.bottleneck.bottleneck_size)."""
    return max(1, d // rf)


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def bottleneck_flops(M: int, d: int, rf: int, mode: str, impl: str) -> float:
    """Useful flops of one call (formulas in the module docstring)."""
    if impl == "base":
        return 0.0
    m = bottleneck_width(d, rf)
    fwd = 4 * M * d * m + 2 * M * m + 3 * M * d
    bwd = 8 * M * d * m + 3 * M * m + M * d
    return float(fwd if mode == "fwd" else fwd + bwd)


def bottleneck_bytes(M: int, d: int, rf: int, mode: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring)."""
    if impl == "base":
        return float(elem * (2 * M * d if mode == "fwd" else 4 * M * d))
    m = bottleneck_width(d, rf)
    params = 2 * d * m + m + d
    fwd = elem * (3 * M * d + params)
    bwd = elem * (4 * M * d + 2 * params)
    return float(fwd if mode == "fwd" else fwd + bwd)


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

class CopyFloor(torch.autograd.Function):
    """base: y.copy_(x) forward, dx.copy_(dY) backward: one device-to-device copy of the activations per pass."""

    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        y.copy_(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = torch.empty_like(dy)
        dx.copy_(dy)
        return dx


class AdapterHubBottleneck(nn.Module):
    """The eager block as AdapterHub's `Adapter` writes it: down Linear, activation module, up Linear, scaling,
    residual (no layer norms, gating or dropout)."""

    def __init__(self, w_down, b_down, w_up, b_up, scaling: float):
        super().__init__()
        m, d = w_down.shape
        kw = {"device": w_down.device, "dtype": w_down.dtype}
        self.adapter_down = nn.Sequential(nn.utils.skip_init(nn.Linear, d, m, **kw), nn.ReLU())
        self.adapter_up = nn.utils.skip_init(nn.Linear, m, d, **kw)
        self.adapter_down[0].weight = nn.Parameter(w_down.detach())  # shares storage with the others' weights
        self.adapter_down[0].bias = nn.Parameter(b_down.detach())
        self.adapter_up.weight = nn.Parameter(w_up.detach())
        self.adapter_up.bias = nn.Parameter(b_up.detach())
        self.scaling = scaling

    def forward(self, x, residual):
        up = self.adapter_up(self.adapter_down(x))
        return up * self.scaling + residual


def make_item(M, d, rf, dtype, device, *, need_dy: bool) -> dict:
    """One set of inputs: x, r ~ N(0, 1); W_d ~ N(0, 1/d); W_u ~ N(0, 1/m); biases ~ N(0, 0.1²) (all non-zero,
    not AdapterHub's zero-initialised up projection: no shortcut); dY ~ N(0, 1)."""
    def randn(*shape, std=1.0):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std).requires_grad_()

    m = bottleneck_width(d, rf)
    item = {"x": randn(M, d), "r": randn(M, d), "w_down": randn(m, d, std=d**-0.5), "b_down": randn(m, std=0.1),
            "w_up": randn(d, m, std=m**-0.5), "b_up": randn(d, std=0.1)}
    if need_dy:
        item["dy"] = randn(M, d).detach()
    item["torch"] = AdapterHubBottleneck(item["w_down"], item["b_down"], item["w_up"], item["b_up"], SCALING)
    return item


def forward(impl: str, item: dict, op=None) -> torch.Tensor:
    x, r = item["x"], item["r"]
    if impl == "base":
        return CopyFloor.apply(x)
    if impl == "fastpeft":
        return op(x, r, item["w_down"], item["b_down"], item["w_up"], item["b_up"], non_linearity=NON_LINEARITY,
                  scaling=SCALING)
    if impl == "torch":
        return item["torch"](x, r)
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What the backward differentiates: x for base; x, r and the four weights (torch: its own parameters)."""
    if impl == "base":
        return [item["x"]]
    if impl == "torch":
        mod = item["torch"]
        down, up = mod.adapter_down[0], mod.adapter_up
        return [item["x"], item["r"], down.weight, down.bias, up.weight, up.bias]
    return [item[k] for k in ("x", "r", "w_down", "b_down", "w_up", "b_up")]


def reference_outputs(item: dict) -> dict:
    """The formula in float64: (y, dx, dr, dW_d, db_d, dW_u, db_u) and, for base, (x, dY); grads only with a dY."""
    from fastpeft.reference.bottleneck import bottleneck_adapter as formula  # torch still runs without fastpeft

    names = ("x", "r", "w_down", "b_down", "w_up", "b_up")
    args = [item[k].detach().double().requires_grad_() for k in names]
    with torch.enable_grad():
        y = formula(*args, non_linearity=NON_LINEARITY, scaling=SCALING)
        out = {"base": [args[0].detach()], "bottleneck": [y.detach()]}
        if "dy" in item:
            dy = item["dy"].double()
            out["base"].append(dy)
            out["bottleneck"] += torch.autograd.grad(y, args, dy)
    return out


# ------------------------------------------------------------------------------------------------------------
# Command line and run
# ------------------------------------------------------------------------------------------------------------

def run_case(run: Run, K: int, N: int, M: int, rf: int) -> list[Row]:
    """Check and time every (mode, impl) of one (hidden size, M, reduction factor) on one shared input pool."""
    if K != N:
        raise SystemExit(f"bottleneck: shape {K}x{N}: the adapter maps d features to d; give the hidden size as "
                         f"dxd, e.g. {K}x{K}")
    d = K
    return time_case(
        run, K, N, M, rf,
        make_item=lambda: make_item(M, d, rf, run.dtype, run.device, need_dy=run.need_dy),
        reference=reference_outputs, forward=functools.partial(forward, op=run.fast), grad_inputs=grad_inputs,
        cost=lambda mode, impl: (bottleneck_flops(M, d, rf, mode, impl),
                                 bottleneck_bytes(M, d, rf, mode, impl, run.elem)))


FAMILY = GridFamily(
    bench="bottleneck", title="Bottleneck adapter", doc=__doc__, impls=IMPLS, full=FULL, quick=QUICK, axis="rf",
    axis_arg=("--reduction-factors", {"type": positive_ints,
                                      "help": "reduction factors rf (bottleneck width m = d // rf), e.g. 16,64"}),
    config={"non_linearity": NON_LINEARITY, "scaling": SCALING, "bottleneck_width": "d // rf",
            "weights": "W_d, b_d, W_u, b_u in the benchmark dtype", "base": "activation copy (floor)"},
    fast=("fastpeft.ops", "bottleneck_adapter"),
    peft=None,  # PEFT has no bottleneck adapters
    run_case=run_case, label="fastpeft bottleneck", extra_metrics=grid.vs_torch,
    extra_columns=(Column("vs_torch", "vs torch", 8, ".2f"),),
    extra_pivots=(("torch", "vs_torch",
                   "fastpeft bottleneck speed-up over the AdapterHub-style eager module (torch ms / fastpeft ms), "
                   "by M:"),))


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
