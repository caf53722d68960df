"""The op-grid families (lora, ia3, dora, adalora, bottleneck, phm): one op timed over shapes x M x one axis (ranks,
IA3 modes, reduction factors, PHM dims), forward and forward+backward, against the base op, PEFT and PyTorch.

A family describes itself as a `GridFamily` (names, presets, the axis, what to import) and runs one case through
`time_case` with its hooks (inputs, reference outputs, forward, what the backward differentiates, cost model);
the grid's one section (every shape, M and axis value), its pivots and its plot are the same for every such family.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .devices import dtype_name, free_memory
from .driver import Run, Section, backends
from .inputs import InputPool
from .measure import check_and_time
from .optional import load
from .options import int_list, shape_list
from .report import Column, plot_ratio_to_base, print_pivot
from .roofline import Row, fill_metrics

MODES = ("fwd", "fwd+bwd")
MODE_NAMES = {"fwd": "fwd", "forward": "fwd", "fwdbwd": "fwd+bwd", "fwd+bwd": "fwd+bwd", "train": "fwd+bwd"}


# ------------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------------

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
            check = None if refs is None else (pool.first, refs.get(impl, refs[family.bench]))
            ms, err, note = check_and_time(run, f"{impl} {mode} {case}", lambda item: step(impl, item, mode), check,
                                           pool, grad_mode)
            rows.append(new_row(mode, impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, run.peaks, base="base", peer="peft")
    if family.extra_metrics is not None:
        family.extra_metrics(rows)
    return rows


def vs_torch(rows: list[Row]) -> None:
    """extra_metrics for a family PEFT lacks: vs_torch = ms(torch, the eager module) / ms, its "vs peft"."""
    torch_ms = {row.mode: row.ms for row in rows if row.impl == "torch" and row.ms}
    for row in rows:
        row.extra["vs_torch"] = torch_ms[row.mode] / row.ms if row.ms and row.mode in torch_ms else None


# ------------------------------------------------------------------------------------------------------------
# The grid section: every shape, M and axis value
# ------------------------------------------------------------------------------------------------------------

def columns(family: GridFamily) -> list[Column]:
    """The table: the case, the timing, ratios (and the family's extras), throughput, roofline, check."""
    return [Column("shape", "KxN", 11), Column("M", "M", 6), Column(family.axis, family.axis, 3),
            Column("mode", "mode", 7), Column("impl", "impl", 8), Column("ms", "ms", 10, ".4f"),
            Column("vs_base", "x base", 7, ".2f"), Column("vs_peer", "vs peft", 7, ".2f"), *family.extra_columns,
            Column("tflops", "TFLOP/s", 8, ".2f"), Column("gbps", "GB/s", 8, ".1f"),
            Column("roofline_pct", "%roof", 6, ".1f"), Column("bound", "bound", 7),
            Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def run_grid(run: Run) -> None:
    """Every (shape, M, axis value), in that order, each case's rows recorded as it finishes."""
    family = run.family
    table = run.table(columns(family))
    for K, N in run.ctx["shapes"]:
        for M in run.ctx["m"]:
            for value in run.ctx["values"]:
                run.record("rows", family.run_case(run, K, N, M, value), table)


def report_grid(run: Run) -> None:
    """The pivots of the fastpeft rows: speed-up over PEFT, ratio to the base op, the family's extras."""
    family = run.family
    fast = [r for r in run.payload["rows"] if r["impl"] == "fastpeft"]
    pivots = [("peft", "vs_peer", f"{family.label} speed-up over peft (peft ms / fastpeft ms), by M:"),
              ("base", "vs_base", f"{family.label} time / base time (1.00 = free adapter), by M:"),
              *family.extra_pivots]
    for other, key, title in pivots:
        if fast and other in run.impls:
            print()
            print_pivot(fast, row_keys=("mode", "shape", family.axis), col_key="M", value_key=key, title=title)


GRID = Section(modes=MODES, run=run_grid, report=report_grid)


# ------------------------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------------------------

@dataclass
class GridFamily:
    """An op family timed over shapes x M x one axis (driver.Family)."""
    bench: str  # "lora": the JSON's "benchmark", the result file name, fastpeft/bench/<bench>.py
    title: str  # "LoRA": the banner and the plot title
    doc: str  # the module's docstring; its first paragraph describes the command line
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

    impls_help = ""
    modes = MODE_NAMES
    modes_help = "fwd,fwdbwd (default: both)"
    sections = (GRID,)

    @property
    def axis_key(self) -> str:
        """The axis values' name in args, presets and the JSON config ("ranks", "ia3_modes")."""
        return self.axis_arg[0].lstrip("-").replace("-", "_")

    def options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--shapes", type=shape_list, help="KxN list, e.g. 4096x4096,4096x11008 (in x out features)")
        p.add_argument("--m", type=int_list, help="token counts M, e.g. 1,16,4096")
        flag, options = self.axis_arg
        p.add_argument(flag, **options)

    def prepare(self, run: Run) -> tuple[str, dict]:
        """The preset's (or the options') shapes, M and axis values; the fastpeft op and PEFT's class imported (an
        impl whose import fails is dropped with a note)."""
        args = run.args
        preset = self.quick if run.quick else self.full
        shapes, ms_list = args.shapes or preset["shapes"], args.m or preset["m"]
        values = getattr(args, self.axis_key) or preset[self.axis_key]
        run.ctx.update(shapes=shapes, m=ms_list, values=values)
        if set(self.fast_impls) & set(run.impls):
            run.fast, why = load(*self.fast)
            if why:
                run.note(f"{' and '.join(self.fast_impls)} skipped: {why}")
                run.impls = [i for i in run.impls if i not in self.fast_impls]
        if "peft" in run.impls:
            run.peft, why = load(*self.peft)
            if why:
                run.note(f"peft skipped: {why}")
                run.impls.remove("peft")
            elif self.wrap_peft is not None:
                run.peft = self.wrap_peft(run.peft)
        banner = (f"shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; M {ms_list}; {self.axis} {values}; "
                  f"modes {args.modes}; impls {run.impls}")
        config = {"shapes": [f"{k}x{n}" for k, n in shapes], "m": ms_list, self.axis_key: values, **self.config,
                  "modes": args.modes, "impls": run.impls}
        return banner, {"config": config, "fastpeft_backends": backends(run.device) if run.fast is not None else {}}

    def plot(self, run: Run):
        title = f"{self.title} vs frozen base linear: {run.payload['device']['name']}, {dtype_name(run.dtype)}"
        return plot_ratio_to_base(run.payload["rows"], run.json_path.with_suffix(".png"), style_key=self.axis,
                                  title=title)
