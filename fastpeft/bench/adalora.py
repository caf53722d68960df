"""AdaLoRA microbenchmark: the frozen base linear, fastpeft's lora_linear, PEFT's SVDLinear and plain PyTorch.

    fastpeft bench adalora            # CUDA: LLaMA-7B linears, bf16, M 1..16384, r 8/16/64 (CPU: --quick)
    fastpeft bench adalora --quick    # small shapes, fewer repetitions (the default without CUDA)
    fastpeft bench adalora --shapes 4096x11008 --m 1,4096 --ranks 16 --dtype bf16 --modes fwd,fwdbwd

AdaLoRA's SVD form (x: M x K, W: N x K frozen, A: r x K, singular values E: r x 1, B: N x r, all in the
benchmark dtype; r = init_r = ranknum, alpha = 2r, no bias, no dropout):
    y = x Wᵀ + (x (A ⊙ E)ᵀ Bᵀ) c,   c = alpha / (r + 1e-5)                   PEFT's SVDLinear
      = x Wᵀ + ((x Aᵀ) ⊙ s) Bᵀ,      s = c E: (r,) float32                     fastpeft's LoRA op, per-rank scale
Implementations, timed side by side on the same inputs:
    base      F.linear(x, W)                                       the floor
    fastpeft  fastpeft.ops.lora_linear(x, W, None, A, B, s), s = E.float().flatten() * c computed in the timed
              step (as fastpeft's LoRALinear.rank_scale); the op returns dE through s
    peft      peft.tuners.adalora.layer.SVDLinear wrapping nn.Linear(K, N, bias=False) of the benchmark dtype, its
              W, lora_A, lora_B and lora_E sharing storage with the others' (ranknum = r in the benchmark dtype,
              frozen); it forms A ⊙ E on every call and scales the M x N update by alpha, then by 1 / ranknum
    torch     F.linear(x, W) + (x (A ⊙ E)ᵀ) Bᵀ c                  eager, the formula as written
Modes: "fwd" (under torch.no_grad) and "fwd+bwd" (forward, then torch.autograd.grad for a fixed dY with
respect to x, A, B and E; W frozen; for base that is the forward plus dX only).

FLOPs (useful work; base and LoRA as in fastpeft/bench/lora.py; an implementation's redundant work, such as forming
A ⊙ E (rK), is not counted; the O(r) terms s = c E and dE = c ds are left out):
    forward   AdaLoRA  LoRA forward + Mr (T ⊙ s, T = x Aᵀ)
    backward  AdaLoRA  LoRA backward + Mr (G ⊙ s, G = dY B) + 2Mr (ds = Σ_m G ⊙ T);
                       dB = dYᵀ (T ⊙ s) reuses the forward's T ⊙ s
Bytes (minimum traffic, e bytes per element, the M x r intermediates left out as in fastpeft/bench/lora.py):
    forward   AdaLoRA  LoRA forward + er (read E)
    backward  AdaLoRA  LoRA backward + 2er (read E, write dE)
    fwd+bwd = forward + backward.
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and dX, dA, dB, dE in
fwd+bwd; base: y and dX) against the formula in float64, checked once per case on the first pool item.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import driver, lora
from .driver import Run
from .grid import GridFamily, time_case
from .models import frozen_linear
from .options import int_list
from .roofline import Row

IMPLS = ("base", "fastpeft", "peft", "torch")


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def adalora_flops(M: int, K: int, N: int, r: int, mode: str, impl: str) -> float:
    """Useful flops of one call (formulas in the module docstring)."""
    flops = lora.lora_flops(M, K, N, r, mode, impl)
    if impl == "base":
        return flops
    return flops + (M * r if mode == "fwd" else 4 * M * r)


def adalora_bytes(M: int, K: int, N: int, r: int, mode: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring)."""
    traffic = lora.lora_bytes(M, K, N, r, mode, impl, elem)
    if impl == "base":
        return traffic
    return traffic + elem * (r if mode == "fwd" else 3 * r)


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

def ada_scale(r: int) -> float:
    """c = alpha / (ranknum + 1e-5) with alpha = 2r and ranknum = r (PEFT's SVDLinear)."""
    return 2 * r / (r + 1e-5)


def build_peft_layer(svd_linear, w, a, b, e, r: int) -> nn.Module:
    """PEFT's SVDLinear around nn.Linear(K, N, bias=False) of w's dtype, using w, a, b, e's storage.

    Its AdaLoraConfig needs total_step > 0 (unused by the layer). Casting ranknum to a half-precision base's
    dtype makes it trainable in PEFT (get_peft_model too); it is frozen here, as SVDLinear sets it.
    """
    from peft import AdaLoraConfig

    base = frozen_linear(w)
    config = AdaLoraConfig(init_r=r, lora_alpha=2 * r, lora_dropout=0.0, total_step=1)
    layer = svd_linear(base, adapter_name="default", config=config, r=r, lora_alpha=2 * r)
    layer.lora_A["default"] = nn.Parameter(a.detach())
    layer.lora_B["default"] = nn.Parameter(b.detach())
    layer.lora_E["default"] = nn.Parameter(e.detach())
    layer.ranknum["default"].requires_grad_(False)
    return layer


def make_item(M, K, N, r, dtype, device, *, need_dy: bool, peft_linear=None) -> dict:
    """fastpeft/bench/lora.py's inputs (x ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r); dY ~ N(0, 1)) plus E ~
    U[0.5, 1.5) of shape (r, 1) in the benchmark dtype (not PEFT's zeros: no shortcut) and PEFT's layer."""
    item = lora.make_item(M, K, N, r, dtype, device, need_dy=need_dy)
    item["e"] = torch.rand(r, 1, device=device, dtype=dtype).add_(0.5).requires_grad_()
    if peft_linear is not None:
        item["peft"] = build_peft_layer(peft_linear, item["w"], item["a"], item["b"], item["e"], r)
    return item


def forward(impl: str, item: dict, c: float, lora_linear=None) -> torch.Tensor:
    """One implementation's output; c = alpha / (r + 1e-5)."""
    if impl == "base":
        return lora.forward("base", item, c)
    x, w, a, b, e = item["x"], item["w"], item["a"], item["b"], item["e"]
    if impl == "fastpeft":
        return lora_linear(x, w, None, a, b, e.float().flatten() * c)  # s = c E, as LoRALinear.rank_scale
    if impl == "peft":
        return item["peft"](x)
    if impl == "torch":
        return F.linear(x, w) + (x @ (a * e).t()) @ b.t() * c
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What the backward differentiates: x (base); x, A, B, E (the others; PEFT: its own parameters)."""
    if impl == "base":
        return lora.grad_inputs("base", item)
    if impl == "peft":
        layer = item["peft"]
        return [item["x"], *(p["default"] for p in (layer.lora_A, layer.lora_B, layer.lora_E))]
    return [item[k] for k in ("x", "a", "b", "e")]


def reference_outputs(item: dict, c: float) -> dict:
    """The formula in float64: base (y, dX) from fastpeft/bench/lora.py and AdaLoRA (y, dX, dA, dB, dE); grads with
    a dY."""
    base = lora.reference_outputs(item, c, torch.float64)["base"]
    x, a, b, e = (item[k].detach().double().requires_grad_() for k in ("x", "a", "b", "e"))
    with torch.enable_grad():
        delta = (x @ (a * e).t()) @ b.t() * c
    refs = {"base": base, "adalora": [base[0] + delta.detach()]}
    if "dy" in item:
        dx, da, db, de = torch.autograd.grad(delta, [x, a, b, e], item["dy"].double())
        refs["adalora"] += [base[1] + dx, da, db, de]
    return refs


# ------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------

def run_case(run: Run, K: int, N: int, M: int, r: int) -> list[Row]:
    """Check and time every (mode, impl) of one (shape, M, r) on one shared input pool."""
    c = ada_scale(r)
    return time_case(
        run, K, N, M, r,
        make_item=lambda: make_item(M, K, N, r, run.dtype, run.device, need_dy=run.need_dy, peft_linear=run.peft),
        reference=lambda item: reference_outputs(item, c),
        forward=functools.partial(forward, c=c, lora_linear=run.fast), grad_inputs=grad_inputs,
        cost=lambda mode, impl: (adalora_flops(M, K, N, r, mode, impl),
                                 adalora_bytes(M, K, N, r, mode, impl, run.elem)))


FAMILY = GridFamily(
    bench="adalora", title="AdaLoRA", doc=__doc__, impls=IMPLS, full=lora.FULL, quick=lora.QUICK, axis="r",
    axis_arg=("--ranks", {"type": int_list, "help": "ranks r (= init_r = ranknum), e.g. 8,16,64 (alpha = 2r)"}),
    config={"alpha": "2r",
            "scale": "E * alpha / (r + 1e-5) per rank (fastpeft: float32, computed in the timed step)",
            "singular_values": "E (r, 1) ~ U[0.5, 1.5) in the benchmark dtype"},
    fast=("fastpeft.ops", "lora_linear"), peft=("peft.tuners.adalora.layer", "SVDLinear"), run_case=run_case,
    label="fastpeft AdaLoRA")


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
