"""DoRA microbenchmark: the frozen base linear, fastpeft's LoRA and DoRA ops, PEFT's DoRA layer and plain PyTorch.

    python benchmarks/dora.py            # CUDA: LLaMA-7B linears, bf16, M 1..16384, r 8/16/64 (CPU: --quick)
    python benchmarks/dora.py --quick    # small shapes, fewer repetitions (the default without CUDA)
    python benchmarks/dora.py --shapes 4096x11008 --m 1,4096 --ranks 16 --dtype bf16 --modes fwd,fwdbwd

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

FLOPs (useful work; an implementation's redundant work is not counted; base and lora as in benchmarks/lora.py):
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
fwd+bwd) against fastpeft.reference.dora.dora_linear (base and lora: the formulas of benchmarks/lora.py) in
float64, checked once per case on the first pool item.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.dora (repo root on sys.path)
    from . import lora
    from .common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                         free_memory, int_list, is_oom, measure_peaks, parse_dtype, pick_device, plot_ratio_to_base,
                         print_pivot, result_path, shape_list, str_list, time_ms, write_json)
    from .ia3 import load
except ImportError:  # run as a script: python benchmarks/dora.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import lora
    from benchmarks.common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, dtype_name, environment,
                                   fill_metrics, free_memory, int_list, is_oom, measure_peaks, parse_dtype,
                                   pick_device, plot_ratio_to_base, print_pivot, result_path, shape_list, str_list,
                                   time_ms, write_json)
    from benchmarks.ia3 import load

BENCH = "dora"
IMPLS = ("base", "lora", "fastpeft", "peft", "torch")
LORA_IMPL = {"base": "base", "lora": "fastpeft"}  # this script's base and lora are benchmarks/lora.py's impls
FULL, QUICK, MODES, TOLERANCE = lora.FULL, lora.QUICK, lora.MODES, lora.TOLERANCE
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
    """PEFT's LoRA Linear class with use_dora=True, built by benchmarks/lora.py's build_peft_layer: the flag goes
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
    """benchmarks/lora.py's inputs (x ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r); dY ~ N(0, 1); PEFT's layer)
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


def step(impl: str, item: dict, mode: str, scale: float, ops=None) -> list[torch.Tensor]:
    """One timed call: [y], or [y, *gradients] through autograd.grad (no .grad accumulation, for every impl)."""
    y = forward(impl, item, scale, ops)
    if mode == "fwd":
        return [y]
    return [y, *torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])]


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


def check(impl: str, item: dict, mode: str, scale: float, refs: dict, ops=None) -> float:
    """Largest relative Frobenius error of impl's outputs against the reference (nan if any output is nan)."""
    with torch.enable_grad() if mode != "fwd" else torch.no_grad():
        outs = step(impl, item, mode, scale, ops)
    errs = []
    for o, r in zip(outs, refs[impl if impl in LORA_IMPL else "dora"]):
        o = o.detach().to(r.dtype)
        errs.append(float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)))
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/dora.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small shapes and fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--shapes", type=shape_list, help="KxN list, e.g. 4096x4096,4096x11008 (in x out features)")
    p.add_argument("--m", type=int_list, help="token counts M, e.g. 1,16,4096")
    p.add_argument("--ranks", type=int_list, help="ranks r, e.g. 8,16,64 (alpha = 2r)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", type=lora.parse_modes, default=list(MODES), help="fwd,fwdbwd (default: both)")
    p.add_argument("--impls", type=str_list, default=list(IMPLS), help="subset of base,lora,fastpeft,peft,torch")
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

COLUMNS = [c for col in lora.COLUMNS
           for c in ([col, Column("vs_lora", "x lora", 7, ".2f")] if col.key == "vs_peer" else [col])]


def run_case(K, N, M, r, *, args, device, dtype, impls, timer, peaks, ops, peft_linear) -> list[Row]:
    """Time every (mode, impl) of one (shape, M, r) on one shared input pool."""
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "M": M, "r": r, "dtype": dtype_name(dtype)}
    scale = 2.0  # alpha / r with alpha = 2r
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []

    def new_row(mode, impl, ms=None, note="", rel_err=None, extra=None):
        return Row(BENCH, case, mode, impl, ms, dora_flops(M, K, N, r, mode, impl),
                   dora_bytes(M, K, N, r, mode, impl, elem), rel_err=rel_err, note=note, extra=extra or {})

    try:
        pool = InputPool.build(lambda: make_item(M, K, N, r, dtype, device, need_dy="fwd+bwd" in args.modes,
                                                 sq_norm="fastpeft" in impls,
                                                 peft_linear=peft_linear if "peft" in impls else None), device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(mode, impl, note=note) for mode in args.modes for impl in impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference_outputs(pool.first, scale)
        except Exception as exc:
            print(f"  check skipped for {case}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    for mode in args.modes:
        grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
        for impl in impls:
            err, note = None, ""
            try:
                if refs is not None:
                    err = check(impl, pool.first, mode, scale, refs, ops)
                    if not err <= TOLERANCE.get(dtype, 1e-2):  # also true for nan
                        note = "MISMATCH"
                        print(f"  WARNING: {impl} {mode} {case}: rel_err {err:.2e} exceeds {TOLERANCE.get(dtype)}",
                              flush=True)
                with grad_mode():
                    ms = time_ms(lambda: step(impl, pool.next(), mode, scale, ops), device, timer)
            except Exception as exc:
                ms = None
                note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
                print(f"  {impl} {mode} {case}: {note}", flush=True)
                free_memory(device)
            rows.append(new_row(mode, impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, peaks, base="base", peer="peft")
    lora_ms = {row.mode: row.ms for row in rows if row.impl == "lora" and row.ms}
    for row in rows:  # vs_lora = ms / ms(fastpeft's LoRA), the target (<= 1.3 in fwd+bwd)
        row.extra["vs_lora"] = row.ms / lora_ms[row.mode] if row.ms and row.mode in lora_ms else None
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
    ops, why = load("fastpeft", "ops") if {"lora", "fastpeft"} & set(impls) else (None, None)
    if why:
        notes.append(f"fastpeft and lora skipped: {why}")
        impls = [i for i in impls if i not in ("lora", "fastpeft")]
    peft_linear, why = load("peft.tuners.lora.layer", "Linear") if "peft" in impls else (None, None)
    if why:
        notes.append(f"peft skipped: {why}")
        impls.remove("peft")
    peft_linear = peft_linear and with_dora(peft_linear)
    for n in notes:
        print(f"NOTE: {n}", flush=True)

    when = datetime.now(timezone.utc)
    env = environment(device, ["benchmarks/dora.py", *argv], when=when)
    json_path = result_path(args.out, device, BENCH, when)
    print(f"DoRA benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
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
                   "magnitude_dtype": "fp32 (torch: column scale cast to the benchmark dtype)",
                   "weight_sq_norm": "cached, outside the timed region (fastpeft)", "dtype": dtype_name(dtype),
                   "modes": args.modes, "impls": impls, "quick": quick, "seed": args.seed,
                   "timer": {"method": timer.method(device), **vars(timer)}, "check": not args.no_check},
        "fastpeft_backends": backends,
        "peaks": peaks.to_dict(),
        "rows": [],
    }

    table = TablePrinter(COLUMNS)
    table.header()
    rows: list[Row] = []
    for K, N in shapes:
        for M in ms_list:
            for r in ranks:
                case_rows = run_case(K, N, M, r, args=args, device=device, dtype=dtype, impls=impls, timer=timer,
                                     peaks=peaks, ops=ops, peft_linear=peft_linear)
                for row in case_rows:
                    table.row(row.flat())
                rows += case_rows
                payload["rows"] = [row.flat() for row in rows]
                write_json(json_path, payload)  # after every case: a cut-off run keeps what it measured
    payload["complete"] = True
    write_json(json_path, payload)

    flat = [row.flat() for row in rows]
    fast = [f for f in flat if f["impl"] == "fastpeft"]
    pivots = [("peft", "vs_peer", "fastpeft DoRA speed-up over peft (peft ms / fastpeft ms), by M:"),
              ("base", "vs_base", "fastpeft DoRA time / base time (1.00 = free adapter), by M:"),
              ("lora", "vs_lora", "fastpeft DoRA time / fastpeft LoRA time (target: fwd+bwd <= 1.30), by M:")]
    for other, key, title in pivots:
        if fast and other in impls:
            print()
            print_pivot(fast, row_keys=("mode", "shape", "r"), col_key="M", value_key=key, title=title)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), style_key="r",
                                 title=f"DoRA vs frozen base linear: {env['device']['name']}, {dtype_name(dtype)}")
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
