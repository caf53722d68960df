"""The run every benchmark family shares: command line, device, dtype and preset, timer, the measured roofline,
the JSON result (rewritten after every case), then each section's report and the plot.

A family (fastpeft/bench/<family>.py, or a package for a family with several sections) describes itself as a
`Family`: its names, implementations and modes, `prepare` (what runs here, the JSON's "config") and its
`Section`s, the parts of the run --modes selects. The op-grid families (lora, ia3, dora, adalora, bottleneck, phm:
one op over shapes x M x one axis) share grid.py's one section; multi_adapter has an op section and a serving
section, prefix_attention an op section and a training-step section. `main(family, argv)` runs a family:

    options -> Run (device, dtype, preset, timer) -> family.prepare(run) -> environment, banner, measured peaks
    -> each selected section's run(run), its rows recorded with Run.record (printed, added to the JSON, the file
    rewritten after every case) -> "complete" -> each selected section's report(run) -> the family's plot.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from .devices import dtype_name, parse_dtype, pick_device
from .options import alias_list, str_list
from .report import Column, TablePrinter
from .results import RESULTS_DIR, environment, result_path, write_json
from .roofline import Peaks, Row, measure_peaks
from .timing import TimerConfig


@dataclass(frozen=True)
class Section:
    """A part of a family's run, selected by --modes."""
    modes: tuple[str, ...]  # it runs when --modes names any of these
    run: Callable[[Run], None]  # times its cases, recording their rows with Run.record
    report: Callable[[Run], None]  # prints its pivots and summaries, once every selected section has run
    options: Callable[[argparse.ArgumentParser], None] | None = None  # its own command-line options


class Family(Protocol):
    """What `main` needs of a benchmark family: a `Benchmark`, or an op-grid family (grid.GridFamily)."""
    bench: str  # the JSON's "benchmark", the result file name, `fastpeft bench <bench>`
    title: str  # the banner, e.g. "LoRA"
    doc: str  # the family's docstring: its first paragraph is --help's description
    impls: tuple[str, ...]  # --impls: the choices, all by default
    impls_help: str  # appended to --impls' help
    modes: dict[str, str]  # --modes: accepted name -> mode; every mode by default
    modes_help: str
    sections: tuple[Section, ...]

    def options(self, parser: argparse.ArgumentParser) -> None:
        """Adds the family's own options (beside its sections')."""

    def prepare(self, run: Run) -> tuple[str, dict]:
        """Settles what runs here (run.impls, run.ctx; a note for each implementation dropped) -> the banner's
        second line, and the JSON's "config" (under that key) with any other top-level entries."""

    def plot(self, run: Run) -> Path | None:
        """Draws the result next to the JSON (None: nothing drawn)."""


@dataclass
class Benchmark:
    """A family given by its parts (the families with several sections)."""
    bench: str
    title: str
    doc: str
    impls: tuple[str, ...]
    modes: dict[str, str]
    modes_help: str
    sections: tuple[Section, ...]
    prepare: Callable[[Run], tuple[str, dict]]
    plot: Callable[[Run], Path | None]
    impls_help: str = ""
    options: Callable[[argparse.ArgumentParser], None] = lambda parser: None  # the family's own options


@dataclass
class Run:
    """One run: its settings, what the family's prepare adds, and the result file being written."""
    family: Family
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    quick: bool
    timer: TimerConfig
    impls: list[str]  # --impls; prepare drops those that cannot run here, with a note
    notes: list[str] = field(default_factory=list)  # the JSON's "notes"
    fast: Any = None  # the fastpeft op a family times (the op-grid families)
    peft: Any = None  # PEFT's layer class, where a family times one
    ctx: dict = field(default_factory=dict)  # the family's own settings (presets, sizes), from prepare
    peaks: Peaks | None = None
    payload: dict = field(default_factory=dict)  # the JSON
    json_path: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def need_dy(self) -> bool:
        return "fwd+bwd" in self.args.modes

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def selected(self, section: Section) -> bool:
        return any(mode in self.args.modes for mode in section.modes)

    def note(self, text: str) -> None:
        """A note in the JSON's "notes", printed now."""
        self.notes.append(text)
        print(f"NOTE: {text}", flush=True)

    def table(self, columns: Sequence[Column]) -> TablePrinter:
        """A table for a section's rows, its header printed."""
        table = TablePrinter(columns)
        table.header()
        return table

    def record(self, key: str, rows: Sequence[Row], table: TablePrinter) -> None:
        """Print a case's rows, add them to the JSON's `key` list and rewrite the file: a cut-off run keeps what it
        measured."""
        for row in rows:
            table.row(row.flat())
        self.payload[key] = [*self.payload.get(key, []), *(row.flat() for row in rows)]
        self.write()

    def write(self) -> None:
        write_json(self.json_path, self.payload)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parse_args(family: Family, argv: Sequence[str]) -> argparse.Namespace:
    """The options every family takes, the family's and its sections'."""
    p = argparse.ArgumentParser(prog=f"fastpeft bench {family.bench}", description=family.doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="the quick preset: small cases and models, fewer repetitions (default: on without CUDA, "
                        "off with it)")
    family.options(p)
    for section in family.sections:
        if section.options is not None:
            section.options(p)
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", type=alias_list(family.modes, "mode"), default=list(dict.fromkeys(family.modes.values())),
                   help=family.modes_help)
    p.add_argument("--impls", type=str_list, default=list(family.impls),
                   help=f"subset of {','.join(family.impls)}{family.impls_help}")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="result directory (default: benchmarks/results under the current directory)")
    p.add_argument("--warmup-ms", type=float, help="warm-up budget per timing in ms")
    p.add_argument("--rep-ms", type=float, help="measurement budget per timing in ms")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: time CUDA-graph replays (kernel time without host launch overhead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    unknown = [i for i in args.impls if i not in family.impls]
    if unknown:
        p.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(family.impls)}")
    args.impls = list(dict.fromkeys(args.impls))
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
# The run
# ------------------------------------------------------------------------------------------------------------

def announce_peaks(device, dtype, timer) -> Peaks:
    """The device's measured matmul and copy peaks (the roofline), printed once."""
    peaks = measure_peaks(device, dtype, timer)
    print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s (mm {peaks.matmul_n}^3, {peaks.dtype}), "
          f"bandwidth {peaks.bandwidth_gbps:.1f} GB/s (copy {peaks.copy_bytes / 2**20:.0f} MiB); "
          f"ridge {peaks.ridge_flops_per_byte:.1f} flop/byte", flush=True)
    return peaks


def backends(device: torch.device) -> dict:
    """fastpeft.ops.explain for the device: which backend runs each op."""
    try:
        from fastpeft.ops import explain
        return explain(str(device))
    except Exception as exc:
        return {"error": str(exc)}


def main(family: Family, argv: Sequence[str] | None = None) -> int:
    """Run a family: every case of every selected section checked, timed and printed, the JSON rewritten after each
    case, then the reports and the plot."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(family, argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    quick = (not cuda) if args.quick is None else args.quick
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    run = Run(family, args, device, dtype, quick, timer_config(cuda, quick, args), list(args.impls))
    torch.manual_seed(args.seed)
    banner, entries = family.prepare(run)

    when = datetime.now(timezone.utc)
    env = environment(device, ["-m", "fastpeft", "bench", family.bench, *argv], when=when)
    run.json_path = result_path(args.out, device, family.bench, when)
    print(f"{family.title} benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {run.timer.method(device)}", flush=True)
    print(banner, flush=True)
    run.peaks = announce_peaks(device, dtype, run.timer)
    config = {**entries.pop("config"), "dtype": dtype_name(dtype), "quick": quick, "seed": args.seed,
              "timer": {"method": run.timer.method(device), **vars(run.timer)}, "check": not args.no_check}
    run.payload = {"benchmark": family.bench, **env, "complete": False, "notes": run.notes, "config": config,
                   **entries, "peaks": run.peaks.to_dict(), "rows": []}
    sections = [section for section in family.sections if run.selected(section)]
    for section in sections:
        section.run(run)
    run.payload["complete"] = True
    run.write()
    for section in sections:
        section.report(run)
    print(f"\nwrote {run.json_path}")
    if not args.no_plot:
        png = family.plot(run)
        if png:
            print(f"wrote {png}")
    return 0
