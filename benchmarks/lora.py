"""LoRA microbenchmark: the frozen base linear, fastpeft's lora_linear, PEFT's lora.Linear and plain PyTorch.

    python benchmarks/lora.py            # CUDA: LLaMA-7B linears, bf16, M 1..16384, r 8/16/64 (CPU: --quick)
    python benchmarks/lora.py --quick    # small shapes, fewer repetitions (the default without CUDA)
    python benchmarks/lora.py --shapes 4096x4096,4096x11008 --m 1,4096 --ranks 16 --dtype bf16 --modes fwd,fwdbwd

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

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.lora (repo root on sys.path)
    from .common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, TimerConfig, dtype_name, environment,
                         fill_metrics, free_memory, int_list, is_oom, measure_peaks, parse_dtype, pick_device,
                         plot_ratio_to_base, print_pivot, result_path, shape_list, str_list, time_ms, write_json)
except ImportError:  # run as a script: python benchmarks/lora.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, TimerConfig, dtype_name,
                                   environment, fill_metrics, free_memory, int_list, is_oom, measure_peaks,
                                   parse_dtype, pick_device, plot_ratio_to_base, print_pivot, result_path,
                                   shape_list, str_list, time_ms, write_json)

BENCH = "lora"
IMPLS = ("base", "fastpeft", "peft", "torch")
MODES = ("fwd", "fwd+bwd")
FULL = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "m": [1, 16, 128, 512, 2048, 4096, 8192, 16384],
        "ranks": [8, 16, 64]}
QUICK = {"shapes": [(1024, 1024), (1024, 2816)], "m": [1, 64, 512, 2048], "ranks": [8, 16]}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # flags a row, never fails the run


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

def load_fastpeft():
    """(lora_linear, None) or (None, why it cannot be imported)."""
    try:
        from fastpeft.ops import lora_linear
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return lora_linear, None


def load_peft():
    """(peft's lora Linear class, None) or (None, why it cannot be imported)."""
    try:
        from peft.tuners.lora.layer import Linear
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return Linear, None


def build_peft_layer(peft_linear, w, a, b, r: int, alpha: int, dtype: torch.dtype) -> nn.Module:
    """PEFT's LoRA layer around nn.Linear(K, N, bias=False), using w, a, b's storage.

    PEFT >= 0.18 takes the hyperparameters as a LoraConfig (`config=`); older releases as keyword arguments.
    """
    N, K = w.shape
    base = nn.utils.skip_init(nn.Linear, K, N, bias=False, device=w.device, dtype=dtype)
    base.weight = nn.Parameter(w.detach(), requires_grad=False)
    try:
        import inspect
        takes_config = "config" in inspect.signature(peft_linear.__init__).parameters
    except (TypeError, ValueError):
        takes_config = False
    if takes_config:
        from peft import LoraConfig
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
        layer = peft_linear(base, adapter_name="default", config=config, r=r, lora_alpha=alpha)
    else:
        layer = peft_linear(base, adapter_name="default", r=r, lora_alpha=alpha, lora_dropout=0.0)
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


def step(impl: str, item: dict, mode: str, scale: float, lora_linear=None):
    """One timed call: the forward, or forward + autograd.grad (no .grad accumulation, for every impl alike)."""
    y = forward(impl, item, scale, lora_linear)
    if mode == "fwd":
        return y
    return torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])


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


def check(impl: str, item: dict, mode: str, scale: float, refs: dict, lora_linear=None) -> float:
    """Largest relative Frobenius error of impl's outputs against the reference (nan if any output is nan)."""
    with torch.enable_grad() if mode != "fwd" else torch.no_grad():
        y = forward(impl, item, scale, lora_linear)
        outs = [y] + (list(torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])) if mode != "fwd" else [])
    ref = refs["base" if impl == "base" else "lora"]
    errs = []
    for o, r in zip(outs, ref):
        o = o.detach().to(r.dtype)
        errs.append(float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)))
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parse_modes(text: str) -> list[str]:
    names = {"fwd": "fwd", "forward": "fwd", "fwdbwd": "fwd+bwd", "fwd+bwd": "fwd+bwd", "train": "fwd+bwd"}
    modes = []
    for m in str_list(text):
        if m.lower() not in names:
            raise SystemExit(f"unknown mode {m!r}; use fwd and/or fwdbwd")
        modes.append(names[m.lower()])
    return list(dict.fromkeys(modes))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/lora.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small shapes and fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--shapes", type=shape_list, help="KxN list, e.g. 4096x4096,4096x11008 (in x out features)")
    p.add_argument("--m", type=int_list, help="token counts M, e.g. 1,16,4096")
    p.add_argument("--ranks", type=int_list, help="LoRA ranks r, e.g. 8,16,64 (alpha = 2r)")
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


def timer_config(cuda: bool, quick: bool, args) -> TimerConfig:
    if cuda:
        cfg = TimerConfig(warmup_ms=10, rep_ms=40, warmup_calls=3) if quick else TimerConfig(warmup_calls=3)
    else:
        cfg = TimerConfig(warmup_ms=0, rep_ms=150, warmup_calls=1, min_reps=5) if quick else \
            TimerConfig(warmup_ms=50, rep_ms=400, warmup_calls=1, min_reps=7)
    if args.warmup_ms is not None:
        cfg.warmup_ms = args.warmup_ms
    if args.rep_ms is not None:
        cfg.rep_ms = args.rep_ms
    cfg.cuda_graph = bool(args.cuda_graph and cuda)
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------

COLUMNS = [Column("shape", "KxN", 11), Column("M", "M", 6), Column("r", "r", 3), Column("mode", "mode", 7),
           Column("impl", "impl", 8), Column("ms", "ms", 10, ".4f"), Column("vs_base", "x base", 7, ".2f"),
           Column("vs_peer", "vs peft", 7, ".2f"), Column("tflops", "TFLOP/s", 8, ".2f"),
           Column("gbps", "GB/s", 8, ".1f"), Column("roofline_pct", "%roof", 6, ".1f"), Column("bound", "bound", 7),
           Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def run_case(K, N, M, r, *, args, device, dtype, impls, timer, peaks, lora_linear, peft_linear) -> list[Row]:
    """Time every (mode, impl) of one (shape, M, r) on one shared input pool."""
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "M": M, "r": r, "dtype": dtype_name(dtype)}
    alpha = 2 * r
    scale = alpha / r
    need_dy = "fwd+bwd" in args.modes
    rows = []

    def new_row(mode, impl, ms=None, note="", rel_err=None, extra=None):
        return Row(BENCH, case, mode, impl, ms, lora_flops(M, K, N, r, mode, impl),
                   lora_bytes(M, K, N, r, mode, impl, torch.empty((), dtype=dtype).element_size()),
                   rel_err=rel_err, note=note, extra=extra or {})

    try:
        pool = InputPool.build(lambda: make_item(M, K, N, r, dtype, device, need_dy=need_dy,
                                                 peft_linear=peft_linear if "peft" in impls else None), device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(mode, impl, note=note) for mode in args.modes for impl in impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference_outputs(pool.first, scale, torch.float64 if device.type == "cpu" else torch.float32)
        except Exception as exc:
            print(f"  check skipped for {case}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    for mode in args.modes:
        grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
        for impl in impls:
            err, note = None, ""
            try:
                if refs is not None:
                    err = check(impl, pool.first, mode, scale, refs, lora_linear)
                    if not err <= TOLERANCE.get(dtype, 1e-2):  # also true for nan
                        note = "MISMATCH"
                        print(f"  WARNING: {impl} {mode} {case}: rel_err {err:.2e} exceeds {TOLERANCE.get(dtype)}",
                              flush=True)
                with grad_mode():
                    ms = time_ms(lambda: step(impl, pool.next(), mode, scale, lora_linear), device, timer)
            except Exception as exc:
                ms = None
                note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
                print(f"  {impl} {mode} {case}: {note}", flush=True)
                free_memory(device)
            rows.append(new_row(mode, impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, peaks, base="base", peer="peft")
    del pool, refs
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
    timer = timer_config(cuda, quick, args)
    torch.manual_seed(args.seed)

    notes = []
    impls = list(args.impls)
    lora_linear, why = load_fastpeft() if "fastpeft" in impls else (None, None)
    if why:
        notes.append(f"fastpeft skipped: {why}")
        impls.remove("fastpeft")
    peft_linear, why = load_peft() if "peft" in impls else (None, None)
    if why:
        notes.append(f"peft skipped: {why}")
        impls.remove("peft")
    for n in notes:
        print(f"NOTE: {n}", flush=True)

    when = datetime.now(timezone.utc)
    env = environment(device, ["benchmarks/lora.py", *argv], when=when)
    json_path = result_path(args.out, device, BENCH, when)
    print(f"LoRA benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {timer.method(device)}", flush=True)
    print(f"shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; M {ms_list}; r {ranks}; modes {args.modes}; "
          f"impls {impls}", flush=True)

    peaks = measure_peaks(device, dtype, timer)
    print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s (mm {peaks.matmul_n}^3, {peaks.dtype}), "
          f"bandwidth {peaks.bandwidth_gbps:.1f} GB/s (copy {peaks.copy_bytes / 2**20:.0f} MiB); "
          f"ridge {peaks.ridge_flops_per_byte:.1f} flop/byte", flush=True)

    backends = {}
    if lora_linear is not None:
        try:
            from fastpeft.ops import explain
            backends = explain(str(device))
        except Exception as exc:
            backends = {"error": str(exc)}
    payload = {
        "benchmark": BENCH, **env, "complete": False, "notes": notes,
        "config": {"shapes": [f"{k}x{n}" for k, n in shapes], "m": ms_list, "ranks": ranks, "alpha": "2r",
                   "dtype": dtype_name(dtype), "modes": args.modes, "impls": impls, "quick": quick, "seed": args.seed,
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
    if fast and "peft" in impls:
        print()
        print_pivot(fast, row_keys=("mode", "shape", "r"), col_key="M", value_key="vs_peer",
                    title="fastpeft speed-up over peft (peft ms / fastpeft ms), by M:")
    if fast and "base" in impls:
        print()
        print_pivot(fast, row_keys=("mode", "shape", "r"), col_key="M", value_key="vs_base",
                    title="fastpeft time / base time (1.00 = free adapter), by M:")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), style_key="r",
                                 title=f"LoRA vs frozen base linear: {env['device']['name']}, {dtype_name(dtype)}")
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
