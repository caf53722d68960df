"""The run every benchmark script shares: command line, case loop, checks, timing, JSON, pivots and plot.

A script (benchmarks/<family>.py) describes itself as a `Family` (names, presets, the case axis beside shape
and M, what to import) and runs one case through `time_case` with its hooks (inputs, reference outputs,
forward, what the backward differentiates, cost model); `main(family, argv)` does the rest the same way for
every family. The leading underscore keeps this module out of `fastpeft bench`'s family list.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .common import (RESULTS_DIR, Column, InputPool, Peaks, Row, TablePrinter, TimerConfig, dtype_name, environment,
                     fill_metrics, free_memory, int_list, is_oom, measure_peaks, parse_dtype, pick_device,
                     plot_ratio_to_base, print_pivot, result_path, shape_list, str_list, time_ms, write_json)

MODES = ("fwd", "fwd+bwd")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # flags a row, never fails the run


@dataclass
class Family:
    """What a benchmark script adds to the shared run."""
    bench: str  # "lora": the JSON's "benchmark", the result file name, benchmarks/<bench>.py
    title: str  # "LoRA": the banner and the plot title
    doc: str  # the script's docstring; its first paragraph describes the command line
    impls: tuple[str, ...]
    full: dict  # presets: shapes, m and, under axis_key, the axis values
    quick: dict
    axis: str  # the case key beside shape and M ("r", "ia3"): a table column, pivot row key and plot line style
    axis_arg: tuple[str, dict]  # the option giving the axis values, e.g. ("--ranks", {"type": int_list, ...})
    config: dict  # the JSON config entries after the axis values
    fast: tuple[str, str]  # (module, name) of what the fastpeft impls call
    peft: tuple[str, str] | None  # (module, name) of PEFT's layer class; None where PEFT lacks the method
    run_case: Callable[..., list[Row]]  # (run, K, N, M, axis value) -> rows, through time_case
    fast_impls: tuple[str, ...] = ("fastpeft",)  # the impls that need `fast`
    wrap_peft: Callable[[type], type] | None = None  # applied to PEFT's class once imported
    label: str = "fastpeft"  # what the pivot titles call the fastpeft impl
    extra_metrics: Callable[[list[Row]], None] | None = None  # adds row.extra entries to one case's rows
    extra_columns: tuple[Column, ...] = ()  # printed after "vs peft"
    extra_pivots: tuple[tuple[str, str, str], ...] = ()  # (other impl, row key, title) after the peft and base ones

    @property
    def axis_key(self) -> str:
        """The axis values' name in args, presets and the JSON config ("ranks", "ia3_modes")."""
        return self.axis_arg[0].lstrip("-").replace("-", "_")


@dataclass
class Run:
    """One run's settings, as time_case and a family's run_case use them."""
    family: Family
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    impls: list[str]
    timer: TimerConfig
    peaks: Peaks
    fast: Any  # the imported fastpeft op or module (None when no impl needs it)
    peft: Any  # PEFT's layer class (None when "peft" is not timed)
    rows: list[Row] = field(default_factory=list)  # every case so far, in order

    @property
    def need_dy(self) -> bool:
        return "fwd+bwd" in self.args.modes

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


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


def parse_args(family: Family, argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"benchmarks/{family.bench}.py", description=family.doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small shapes and fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--shapes", type=shape_list, help="KxN list, e.g. 4096x4096,4096x11008 (in x out features)")
    p.add_argument("--m", type=int_list, help="token counts M, e.g. 1,16,4096")
    flag, options = family.axis_arg
    p.add_argument(flag, **options)
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", type=parse_modes, default=list(MODES), help="fwd,fwdbwd (default: both)")
    p.add_argument("--impls", type=str_list, default=list(family.impls), help=f"subset of {','.join(family.impls)}")
    add_run_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the per-case correctness check")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    unknown = [i for i in args.impls if i not in family.impls]
    if unknown:
        p.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(family.impls)}")
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


def load(module: str, name: str):
    """(module.name, None) or (None, why it cannot be imported)."""
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def load_impls(family: Family, impls: list[str]) -> tuple[Any, Any, list[str], list[str]]:
    """(fastpeft's op, PEFT's class, the impls left, notes): an impl whose import fails is dropped with a note."""
    notes = []
    fast, why = load(*family.fast) if set(family.fast_impls) & set(impls) else (None, None)
    if why:
        notes.append(f"{' and '.join(family.fast_impls)} skipped: {why}")
        impls = [i for i in impls if i not in family.fast_impls]
    peft, why = load(*family.peft) if "peft" in impls else (None, None)
    if why:
        notes.append(f"peft skipped: {why}")
        impls = [i for i in impls if i != "peft"]
    if peft is not None and family.wrap_peft is not None:
        peft = family.wrap_peft(peft)
    for n in notes:
        print(f"NOTE: {n}", flush=True)
    return fast, peft, impls, notes


# ------------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------------

def max_rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Largest relative Frobenius error of outs against refs (nan if any output is nan)."""
    errs = []
    for o, r in zip(outs, refs):
        o = o.detach().reshape(r.shape).to(r.dtype)  # e.g. PEFT's IA3 vector gradient is (N, 1) or (1, K)
        errs.append(float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)))
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)


def time_case(run: Run, K: int, N: int, M: int, value, *, make_item: Callable[[], dict],
              reference: Callable[[dict], dict], forward: Callable[[str, dict], torch.Tensor],
              grad_inputs: Callable[[str, dict], list], cost: Callable[[str, str], tuple[float, float]]) -> list[Row]:
    """Check and time every (mode, impl) of one (shape, M, axis value) on one shared input pool.

    make_item() -> one set of inputs (with "dy" when run.need_dy); reference(item) -> {name: [y, *grads]}, the
    outputs an impl must match under its own name, else under the family's bench name; forward(impl, item) -> y;
    grad_inputs(impl, item) -> what fwd+bwd differentiates; cost(mode, impl) -> (flops, bytes).
    """
    family, args, device, dtype = run.family, run.args, run.device, run.dtype
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "M": M, family.axis: value, "dtype": dtype_name(dtype)}
    tolerance = TOLERANCE.get(dtype, 1e-2)
    rows = []

    def new_row(mode, impl, ms=None, note="", rel_err=None, extra=None):
        return Row(family.bench, case, mode, impl, ms, *cost(mode, impl), rel_err=rel_err, note=note,
                   extra=extra or {})

    def step(impl, item, mode):
        """One timed call: [y], or [y, *gradients] through autograd.grad (no .grad accumulation, for every impl)."""
        y = forward(impl, item)
        return [y] if mode == "fwd" else [y, *torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])]

    try:
        pool = InputPool.build(make_item, device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(mode, impl, note=note) for mode in args.modes for impl in run.impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference(pool.first)
        except Exception as exc:
            print(f"  check skipped for {case}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    for mode in args.modes:
        grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
        for impl in run.impls:
            err, note = None, ""
            try:
                with grad_mode():
                    if refs is not None:
                        err = max_rel_err(step(impl, pool.first, mode), refs.get(impl, refs[family.bench]))
                        if not err <= tolerance:  # also true for nan
                            note = "MISMATCH"
                            print(f"  WARNING: {impl} {mode} {case}: rel_err {err:.2e} exceeds {tolerance}",
                                  flush=True)
                    ms = time_ms(lambda: step(impl, pool.next(), mode), device, run.timer)
            except Exception as exc:
                ms = None
                note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
                print(f"  {impl} {mode} {case}: {note}", flush=True)
                free_memory(device)
            rows.append(new_row(mode, impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, run.peaks, base="base", peer="peft")
    if family.extra_metrics is not None:
        family.extra_metrics(rows)
    return rows


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------

def columns(family: Family) -> list[Column]:
    """The table: the case, the timing, ratios (and the family's extras), throughput, roofline, check."""
    return [Column("shape", "KxN", 11), Column("M", "M", 6), Column(family.axis, family.axis, 3),
            Column("mode", "mode", 7), Column("impl", "impl", 8), Column("ms", "ms", 10, ".4f"),
            Column("vs_base", "x base", 7, ".2f"), Column("vs_peer", "vs peft", 7, ".2f"), *family.extra_columns,
            Column("tflops", "TFLOP/s", 8, ".2f"), Column("gbps", "GB/s", 8, ".1f"),
            Column("roofline_pct", "%roof", 6, ".1f"), Column("bound", "bound", 7),
            Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def add_run_args(p) -> None:
    """The options every benchmark takes: device, result directory, timing budgets, CUDA graphs."""
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="result directory (default: benchmarks/results)")
    p.add_argument("--warmup-ms", type=float, help="warm-up budget per timing in ms")
    p.add_argument("--rep-ms", type=float, help="measurement budget per timing in ms")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: time CUDA-graph replays (kernel time without host launch overhead)")


def announce_peaks(device, dtype, timer):
    """The device's measured matmul and copy peaks (the roofline), printed once."""
    peaks = measure_peaks(device, dtype, timer)
    print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s (mm {peaks.matmul_n}^3, {peaks.dtype}), "
          f"bandwidth {peaks.bandwidth_gbps:.1f} GB/s (copy {peaks.copy_bytes / 2**20:.0f} MiB); "
          f"ridge {peaks.ridge_flops_per_byte:.1f} flop/byte", flush=True)
    return peaks

def main(family: Family, argv: Sequence[str] | None = None) -> int:
    """Run a family's benchmark: every case checked, timed and printed, the JSON rewritten after each case."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(family, argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    quick = (not cuda) if args.quick is None else args.quick
    preset = family.quick if quick else family.full
    shapes, ms_list = args.shapes or preset["shapes"], args.m or preset["m"]
    values = getattr(args, family.axis_key) or preset[family.axis_key]
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    timer = timer_config(cuda, quick, args)
    torch.manual_seed(args.seed)
    fast, peft, impls, notes = load_impls(family, list(args.impls))

    when = datetime.now(timezone.utc)
    env = environment(device, [f"benchmarks/{family.bench}.py", *argv], when=when)
    json_path = result_path(args.out, device, family.bench, when)
    print(f"{family.title} benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {timer.method(device)}", flush=True)
    print(f"shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; M {ms_list}; {family.axis} {values}; "
          f"modes {args.modes}; impls {impls}", flush=True)
    peaks = announce_peaks(device, dtype, timer)
    payload = {
        "benchmark": family.bench, **env, "complete": False, "notes": notes,
        "config": {"shapes": [f"{k}x{n}" for k, n in shapes], "m": ms_list, family.axis_key: values,
                   **family.config, "dtype": dtype_name(dtype), "modes": args.modes, "impls": impls, "quick": quick,
                   "seed": args.seed, "timer": {"method": timer.method(device), **vars(timer)},
                   "check": not args.no_check},
        "fastpeft_backends": backends(device) if fast is not None else {},
        "peaks": peaks.to_dict(),
        "rows": [],
    }

    run = Run(family, args, device, dtype, impls, timer, peaks, fast, peft)
    table = TablePrinter(columns(family))
    table.header()
    for K, N in shapes:
        for M in ms_list:
            for value in values:
                case_rows = family.run_case(run, K, N, M, value)
                for row in case_rows:
                    table.row(row.flat())
                run.rows += case_rows
                payload["rows"] = [row.flat() for row in run.rows]
                write_json(json_path, payload)  # after every case: a cut-off run keeps what it measured
    finish(run, payload, json_path)
    return 0


def backends(device: torch.device) -> dict:
    """fastpeft.ops.explain for the device: which backend runs each op."""
    try:
        from fastpeft.ops import explain
        return explain(str(device))
    except Exception as exc:
        return {"error": str(exc)}


def finish(run: Run, payload: dict, json_path: Path) -> None:
    """Mark the JSON complete, print the pivots of the fastpeft rows and write the plot."""
    family = run.family
    payload["complete"] = True
    write_json(json_path, payload)
    flat = [row.flat() for row in run.rows]
    fast = [f for f in flat if f["impl"] == "fastpeft"]
    pivots = [("peft", "vs_peer", f"{family.label} speed-up over peft (peft ms / fastpeft ms), by M:"),
              ("base", "vs_base", f"{family.label} time / base time (1.00 = free adapter), by M:"),
              *family.extra_pivots]
    for other, key, title in pivots:
        if fast and other in run.impls:
            print()
            print_pivot(fast, row_keys=("mode", "shape", family.axis), col_key="M", value_key=key, title=title)
    print(f"\nwrote {json_path}")
    if not run.args.no_plot:
        title = f"{family.title} vs frozen base linear: {payload['device']['name']}, {dtype_name(run.dtype)}"
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), style_key=family.axis, title=title)
        if png:
            print(f"wrote {png}")


def vs_torch(rows: list[Row]) -> None:
    """extra_metrics for a family PEFT lacks: vs_torch = ms(torch, the eager module) / ms, its "vs peft"."""
    torch_ms = {row.mode: row.ms for row in rows if row.impl == "torch" and row.ms}
    for row in rows:
        row.extra["vs_torch"] = torch_ms[row.mode] / row.ms if row.ms and row.mode in torch_ms else None


def positive_ints(text: str) -> list[int]:
    """An axis option's values: a comma-separated list of positive integers."""
    values = int_list(text)
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 4,16")
    return values
