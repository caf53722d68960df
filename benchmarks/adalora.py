"""AdaLoRA microbenchmark: the frozen base linear, fastpeft's lora_linear, PEFT's SVDLinear and plain PyTorch.

    python benchmarks/adalora.py            # CUDA: LLaMA-7B linears, bf16, M 1..16384, r 8/16/64 (CPU: --quick)
    python benchmarks/adalora.py --quick    # small shapes, fewer repetitions (the default without CUDA)
    python benchmarks/adalora.py --shapes 4096x11008 --m 1,4096 --ranks 16 --dtype bf16 --modes fwd,fwdbwd

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

FLOPs (useful work; base and LoRA as in benchmarks/lora.py; an implementation's redundant work, such as forming
A ⊙ E (rK), is not counted; the O(r) terms s = c E and dE = c ds are left out):
    forward   AdaLoRA  LoRA forward + Mr (T ⊙ s, T = x Aᵀ)
    backward  AdaLoRA  LoRA backward + Mr (G ⊙ s, G = dY B) + 2Mr (ds = Σ_m G ⊙ T);
                       dB = dYᵀ (T ⊙ s) reuses the forward's T ⊙ s
Bytes (minimum traffic, e bytes per element, the M x r intermediates left out as in benchmarks/lora.py):
    forward   AdaLoRA  LoRA forward + er (read E)
    backward  AdaLoRA  LoRA backward + 2er (read E, write dE)
    fwd+bwd = forward + backward.
Each row also carries rel_err: the largest relative Frobenius error of its outputs (y; and dX, dA, dB, dE in
fwd+bwd; base: y and dX) against the formula in float64, checked once per case on the first pool item.
"""
from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.adalora (repo root on sys.path)
    from . import lora
    from .common import (RESULTS_DIR, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                         free_memory, int_list, is_oom, measure_peaks, parse_dtype, pick_device, plot_ratio_to_base,
                         print_pivot, result_path, shape_list, str_list, time_ms, write_json)
    from .ia3 import load
except ImportError:  # run as a script: python benchmarks/adalora.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import lora
    from benchmarks.common import (RESULTS_DIR, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                                   free_memory, int_list, is_oom, measure_peaks, parse_dtype, pick_device,
                                   plot_ratio_to_base, print_pivot, result_path, shape_list, str_list, time_ms,
                                   write_json)
    from benchmarks.ia3 import load

BENCH = "adalora"
IMPLS = ("base", "fastpeft", "peft", "torch")
FULL, QUICK, MODES, TOLERANCE, COLUMNS = lora.FULL, lora.QUICK, lora.MODES, lora.TOLERANCE, lora.COLUMNS


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

    N, K = w.shape
    base = nn.utils.skip_init(nn.Linear, K, N, bias=False, device=w.device, dtype=w.dtype)
    base.weight = nn.Parameter(w.detach(), requires_grad=False)
    config = AdaLoraConfig(init_r=r, lora_alpha=2 * r, lora_dropout=0.0, total_step=1)
    layer = svd_linear(base, adapter_name="default", config=config, r=r, lora_alpha=2 * r)
    layer.lora_A["default"] = nn.Parameter(a.detach())
    layer.lora_B["default"] = nn.Parameter(b.detach())
    layer.lora_E["default"] = nn.Parameter(e.detach())
    layer.ranknum["default"].requires_grad_(False)
    return layer


def make_item(M, K, N, r, dtype, device, *, need_dy: bool, peft_linear=None) -> dict:
    """benchmarks/lora.py's inputs (x ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r); dY ~ N(0, 1)) plus E ~
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


def step(impl: str, item: dict, mode: str, c: float, lora_linear=None) -> list[torch.Tensor]:
    """One timed call: [y], or [y, *gradients] through autograd.grad (no .grad accumulation, for every impl)."""
    y = forward(impl, item, c, lora_linear)
    if mode == "fwd":
        return [y]
    return [y, *torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])]


def reference_outputs(item: dict, c: float) -> dict:
    """The formula in float64: base (y, dX) from benchmarks/lora.py and AdaLoRA (y, dX, dA, dB, dE); grads with
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


def check(impl: str, item: dict, mode: str, c: float, refs: dict, lora_linear=None) -> float:
    """Largest relative Frobenius error of impl's outputs against the reference (nan if any output is nan)."""
    with torch.enable_grad() if mode != "fwd" else torch.no_grad():
        outs = step(impl, item, mode, c, lora_linear)
    errs = []
    for o, r in zip(outs, refs["base" if impl == "base" else "adalora"]):
        o = o.detach().to(r.dtype)
        errs.append(float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)))
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/adalora.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small shapes and fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--shapes", type=shape_list, help="KxN list, e.g. 4096x4096,4096x11008 (in x out features)")
    p.add_argument("--m", type=int_list, help="token counts M, e.g. 1,16,4096")
    p.add_argument("--ranks", type=int_list, help="ranks r (= init_r = ranknum), e.g. 8,16,64 (alpha = 2r)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", type=lora.parse_modes, default=list(MODES), help="fwd,fwdbwd (default: both)")
    p.add_argument("--impls", type=str_list, default=list(IMPLS), help="subset of base,fastpeft,peft,torch")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="result directory (default: benchmarks/results)")
    p.add_argument("--warmup-ms", type=float, help="warm-up budget per timing in ms")
    p.add_argument("--rep-ms", type=float, help="measurement budget per timing in ms")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: time CUDA-graph replays (kernel time without host launch overhead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the per-case correctness check")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    return args


# ------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------

def run_case(K, N, M, r, *, args, device, dtype, impls, timer, peaks, lora_linear, peft_linear) -> list[Row]:
    """Time every (mode, impl) of one (shape, M, r) on one shared input pool."""
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "M": M, "r": r, "dtype": dtype_name(dtype)}
    c = ada_scale(r)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []

    def new_row(mode, impl, ms=None, note="", rel_err=None, extra=None):
        return Row(BENCH, case, mode, impl, ms, adalora_flops(M, K, N, r, mode, impl),
                   adalora_bytes(M, K, N, r, mode, impl, elem), rel_err=rel_err, note=note, extra=extra or {})

    try:
        pool = InputPool.build(lambda: make_item(M, K, N, r, dtype, device, need_dy="fwd+bwd" in args.modes,
                                                 peft_linear=peft_linear if "peft" in impls else None), device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(mode, impl, note=note) for mode in args.modes for impl in impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference_outputs(pool.first, c)
        except Exception as exc:
            print(f"  check skipped for {case}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    for mode in args.modes:
        grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
        for impl in impls:
            err, note = None, ""
            try:
                if refs is not None:
                    err = check(impl, pool.first, mode, c, refs, lora_linear)
                    if not err <= TOLERANCE.get(dtype, 1e-2):  # also true for nan
                        note = "MISMATCH"
                        print(f"  WARNING: {impl} {mode} {case}: rel_err {err:.2e} exceeds {TOLERANCE.get(dtype)}",
                              flush=True)
                with grad_mode():
                    ms = time_ms(lambda: step(impl, pool.next(), mode, c, lora_linear), device, timer)
            except Exception as exc:
                ms = None
                note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
                print(f"  {impl} {mode} {case}: {note}", flush=True)
                free_memory(device)
            rows.append(new_row(mode, impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, peaks, base="base", peer="peft")
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    quick = (not cuda) if args.quick is None else args.quick
    preset = QUICK if quick else FULL
    shapes, ms_list, ranks = args.shapes or preset["shapes"], args.m or preset["m"], args.ranks or preset["ranks"]
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    timer = lora.timer_config(cuda, quick, args)
    torch.manual_seed(args.seed)

    notes = []
    impls = list(args.impls)
    ops, why = load("fastpeft", "ops") if "fastpeft" in impls else (None, None)
    if why:
        notes.append(f"fastpeft skipped: {why}")
        impls.remove("fastpeft")
    peft_linear, why = load("peft.tuners.adalora.layer", "SVDLinear") if "peft" in impls else (None, None)
    if why:
        notes.append(f"peft skipped: {why}")
        impls.remove("peft")
    for n in notes:
        print(f"NOTE: {n}", flush=True)

    when = datetime.now(timezone.utc)
    env = environment(device, ["benchmarks/adalora.py", *argv], when=when)
    json_path = result_path(args.out, device, BENCH, when)
    print(f"AdaLoRA benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {timer.method(device)}", flush=True)
    print(f"shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; M {ms_list}; r {ranks}; modes {args.modes}; "
          f"impls {impls}", flush=True)

    peaks = measure_peaks(device, dtype, timer)
    print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s (mm {peaks.matmul_n}^3, {peaks.dtype}), "
          f"bandwidth {peaks.bandwidth_gbps:.1f} GB/s (copy {peaks.copy_bytes / 2**20:.0f} MiB); "
          f"ridge {peaks.ridge_flops_per_byte:.1f} flop/byte", flush=True)

    backends = {}
    if ops is not None:
        try:
            backends = ops.explain(str(device))
        except Exception as exc:
            backends = {"error": str(exc)}
    payload = {
        "benchmark": BENCH, **env, "complete": False, "notes": notes,
        "config": {"shapes": [f"{k}x{n}" for k, n in shapes], "m": ms_list, "ranks": ranks, "alpha": "2r",
                   "scale": "E * alpha / (r + 1e-5) per rank (fastpeft: float32, computed in the timed step)",
                   "singular_values": "E (r, 1) ~ U[0.5, 1.5) in the benchmark dtype", "dtype": dtype_name(dtype),
                   "modes": args.modes, "impls": impls, "quick": quick, "seed": args.seed,
                   "timer": {"method": timer.method(device), **vars(timer)}, "check": not args.no_check},
        "fastpeft_backends": backends,
        "peaks": peaks.to_dict(),
        "rows": [],
    }

    table = TablePrinter(COLUMNS)
    table.header()
    rows: list[Row] = []
    lora_linear = ops and ops.lora_linear
    for K, N in shapes:
        for M in ms_list:
            for r in ranks:
                case_rows = run_case(K, N, M, r, args=args, device=device, dtype=dtype, impls=impls, timer=timer,
                                     peaks=peaks, lora_linear=lora_linear, peft_linear=peft_linear)
                for row in case_rows:
                    table.row(row.flat())
                rows += case_rows
                payload["rows"] = [row.flat() for row in rows]
                write_json(json_path, payload)  # after every case: a cut-off run keeps what it measured
    payload["complete"] = True
    write_json(json_path, payload)

    flat = [row.flat() for row in rows]
    fast = [f for f in flat if f["impl"] == "fastpeft"]
    pivots = [("peft", "vs_peer", "fastpeft AdaLoRA speed-up over peft (peft ms / fastpeft ms), by M:"),
              ("base", "vs_base", "fastpeft AdaLoRA time / base time (1.00 = free adapter), by M:")]
    for other, key, title in pivots:
        if fast and other in impls:
            print()
            print_pivot(fast, row_keys=("mode", "shape", "r"), col_key="M", value_key=key, title=title)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), style_key="r",
                                 title=f"AdaLoRA vs frozen base linear: {env['device']['name']}, {dtype_name(dtype)}")
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
