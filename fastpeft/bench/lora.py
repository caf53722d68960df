"""LoRA microbenchmark: the frozen base linear, fastpeft's lora_linear, PEFT's lora.Linear and plain PyTorch.

    fastpeft bench lora            # CUDA: LLaMA-7B linears, bf16, M 1..16384, r 8/16/64 (CPU: --quick)
    fastpeft bench lora --quick    # small shapes, fewer repetitions (the default without CUDA)
    fastpeft bench lora --shapes 4096x4096,4096x11008 --m 1,4096 --ranks 16 --dtype bf16 --modes fwd,fwdbwd

Implementations, timed side by side on the same inputs (x: M x K, W: N x K frozen, A: r x K, B: N x r,
scale = alpha / r with alpha = 2r, no bias, no dropout):
    base      F.linear(x, W)                                       the floor
    fastpeft  fastpeft.ops.lora_linear(x, W, None, A, B, scale)
    peft      peft.tuners.lora.layer.Linear wrapping nn.Linear(K, N, bias=False), cast to the benchmark dtype,
              its W/A/B sharing storage with the other columns' (so lora_B is non-zero)
    torch     F.linear(x, W) + (x @ Aᵀ) @ Bᵀ * scale                  unfused eager PyTorch
Modes: "fwd" (under torch.no_grad) and "fwd+bwd" (forward, then torch.autograd.grad for a fixed dY with
respect to x, A and B; W frozen; for base that is the forward plus dX only).

FLOPs (useful work; an implementation's redundant work is not counted):
    forward   base 2MNK                      LoRA 2MNK + 2MKr (T = x Aᵀ) + 2MNr (T Bᵀ)
    backward  base 2MNK (dX = dY W)          LoRA 2MNK + 2MNr (G = dY B) + 2MKr (dX += s G A)
                                                  + 2MKr (dA = s Gᵀ x) + 2MNr (dB = s dYᵀ T)
Bytes (minimum traffic, e bytes per element: every operand read once and every result written once per pass;
the M x r intermediates T and G are left out):
    forward   base e(MK + NK + MN)           LoRA e(MK + NK + MN + rK + Nr)
    backward  base e(MN + NK + MK)           LoRA e(MN + NK + MK + rK + Nr) read (dY, W, x, A, B)
              (read dY, W; write dX)              + e(MK + rK + Nr) written (dX, dA, dB)
    fwd+bwd = forward + backward.
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and dX, dA, dB in
fwd+bwd) against the formula in float64 (CPU) or float32 (CUDA), checked once per case on the first pool item.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import driver
from .driver import Run
from .grid import GridFamily, time_case
from .models import frozen_linear, takes_config
from .options import int_list
from .roofline import Row

IMPLS = ("base", "fastpeft", "peft", "torch")
FULL = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "m": [1, 16, 128, 512, 2048, 4096, 8192, 16384],
        "ranks": [8, 16, 64]}
QUICK = {"shapes": [(1024, 1024), (1024, 2816)], "m": [1, 64, 512, 2048], "ranks": [8, 16]}


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def lora_flops(M: int, K: int, N: int, r: int, mode: str, impl: str) -> float:
    """Useful flops of one call (formulas in the module docstring)."""
    base = impl == "base"
    fwd = 2 * M * N * K + (0 if base else 2 * M * K * r + 2 * M * N * r)
    if mode == "fwd":
        return float(fwd)
    bwd = 2 * M * N * K + (0 if base else 4 * M * K * r + 4 * M * N * r)
    return float(fwd + bwd)


def lora_bytes(M: int, K: int, N: int, r: int, mode: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring)."""
    base = impl == "base"
    adapters = 0 if base else r * K + N * r
    fwd = M * K + N * K + M * N + adapters
    if mode == "fwd":
        return float(elem * fwd)
    bwd = (M * N + N * K + M * K) if base else (M * N + N * K + M * K + adapters) + (M * K + adapters)
    return float(elem * (fwd + bwd))


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

def build_peft_layer(peft_linear, w, a, b, r: int, alpha: int, dtype: torch.dtype,
                     base: nn.Module | None = None) -> nn.Module:
    """PEFT's LoRA layer around nn.Linear(K, N, bias=False) using w, a, b's storage (or around `base`, e.g. a
    bitsandbytes Linear4bit, left in its own dtype).

    PEFT >= 0.18 takes the hyperparameters as a LoraConfig (`config=`); older releases as keyword arguments.
    """
    dense, base = base is None, frozen_linear(w) if base is None else base
    if takes_config(peft_linear):
        from peft import LoraConfig
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
        layer = peft_linear(base, adapter_name="default", config=config, r=r, lora_alpha=alpha)
    else:
        layer = peft_linear(base, adapter_name="default", r=r, lora_alpha=alpha, lora_dropout=0.0)
    if dense:
        layer.to(dtype)
    layer.lora_A["default"].weight = nn.Parameter(a.detach())
    layer.lora_B["default"].weight = nn.Parameter(b.detach())
    layer.base_layer.weight.requires_grad_(False)
    return layer


def make_item(M, K, N, r, dtype, device, *, need_dy: bool, peft_linear=None) -> dict:
    """One set of inputs: x ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r) (non-zero: no shortcut); dY ~ N(0, 1)."""
    def randn(*shape, std=1.0):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std)

    item = {"x": randn(M, K).requires_grad_(), "w": randn(N, K, std=K**-0.5),
            "a": randn(r, K, std=K**-0.5).requires_grad_(), "b": randn(N, r, std=r**-0.5).requires_grad_()}
    if need_dy:
        item["dy"] = randn(M, N)
    if peft_linear is not None:
        item["peft"] = build_peft_layer(peft_linear, item["w"], item["a"], item["b"], r, 2 * r, dtype)
    return item


def forward(impl: str, item: dict, scale: float, lora_linear=None) -> torch.Tensor:
    x, w, a, b = item["x"], item["w"], item["a"], item["b"]
    if impl == "base":
        return F.linear(x, w)
    if impl == "fastpeft":
        return lora_linear(x, w, None, a, b, scale)
    if impl == "peft":
        return item["peft"](x)
    if impl == "torch":
        return F.linear(x, w) + (x @ a.t()) @ b.t() * scale
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What the backward differentiates: x for base; x, A, B (PEFT: its own parameters) for the rest."""
    if impl == "base":
        return [item["x"]]
    if impl == "peft":
        layer = item["peft"]
        return [item["x"], layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return [item["x"], item["a"], item["b"]]


def reference_outputs(item: dict, scale: float, ref_dtype: torch.dtype) -> dict:
    """The formula in ref_dtype: (y, dX, dA, dB) for LoRA and (y, dX) for the base op."""
    x, w, a, b = (item[k].detach().to(ref_dtype) for k in ("x", "w", "a", "b"))
    t = x @ a.t()
    y_base = x @ w.t()
    out = {"base": [y_base], "lora": [y_base + scale * (t @ b.t())]}
    if "dy" in item:
        dy = item["dy"].to(ref_dtype)
        g = dy @ b
        dx_base = dy @ w
        out["base"].append(dx_base)
        out["lora"] += [dx_base + scale * (g @ a), scale * (g.t() @ x), scale * (dy.t() @ t)]
    return out


# ------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------

def run_case(run: Run, K: int, N: int, M: int, r: int) -> list[Row]:
    """Check and time every (mode, impl) of one (shape, M, r) on one shared input pool."""
    scale = 2 * r / r  # alpha / r with alpha = 2r
    ref_dtype = torch.float64 if run.device.type == "cpu" else torch.float32
    return time_case(
        run, K, N, M, r,
        make_item=lambda: make_item(M, K, N, r, run.dtype, run.device, need_dy=run.need_dy, peft_linear=run.peft),
        reference=lambda item: reference_outputs(item, scale, ref_dtype),
        forward=functools.partial(forward, scale=scale, lora_linear=run.fast), grad_inputs=grad_inputs,
        cost=lambda mode, impl: (lora_flops(M, K, N, r, mode, impl), lora_bytes(M, K, N, r, mode, impl, run.elem)))


FAMILY = GridFamily(
    bench="lora", title="LoRA", doc=__doc__, impls=IMPLS, full=FULL, quick=QUICK, axis="r",
    axis_arg=("--ranks", {"type": int_list, "help": "LoRA ranks r, e.g. 8,16,64 (alpha = 2r)"}),
    config={"alpha": "2r"}, fast=("fastpeft.ops", "lora_linear"), peft=("peft.tuners.lora.layer", "Linear"),
    run_case=run_case)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
