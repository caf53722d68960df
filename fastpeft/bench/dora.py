"""DoRA microbenchmark: the frozen base linear, fastpeft's LoRA and DoRA ops, PEFT's DoRA layer and plain PyTorch.

    fastpeft bench dora            # CUDA: LLaMA-7B linears, bf16, M 1..16384, r 8/16/64 (CPU: --quick)
    fastpeft bench dora --quick    # small shapes, fewer repetitions (the default without CUDA)
    fastpeft bench dora --shapes 4096x11008 --m 1,4096 --ranks 16 --dtype bf16 --modes fwd,fwdbwd

DoRA (x: M x K, W: N x K frozen, A: r x K, B: N x r in the benchmark dtype, magnitude m: (N,) float32,
scale s = alpha / r with alpha = 2r, no bias, no dropout):
    y = m / ‖W + s B A‖ ⊙ (x Wᵀ + s x Aᵀ Bᵀ)       ‖·‖ per output row, a constant for autograd (PEFT, paper §4.3)
Implementations, timed side by side on the same inputs:
    base      F.linear(x, W)                                       the floor
    lora      fastpeft.ops.lora_linear(x, W, None, A, B, s)          the target's yardstick: DoRA forward+backward
                                                                     <= 1.3x this on LLaMA-7B shapes ("x lora")
    fastpeft  fastpeft.ops.dora_linear(x, W, None, A, B, s, m, weight_sq_norm=‖W_n‖²), the row norms of the
              frozen W computed once outside the timed region (fastpeft's LoRALinear caches them while W is
              unchanged); the norm comes from ‖W_n‖², W Aᵀ and A Aᵀ without forming W + s B A
    peft      peft.tuners.lora.layer.Linear(use_dora=True) wrapping nn.Linear(K, N, bias=False), W/A/B sharing
              storage with the others', its magnitude (lora_magnitude_vector, float32 as after get_peft_model)
              sharing m's; it forms B A (through an identity matrix) and W + s B A on every call
    torch     norm = ‖W + s B A‖.detach();  (F.linear(x, W) + (x Aᵀ) Bᵀ s) * (m / norm)   eager, the column scale
              cast to the benchmark dtype
Modes: "fwd" (under torch.no_grad) and "fwd+bwd" (forward, then torch.autograd.grad for a fixed dY with
respect to x, A, B and m; W frozen; for base that is the forward plus dX only, for lora x, A and B).

FLOPs (useful work; an implementation's redundant work is not counted; base and lora as in fastpeft/bench/lora.py):
    forward   DoRA  LoRA forward + MN (the column scale c = m / ‖·‖)
                    + norm: 2NKr (W Aᵀ) + 2Kr² (A Aᵀ) + 2Nr² + 5Nr (B diag(s), its products with W Aᵀ and
                      A Aᵀ); O(N) terms and ‖W_n‖² (cached) left out
    backward  DoRA  LoRA backward (on dY ⊙ c) + MN (dY ⊙ c) + 2MN (dm = Σ_m dY ⊙ Z / ‖·‖, Z = x Wᵀ + s x Aᵀ Bᵀ);
                    the norm is a constant: no gradient through it
Bytes (minimum traffic, e bytes per element, m and ‖W_n‖² float32: every operand read once, every result
written once per pass; W Aᵀ shares the forward's read of W, which fastpeft reads a second time for it):
    forward   DoRA  LoRA forward + 8N (read m, ‖W_n‖²); in fwd+bwd also writes Z for dm: + eMN
    backward  DoRA  LoRA backward + eMN (read Z) + 8N (read c, write dm)
    fwd+bwd = forward + backward.
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and the gradients in
fwd+bwd) against fastpeft.reference.dora.dora_linear (base and lora: the formulas of fastpeft/bench/lora.py) in
float64, checked once per case on the first pool item.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import driver, lora
from .driver import Run
from .grid import GridFamily, time_case
from .options import int_list
from .report import Column
from .roofline import Row

IMPLS = ("base", "lora", "fastpeft", "peft", "torch")
LORA_IMPL = {"base": "base", "lora": "fastpeft"}  # this script's base and lora are fastpeft/bench/lora.py's impls
VEC_BYTES = 4  # m and ‖W_n‖² are float32


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def dora_flops(M: int, K: int, N: int, r: int, mode: str, impl: str) -> float:
    """Useful flops of one call (formulas in the module docstring)."""
    flops = lora.lora_flops(M, K, N, r, mode, LORA_IMPL.get(impl, "fastpeft"))
    if impl in LORA_IMPL:
        return flops
    norm = 2 * N * K * r + 2 * K * r * r + 2 * N * r * r + 5 * N * r
    return flops + norm + (M * N if mode == "fwd" else 4 * M * N)


def dora_bytes(M: int, K: int, N: int, r: int, mode: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring)."""
    traffic = lora.lora_bytes(M, K, N, r, mode, LORA_IMPL.get(impl, "fastpeft"), elem)
    if impl in LORA_IMPL:
        return traffic
    vec = VEC_BYTES * N
    return traffic + (2 * vec if mode == "fwd" else 4 * vec + 2 * elem * M * N)


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

def with_dora(peft_linear):
    """PEFT's LoRA Linear class with use_dora=True, built by fastpeft/bench/lora.py's build_peft_layer: the flag goes
    into its LoraConfig (recent PEFT) or in as a keyword (older releases); the signature stays the parent's."""
    class DoraLinear(peft_linear):
        @functools.wraps(peft_linear.__init__)
        def __init__(self, *args, config=None, **kwargs):
            if config is None:
                kwargs["use_dora"] = True
            else:
                config.use_dora = True
                kwargs["config"] = config
            super().__init__(*args, **kwargs)

    return DoraLinear


def make_item(M, K, N, r, dtype, device, *, need_dy: bool, sq_norm: bool, peft_linear=None) -> dict:
    """fastpeft/bench/lora.py's inputs (x ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r); dY ~ N(0, 1); PEFT's layer)
    plus m ~ U[0.5, 1.5) in float32 (not ‖W + s B A‖, where PEFT starts: no shortcut) and, with sq_norm, the
    cached ‖W_n‖² ("wsq") that fastpeft's module passes to dora_linear."""
    item = lora.make_item(M, K, N, r, dtype, device, need_dy=need_dy, peft_linear=peft_linear)
    item["m"] = torch.rand(N, device=device).add_(0.5).requires_grad_()
    if sq_norm:
        from fastpeft.reference.dora import weight_sq_norm  # here: without fastpeft, peft and torch still run
        item["wsq"] = weight_sq_norm(item["w"], False)
    if peft_linear is not None:
        item["peft"].lora_magnitude_vector["default"].weight = nn.Parameter(item["m"].detach())
    return item


def forward(impl: str, item: dict, scale: float, ops=None) -> torch.Tensor:
    """One implementation's output; ops is the fastpeft.ops module (for lora and fastpeft)."""
    if impl in LORA_IMPL:
        return lora.forward(LORA_IMPL[impl], item, scale, ops and ops.lora_linear)
    x, w, a, b, m = item["x"], item["w"], item["a"], item["b"], item["m"]
    if impl == "fastpeft":
        return ops.dora_linear(x, w, None, a, b, scale, m, weight_sq_norm=item["wsq"])
    if impl == "peft":
        return item["peft"](x)
    if impl == "torch":
        norm = torch.linalg.vector_norm(w + scale * (b @ a), dim=1).detach()
        return (F.linear(x, w) + (x @ a.t()) @ b.t() * scale) * (m / norm).to(x.dtype)
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What the backward differentiates: x (base); x, A, B (lora); x, A, B, m (PEFT: its own parameters)."""
    if impl in LORA_IMPL:
        return lora.grad_inputs(LORA_IMPL[impl], item)
    if impl == "peft":
        return lora.grad_inputs("peft", item) + [item["peft"].lora_magnitude_vector["default"].weight]
    return [item["x"], item["a"], item["b"], item["m"]]


def reference_outputs(item: dict, scale: float) -> dict:
    """The formulas in float64: base (y, dX), lora (y, dX, dA, dB), dora (y, dX, dA, dB, dm); grads with a dY."""
    from fastpeft.reference.dora import dora_linear as formula

    refs = lora.reference_outputs(item, scale, torch.float64)
    inputs = [item[k].detach().double().requires_grad_() for k in ("x", "w", "a", "b", "m")]
    x, w, a, b, m = inputs
    with torch.enable_grad():
        y = formula(x, w, None, a, b, scale, m, False)
        refs["dora"] = [y.detach()]
        if "dy" in item:
            refs["dora"] += torch.autograd.grad(y, [x, a, b, m], item["dy"].double())
    return refs


# ------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------

def run_case(run: Run, K: int, N: int, M: int, r: int) -> list[Row]:
    """Check and time every (mode, impl) of one (shape, M, r) on one shared input pool."""
    scale = 2.0  # alpha / r with alpha = 2r
    return time_case(
        run, K, N, M, r,
        make_item=lambda: make_item(M, K, N, r, run.dtype, run.device, need_dy=run.need_dy,
                                    sq_norm="fastpeft" in run.impls, peft_linear=run.peft),
        reference=lambda item: reference_outputs(item, scale),
        forward=functools.partial(forward, scale=scale, ops=run.fast), grad_inputs=grad_inputs,
        cost=lambda mode, impl: (dora_flops(M, K, N, r, mode, impl), dora_bytes(M, K, N, r, mode, impl, run.elem)))


def add_vs_lora(rows: list[Row]) -> None:
    """vs_lora = ms / ms(fastpeft's LoRA), the issue's target (<= 1.3 in fwd+bwd)."""
    lora_ms = {row.mode: row.ms for row in rows if row.impl == "lora" and row.ms}
    for row in rows:
        row.extra["vs_lora"] = row.ms / lora_ms[row.mode] if row.ms and row.mode in lora_ms else None


FAMILY = GridFamily(
    bench="dora", title="DoRA", doc=__doc__, impls=IMPLS, full=lora.FULL, quick=lora.QUICK, axis="r",
    axis_arg=("--ranks", {"type": int_list, "help": "ranks r, e.g. 8,16,64 (alpha = 2r)"}),
    config={"alpha": "2r", "magnitude_dtype": "fp32 (torch: column scale cast to the benchmark dtype)",
            "weight_sq_norm": "cached, outside the timed region (fastpeft)"},
    fast=("fastpeft", "ops"), peft=("peft.tuners.lora.layer", "Linear"), run_case=run_case,
    fast_impls=("fastpeft", "lora"), wrap_peft=with_dora, label="fastpeft DoRA", extra_metrics=add_vs_lora,
    extra_columns=(Column("vs_lora", "x lora", 7, ".2f"),),
    extra_pivots=(("lora", "vs_lora", "fastpeft DoRA time / fastpeft LoRA time (target: fwd+bwd <= 1.30), by M:"),))


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
