"""PHM linear microbenchmark: a dense linear layer of the same size (the floor), fastpeft's phm_linear with
Compacter's factorized weights and an eager AdapterHub-style PyTorch layer that forms the weight every call.

    fastpeft bench phm             # CUDA: 4096x256, 256x4096, 4096x4096 (in x out), bf16, M 1..16384
    fastpeft bench phm --quick     # 256x64, 64x256, 1024x1024, fewer repetitions (the default without CUDA)
    fastpeft bench phm --shapes 4096x256 --m 1,4096 --phm-dims 4 --modes fwd,fwdbwd

The PHM (parameterized hypercomplex multiplication) linear layer (Zhang et al. 2021; Compacter, Mahabadi et al.
2021), with x: M x in, rule A: n x n x n, L: n x in/n x k, R: n x k x out/n, b: out, all in the benchmark dtype:
    y = x H + b,    H = Σ_i A_i ⊗ (L_i R_i)   (in x out)
k = phm_rank = 1 (Compacter). A shape is in x out written KxN (--shapes 4096x256: in = 4096, out = 256; n must
divide both); the axis beside shape and M is the PHM dimension n (--phm-dims 4,8). Write p = in/n, q = out/n.
Implementations, timed side by side on the same inputs:
    base      the floor: an ordinary linear layer of the same size, F.linear(x, W) with a dense out x in weight
              W = Hᵀ (formed once at set-up, no bias); fwd+bwd differentiates x only
    fastpeft  fastpeft.ops.phm_linear(x, A, L, b, w_right=R): two small contractions per side, H never formed
    torch     eager PyTorch written the AdapterHub way (`PHMLayer`): W = bmm(L, R), then
              H = einsum("bac,bkp->bakcp", A, W).view(n, in, out).sum(0) (a batched Kronecker product), formed
              on every call, then y = x @ H + b; it differentiates x, A, L, R and b
There is no `peft` impl: PEFT has no PHM layers. The driver's "vs peft" column and pivot stay empty; "vs torch"
(torch ms / ms: > 1 is faster than the AdapterHub-style layer) and its pivot take their place.
Modes: "fwd" (under torch.no_grad) and "fwd+bwd" (forward, then torch.autograd.grad for a fixed dY with
respect to x, A, L, R and b; for base, with respect to x only).

FLOPs (what each impl computes; a multiply-add counts 2):
    base      forward 2M·in·out (x Wᵀ)                       backward 2M·in·out (dx = dY W)
    fastpeft  forward 2Mnk(in + out) (X_m L_i, then (·) R_i) + 2Mn³k (A_iᵀ (·)) + M·out (b)
              backward twice the contractions, 4Mnk(in + out) + 4Mn³k, + M·out (db)
    torch     forward 2k·in·out/n (W = L R) + 2n·in·out (forming H: n products and sums per element)
              + 2M·in·out (x H) + M·out (b)
              backward 4M·in·out (dx = dY Hᵀ, dH = xᵀ dY) + 4n·in·out (dA, dW from dH) + 4k·in·out/n (dL, dR)
              + M·out (db)
Bytes (minimum traffic, e bytes per element, every operand read once and every result written once per pass;
the op's M x n x n x k intermediates are left out; P = n³ + k(in + out) + out the layer's parameters):
    base      forward e(M·in + in·out + M·out)               backward e(M·out + in·out + M·in)
    fastpeft  forward e(M·in + P + M·out)                    backward e(M·out + 2M·in + 2P) (read dY, x, the
                                                             parameters; write dx and the parameter gradients)
    torch     forward e(M·in + P + 2·in·out + M·out)         backward e(M·out + 2M·in + 2P + 3·in·out)
              (H written once and read once; in the backward H read for dx, dH written and read back)
    fwd+bwd = forward + backward.
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and dx, dA, dL, dR, db in
fwd+bwd; base: y = x Wᵀ and dx = dY W) against fastpeft.reference.phm in float64, checked once per case on the
first pool item.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import driver, grid
from .driver import Run
from .grid import GridFamily, time_case
from .options import positive_ints
from .report import Column
from .roofline import Row

IMPLS = ("base", "fastpeft", "torch")
PHM_RANK = 1  # Compacter's k
M_FULL = [1, 16, 128, 512, 2048, 4096, 8192, 16384]
FULL = {"shapes": [(4096, 256), (256, 4096), (4096, 4096)], "m": M_FULL, "phm_dims": [4, 8]}
QUICK = {"shapes": [(256, 64), (64, 256), (1024, 1024)], "m": [1, 64, 512, 2048], "phm_dims": [4, 8]}
GRAD_NAMES = ("x", "rule", "w_left", "w_right", "bias")


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def phm_flops(M: int, K: int, N: int, n: int, mode: str, impl: str, k: int = PHM_RANK) -> float:
    """Flops of one call (formulas in the module docstring); K = in, N = out."""
    if impl == "base":
        fwd = bwd = 2 * M * K * N
    elif impl == "fastpeft":
        fwd = 2 * M * n * k * (K + N) + 2 * M * n**3 * k + M * N
        bwd = 4 * M * n * k * (K + N) + 4 * M * n**3 * k + M * N
    elif impl == "torch":
        fwd = 2 * k * K * N // n + 2 * n * K * N + 2 * M * K * N + M * N
        bwd = 4 * M * K * N + 4 * n * K * N + 4 * k * K * N // n + M * N
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return float(fwd if mode == "fwd" else fwd + bwd)


def phm_bytes(M: int, K: int, N: int, n: int, mode: str, impl: str, elem: int, k: int = PHM_RANK) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring); K = in, N = out."""
    params = n**3 + k * (K + N) + N
    if impl == "base":
        fwd = M * K + K * N + M * N
        bwd = M * N + K * N + M * K
    elif impl == "fastpeft":
        fwd = M * K + params + M * N
        bwd = M * N + 2 * M * K + 2 * params
    elif impl == "torch":
        fwd = M * K + params + 2 * K * N + M * N
        bwd = M * N + 2 * M * K + 2 * params + 3 * K * N
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return float(elem * (fwd if mode == "fwd" else fwd + bwd))


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

def adapterhub_phm(x, rule, w_left, w_right, bias):
    """The eager layer as AdapterHub's `PHMLayer.forward` writes it (shared, unfactorized rule; factorized
    weights): W = bmm(L, R); H = kronecker_product_einsum_batched(A, W).sum(0); y = x @ H + b."""
    w = torch.bmm(w_left, w_right)  # (n, p, q)
    n = rule.shape[0]
    h = torch.einsum("bac,bkp->bakcp", rule, w).reshape(n, n * w.shape[1], n * w.shape[2]).sum(0)
    y = torch.matmul(x, h)
    return y + bias


def make_item(M, K, N, n, dtype, device, *, need_dy: bool) -> dict:
    """One set of inputs: x ~ N(0, 1); A ~ N(0, 1/n); L ~ N(0, 1/k); R ~ N(0, 1/in) (so H's entries are
    ~ N(0, 1/in) and y ~ N(0, 1)); b ~ N(0, 0.1²); dY ~ N(0, 1). base's weight is this H, formed once."""
    def randn(*shape, std=1.0):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std).requires_grad_()

    k = PHM_RANK
    item = {"x": randn(M, K), "rule": randn(n, n, n, std=n**-0.5), "w_left": randn(n, K // n, k, std=k**-0.5),
            "w_right": randn(n, k, N // n, std=K**-0.5), "bias": randn(N, std=0.1)}
    from fastpeft.reference.phm import phm_weight
    with torch.no_grad():
        h = phm_weight(item["rule"].double(), item["w_left"].double(), item["w_right"].double())
        item["weight"] = h.t().contiguous().to(dtype)  # (out, in), F.linear's layout
    if need_dy:
        item["dy"] = randn(M, N).detach()
    return item


def forward(impl: str, item: dict, op=None) -> torch.Tensor:
    x = item["x"]
    if impl == "base":
        return F.linear(x, item["weight"])
    if impl == "fastpeft":
        return op(x, item["rule"], item["w_left"], item["bias"], w_right=item["w_right"])
    if impl == "torch":
        return adapterhub_phm(x, item["rule"], item["w_left"], item["w_right"], item["bias"])
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What the backward differentiates: x for base; x, A, L, R and b for the others."""
    if impl == "base":
        return [item["x"]]
    return [item[k] for k in GRAD_NAMES]


def reference_outputs(item: dict) -> dict:
    """The formula in float64: (y, dx, dA, dL, dR, db) and, for base, (x Wᵀ, dY W); grads only with a dY."""
    from fastpeft.reference.phm import phm_linear as formula  # torch still runs without fastpeft

    args = [item[k].detach().double().requires_grad_() for k in GRAD_NAMES]
    x, rule, w_left, w_right, bias = args
    weight = item["weight"].detach().double()
    with torch.enable_grad():
        y = formula(x, rule, w_left, bias, w_right=w_right)
        out = {"base": [x.detach() @ weight.t()], "phm": [y.detach()]}
        if "dy" in item:
            dy = item["dy"].double()
            out["base"].append(dy @ weight)
            out["phm"] += torch.autograd.grad(y, args, dy)
    return out


# ------------------------------------------------------------------------------------------------------------
# Command line and run
# ------------------------------------------------------------------------------------------------------------

def run_case(run: Run, K: int, N: int, M: int, n: int) -> list[Row]:
    """Check and time every (mode, impl) of one (shape, M, phm_dim) on one shared input pool."""
    if K % n or N % n:
        raise SystemExit(f"phm: shape {K}x{N}: phm_dim n={n} must divide both in ({K}) and out ({N})")
    return time_case(
        run, K, N, M, n,
        make_item=lambda: make_item(M, K, N, n, run.dtype, run.device, need_dy=run.need_dy),
        reference=reference_outputs, forward=functools.partial(forward, op=run.fast), grad_inputs=grad_inputs,
        cost=lambda mode, impl: (phm_flops(M, K, N, n, mode, impl), phm_bytes(M, K, N, n, mode, impl, run.elem)))


FAMILY = GridFamily(
    bench="phm", title="PHM linear", doc=__doc__, impls=IMPLS, full=FULL, quick=QUICK, axis="n",
    axis_arg=("--phm-dims", {"type": positive_ints,
                             "help": "PHM dimensions n (n must divide in and out), e.g. 4,8"}),
    config={"phm_rank": PHM_RANK, "weights": "rule (n, n, n), L (n, in/n, k), R (n, k, out/n), bias (out)",
            "base": "dense F.linear of the same size, no bias (floor)",
            "torch": "AdapterHub PHMLayer: H formed every call"},
    fast=("fastpeft.ops", "phm_linear"),
    peft=None,  # PEFT has no PHM layers
    run_case=run_case, label="fastpeft phm", extra_metrics=grid.vs_torch,
    extra_columns=(Column("vs_torch", "vs torch", 8, ".2f"),),
    extra_pivots=(("torch", "vs_torch",
                   "fastpeft phm speed-up over the AdapterHub-style eager layer (torch ms / fastpeft ms), by M:"),))


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
