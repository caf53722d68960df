"""IA3 microbenchmark: the frozen base linear, fastpeft's ia3_linear, PEFT's ia3.Linear and plain PyTorch.

    fastpeft bench ia3             # CUDA: LLaMA-7B linears, bf16, M 1..16384 (CPU: --quick)
    fastpeft bench ia3 --quick     # small shapes, fewer repetitions (the default without CUDA)
    fastpeft bench ia3 --shapes 4096x11008 --m 1,4096 --ia3-modes out --dtype bf16 --modes fwd,fwdbwd

IA3 modes (x: M x K, W: N x K frozen, no bias; one trainable float32 vector, values in [0.5, 1.5)):
    out   y = (x Wᵀ) ⊙ v       v: (N,), attention keys/values (PEFT: is_feedforward=False)
    in    y = (x ⊙ u) Wᵀ       u: (K,), feed-forward down projection (PEFT: is_feedforward=True)
Implementations, timed side by side on the same inputs:
    base      F.linear(x, W)                                       the floor
    fastpeft  fastpeft.ops.ia3.ia3_linear(x, W, None, u, v)          u or v None
    peft      peft.tuners.ia3.layer.Linear wrapping nn.Linear(K, N, bias=False) of the benchmark dtype, its W
              and ia3_l ((N, 1) or (1, K), float32 as after get_peft_model) sharing storage with the others'
    torch     F.linear(x, W) * v  or  F.linear(x * u, W)            eager, vector cast to the benchmark dtype
Modes: "fwd" (under torch.no_grad) and "fwd+bwd" (forward, then torch.autograd.grad for a fixed dY with
respect to x and the vector; W frozen; for base that is the forward plus dX only).

FLOPs (useful work), with S the scaled width (N for "out", K for "in"):
    forward   base 2MNK                      IA3 2MNK + MS (the scaling)
    backward  base 2MNK (dX = dY W)          IA3 2MNK + MS (dY ⊙ v, or H ⊙ u with H = dY W)
                                                  + 2MS (dv = Σ_m dY ⊙ Z, or du = Σ_m H ⊙ x)
Bytes (minimum traffic, e bytes per element, the vector float32: every operand read once, every result
written once per pass; Z = x Wᵀ is the "out" output before v, which training keeps for dv):
    forward   base e(MK + NK + MN)           IA3 e(MK + NK + MN) + 4S; in fwd+bwd "out" also writes Z: + eMN
    backward  base e(MN + NK + MK)           IA3 e(MN + NK + MN + MK) + 8S   out: read dY, W, Z, v; write dX, dv
              (read dY, W; write dX)             e(MN + NK + MK + MK) + 8S   in:  read dY, W, x, u; write dX, du
    fwd+bwd = forward + backward.
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and dX and the vector
gradient in fwd+bwd) against fastpeft.reference.ia3.ia3_linear in float64, checked once per case on the first
pool item.
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
from .options import str_list
from .roofline import Row

IMPLS = ("base", "fastpeft", "peft", "torch")
IA3_MODES = ("out", "in")
FULL = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "m": [1, 16, 128, 512, 2048, 4096, 8192, 16384]}
QUICK = {"shapes": [(1024, 1024), (1024, 2816)], "m": [1, 64, 512, 2048]}
VEC_BYTES = 4  # the IA3 vector is float32 (PEFT's adapter dtype after get_peft_model, fastpeft's scales)


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def scaled_width(K: int, N: int, ia3: str) -> int:
    """S: the length of the IA3 vector, N for "out" (v), K for "in" (u)."""
    return N if ia3 == "out" else K


def ia3_flops(M: int, K: int, N: int, ia3: str, mode: str, impl: str) -> float:
    """Useful flops of one call (formulas in the module docstring)."""
    gemm = 2 * M * N * K
    extra = 0 if impl == "base" else M * scaled_width(K, N, ia3)
    return float(gemm + extra if mode == "fwd" else 2 * gemm + 4 * extra)


def ia3_bytes(M: int, K: int, N: int, ia3: str, mode: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring)."""
    gemm = elem * (M * K + N * K + M * N)
    if impl == "base":
        return float(gemm if mode == "fwd" else 2 * gemm)
    vec = VEC_BYTES * scaled_width(K, N, ia3)
    if mode == "fwd":
        return float(gemm + vec)
    saved = elem * (M * N if ia3 == "out" else M * K)  # what the backward reads besides dY and W: Z or x
    fwd = gemm + vec + (saved if ia3 == "out" else 0)  # the training forward of "out" also writes Z
    bwd = gemm + saved + 2 * vec  # read dY, W, Z or x, the vector; write dX, the vector's gradient
    return float(fwd + bwd)


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

def scales(ia3: str, vec: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(in_scale, out_scale) of ia3_linear for one IA3 mode."""
    return (None, vec) if ia3 == "out" else (vec, None)


def build_peft_layer(peft_linear, w: torch.Tensor, vec: torch.Tensor, ia3: str) -> nn.Module:
    """PEFT's IA3 layer around nn.Linear(K, N, bias=False), using w's storage, its ia3_l a view of vec.

    Recent PEFT takes the hyperparameters as an IA3Config (`config=`); older releases as keyword arguments.
    PEFT stores ia3_l as (N, 1) for "out" and (1, K) for "in" (is_feedforward).
    """
    N, K = w.shape
    feedforward = ia3 == "in"
    base = frozen_linear(w)
    if takes_config(peft_linear):
        from peft import IA3Config
        layer = peft_linear(base, adapter_name="default", config=IA3Config(), is_feedforward=feedforward)
    else:
        layer = peft_linear(base, adapter_name="default", is_feedforward=feedforward)
    layer.ia3_l["default"] = nn.Parameter(vec.detach().view((1, K) if feedforward else (N, 1)))
    return layer


def make_item(M, K, N, ia3, dtype, device, *, need_dy: bool, peft_linear=None) -> dict:
    """One set of inputs: x ~ N(0, 1); W ~ N(0, 1/K); the vector ~ U[0.5, 1.5) in float32 (not the ones PEFT
    starts from: no shortcut), "vec_lp" the same values in the benchmark dtype for `torch`; dY ~ N(0, 1)."""
    def randn(*shape, std=1.0):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std)

    vec = torch.rand(scaled_width(K, N, ia3), device=device).add_(0.5)
    item = {"x": randn(M, K).requires_grad_(), "w": randn(N, K, std=K**-0.5), "vec": vec.requires_grad_(),
            "vec_lp": vec.detach().to(dtype).requires_grad_()}
    if need_dy:
        item["dy"] = randn(M, N)
    if peft_linear is not None:
        item["peft"] = build_peft_layer(peft_linear, item["w"], vec, ia3)
    return item


def forward(impl: str, item: dict, ia3: str, ia3_linear=None) -> torch.Tensor:
    x, w = item["x"], item["w"]
    if impl == "base":
        return F.linear(x, w)
    if impl == "fastpeft":
        return ia3_linear(x, w, None, *scales(ia3, item["vec"]))
    if impl == "peft":
        return item["peft"](x)
    if impl == "torch":
        return F.linear(x, w) * item["vec_lp"] if ia3 == "out" else F.linear(x * item["vec_lp"], w)
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What the backward differentiates: x for base; x and the vector (PEFT: its own ia3_l) for the rest."""
    if impl == "base":
        return [item["x"]]
    if impl == "peft":
        return [item["x"], item["peft"].ia3_l["default"]]
    return [item["x"], item["vec_lp" if impl == "torch" else "vec"]]


def reference_outputs(item: dict, ia3: str) -> dict:
    """The formula in float64: (y, dX, dvec) for IA3 and (y, dX) for the base op; grads only with a dY."""
    from fastpeft.reference.ia3 import ia3_linear as formula  # here: without fastpeft, peft and torch still run

    x, w, vec = (item[k].detach().double() for k in ("x", "w", "vec"))
    x.requires_grad_()
    vec.requires_grad_()
    with torch.enable_grad():
        y_base = formula(x, w, None, None, None, False)
        y = formula(x, w, None, *scales(ia3, vec), False)
        out = {"base": [y_base.detach()], "ia3": [y.detach()]}
        if "dy" in item:
            dy = item["dy"].double()
            out["base"] += torch.autograd.grad(y_base, [x], dy)
            out["ia3"] += torch.autograd.grad(y, [x, vec], dy)
    return out


# ------------------------------------------------------------------------------------------------------------
# Command line and run
# ------------------------------------------------------------------------------------------------------------

def parse_ia3_modes(text: str) -> list[str]:
    modes = [m.lower() for m in str_list(text)]
    unknown = [m for m in modes if m not in IA3_MODES]
    if unknown or not modes:
        raise SystemExit(f"unknown IA3 mode(s) {', '.join(unknown) or text!r}; use out and/or in")
    return list(dict.fromkeys(modes))


def run_case(run: Run, K: int, N: int, M: int, ia3: str) -> list[Row]:
    """Check and time every (mode, impl) of one (shape, M, IA3 mode) on one shared input pool."""
    return time_case(
        run, K, N, M, ia3,
        make_item=lambda: make_item(M, K, N, ia3, run.dtype, run.device, need_dy=run.need_dy, peft_linear=run.peft),
        reference=lambda item: reference_outputs(item, ia3),
        forward=functools.partial(forward, ia3=ia3, ia3_linear=run.fast), grad_inputs=grad_inputs,
        cost=lambda mode, impl: (ia3_flops(M, K, N, ia3, mode, impl), ia3_bytes(M, K, N, ia3, mode, impl, run.elem)))


FAMILY = GridFamily(
    bench="ia3", title="IA3", doc=__doc__, impls=IMPLS, full=FULL, quick=QUICK, axis="ia3",
    axis_arg=("--ia3-modes", {"type": parse_ia3_modes, "default": list(IA3_MODES),
                              "help": "out (y = (x W^T) * v) and/or in (y = (x * u) W^T) (default: out,in)"}),
    config={"vector_dtype": "fp32 (torch: the benchmark dtype)"}, fast=("fastpeft.ops.ia3", "ia3_linear"),
    peft=("peft.tuners.ia3.layer", "Linear"), run_case=run_case)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
