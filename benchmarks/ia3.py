"""IA3 microbenchmark: the frozen base linear, fastpeft's ia3_linear, PEFT's ia3.Linear and plain PyTorch.

    python benchmarks/ia3.py             # CUDA: LLaMA-7B linears, bf16, M 1..16384 (CPU: --quick)
    python benchmarks/ia3.py --quick     # small shapes, fewer repetitions (the default without CUDA)
    python benchmarks/ia3.py --shapes 4096x11008 --m 1,4096 --ia3-modes out --dtype bf16 --modes fwd,fwdbwd

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

import argparse
import importlib
import inspect
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.ia3 (repo root on sys.path)
    from .common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                         free_memory, int_list, is_oom, measure_peaks, parse_dtype, pick_device, plot_ratio_to_base,
                         print_pivot, result_path, shape_list, str_list, time_ms, write_json)
    from .lora import COLUMNS as LORA_COLUMNS, MODES, parse_modes, timer_config
except ImportError:  # run as a script: python benchmarks/ia3.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, dtype_name, environment,
                                   fill_metrics, free_memory, int_list, is_oom, measure_peaks, parse_dtype,
                                   pick_device, plot_ratio_to_base, print_pivot, result_path, shape_list, str_list,
                                   time_ms, write_json)
    from benchmarks.lora import COLUMNS as LORA_COLUMNS, MODES, parse_modes, timer_config

BENCH = "ia3"
IMPLS = ("base", "fastpeft", "peft", "torch")
IA3_MODES = ("out", "in")
FULL = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "m": [1, 16, 128, 512, 2048, 4096, 8192, 16384]}
QUICK = {"shapes": [(1024, 1024), (1024, 2816)], "m": [1, 64, 512, 2048]}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # flags a row, never fails the run
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

def load(module: str, name: str):
    """(module.name, None) or (None, why it cannot be imported)."""
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


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
    base = nn.utils.skip_init(nn.Linear, K, N, bias=False, device=w.device, dtype=w.dtype)
    base.weight = nn.Parameter(w.detach(), requires_grad=False)
    try:
        takes_config = "config" in inspect.signature(peft_linear.__init__).parameters
    except (TypeError, ValueError):
        takes_config = False
    if takes_config:
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


def step(impl: str, item: dict, mode: str, ia3: str, ia3_linear=None):
    """One timed call: the forward, or forward + autograd.grad (no .grad accumulation, for every impl alike)."""
    y = forward(impl, item, ia3, ia3_linear)
    if mode == "fwd":
        return y
    return torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])


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


def check(impl: str, item: dict, mode: str, ia3: str, refs: dict, ia3_linear=None) -> float:
    """Largest relative Frobenius error of impl's outputs against the reference (nan if any output is nan)."""
    with torch.enable_grad() if mode != "fwd" else torch.no_grad():
        y = forward(impl, item, ia3, ia3_linear)
        outs = [y] + (list(torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])) if mode != "fwd" else [])
    errs = []
    for o, r in zip(outs, refs["base" if impl == "base" else "ia3"]):
        o = o.detach().reshape(r.shape).to(r.dtype)  # PEFT's vector gradient is (N, 1) or (1, K)
        errs.append(float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)))
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parse_ia3_modes(text: str) -> list[str]:
    modes = [m.lower() for m in str_list(text)]
    unknown = [m for m in modes if m not in IA3_MODES]
    if unknown or not modes:
        raise SystemExit(f"unknown IA3 mode(s) {', '.join(unknown) or text!r}; use out and/or in")
    return list(dict.fromkeys(modes))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/ia3.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small shapes and fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--shapes", type=shape_list, help="KxN list, e.g. 4096x4096,4096x11008 (in x out features)")
    p.add_argument("--m", type=int_list, help="token counts M, e.g. 1,16,4096")
    p.add_argument("--ia3-modes", type=parse_ia3_modes, default=list(IA3_MODES),
                   help="out (y = (x W^T) * v) and/or in (y = (x * u) W^T) (default: out,in)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", type=parse_modes, default=list(MODES), help="fwd,fwdbwd (default: both)")
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

COLUMNS = [Column("ia3", "ia3", 3) if c.key == "r" else c for c in LORA_COLUMNS]


def run_case(K, N, M, ia3, *, args, device, dtype, impls, timer, peaks, ia3_linear, peft_linear) -> list[Row]:
    """Time every (mode, impl) of one (shape, M, IA3 mode) on one shared input pool."""
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "M": M, "ia3": ia3, "dtype": dtype_name(dtype)}
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []

    def new_row(mode, impl, ms=None, note="", rel_err=None, extra=None):
        return Row(BENCH, case, mode, impl, ms, ia3_flops(M, K, N, ia3, mode, impl),
                   ia3_bytes(M, K, N, ia3, mode, impl, elem), rel_err=rel_err, note=note, extra=extra or {})

    try:
        pool = InputPool.build(lambda: make_item(M, K, N, ia3, dtype, device, need_dy="fwd+bwd" in args.modes,
                                                 peft_linear=peft_linear if "peft" in impls else None), device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(mode, impl, note=note) for mode in args.modes for impl in impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference_outputs(pool.first, ia3)
        except Exception as exc:
            print(f"  check skipped for {case}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    for mode in args.modes:
        grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
        for impl in impls:
            err, note = None, ""
            try:
                if refs is not None:
                    err = check(impl, pool.first, mode, ia3, refs, ia3_linear)
                    if not err <= TOLERANCE.get(dtype, 1e-2):  # also true for nan
                        note = "MISMATCH"
                        print(f"  WARNING: {impl} {mode} {case}: rel_err {err:.2e} exceeds {TOLERANCE.get(dtype)}",
                              flush=True)
                with grad_mode():
                    ms = time_ms(lambda: step(impl, pool.next(), mode, ia3, ia3_linear), device, timer)
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
    shapes, ms_list = args.shapes or preset["shapes"], args.m or preset["m"]
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    timer = timer_config(cuda, quick, args)
    torch.manual_seed(args.seed)

    notes = []
    impls = list(args.impls)
    ia3_linear, why = load("fastpeft.ops.ia3", "ia3_linear") if "fastpeft" in impls else (None, None)
    if why:
        notes.append(f"fastpeft skipped: {why}")
        impls.remove("fastpeft")
    peft_linear, why = load("peft.tuners.ia3.layer", "Linear") if "peft" in impls else (None, None)
    if why:
        notes.append(f"peft skipped: {why}")
        impls.remove("peft")
    for n in notes:
        print(f"NOTE: {n}", flush=True)

    when = datetime.now(timezone.utc)
    env = environment(device, ["benchmarks/ia3.py", *argv], when=when)
    json_path = result_path(args.out, device, BENCH, when)
    print(f"IA3 benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {timer.method(device)}", flush=True)
    print(f"shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; M {ms_list}; ia3 {args.ia3_modes}; "
          f"modes {args.modes}; impls {impls}", flush=True)

    peaks = measure_peaks(device, dtype, timer)
    print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s (mm {peaks.matmul_n}^3, {peaks.dtype}), "
          f"bandwidth {peaks.bandwidth_gbps:.1f} GB/s (copy {peaks.copy_bytes / 2**20:.0f} MiB); "
          f"ridge {peaks.ridge_flops_per_byte:.1f} flop/byte", flush=True)

    backends = {}
    if ia3_linear is not None:
        try:
            from fastpeft.ops import explain
            backends = explain(str(device))
        except Exception as exc:
            backends = {"error": str(exc)}
    payload = {
        "benchmark": BENCH, **env, "complete": False, "notes": notes,
        "config": {"shapes": [f"{k}x{n}" for k, n in shapes], "m": ms_list, "ia3_modes": args.ia3_modes,
                   "vector_dtype": "fp32 (torch: the benchmark dtype)", "dtype": dtype_name(dtype),
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
            for ia3 in args.ia3_modes:
                case_rows = run_case(K, N, M, ia3, args=args, device=device, dtype=dtype, impls=impls, timer=timer,
                                     peaks=peaks, ia3_linear=ia3_linear, peft_linear=peft_linear)
                for row in case_rows:
                    table.row(row.flat())
                rows += case_rows
                payload["rows"] = [row.flat() for row in rows]
                write_json(json_path, payload)  # after every case: a cut-off run keeps what it measured
    payload["complete"] = True
    write_json(json_path, payload)

    flat = [row.flat() for row in rows]
    fast = [f for f in flat if f["impl"] == "fastpeft"]
    if fast and "peft" in impls:
        print()
        print_pivot(fast, row_keys=("mode", "shape", "ia3"), col_key="M", value_key="vs_peer",
                    title="fastpeft speed-up over peft (peft ms / fastpeft ms), by M:")
    if fast and "base" in impls:
        print()
        print_pivot(fast, row_keys=("mode", "shape", "ia3"), col_key="M", value_key="vs_base",
                    title="fastpeft time / base time (1.00 = free adapter), by M:")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), style_key="ia3",
                                 title=f"IA3 vs frozen base linear: {env['device']['name']}, {dtype_name(dtype)}")
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
