"""The state one gpu-check run shares between its sections: device, dtype, plan and clock, the result being
written, the dispatch pins, and the `Run` through which the benchmark families' own case functions are reused.

Pins: `pinned(strategy)` runs a linear op's strategy ("fused": the whole layer in one Triton GEMM; "cublas": the
base product on cuBLAS, the adapter's terms in one small kernel) through
`fastpeft.ops.use_kernel_options(linear_strategy=...)`; `dispatch()` forces the "triton" backend in the dry run
(the kernels then run in Triton's interpreter on CPU tensors) and leaves the automatic choice on the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import failure_note, free_memory
from ..driver import Run
from ..report import Column, TablePrinter
from ..results import write_json
from ..roofline import Peaks, Row
from .plan import Budget, Guard, Plan

MODES = ["fwd", "fwd+bwd"]
WRITE_EVERY_S = 5.0
try:  # the strategies the linear ops have (fastpeft/ops/strategy.py)
    from fastpeft.ops.strategy import STRATEGIES
except ImportError:  # a checkout without the strategy table: the pins still name the two strategies
    STRATEGIES = ("fused", "cublas")


@dataclass(frozen=True)
class SectionFamily:
    """What the families' case functions read of `run.family`: the rows' bench name and the case axis."""
    bench: str
    axis: str = ""
    extra_metrics: object = None
    extra_columns: tuple = ()


@dataclass
class Check:
    """One gpu-check run. `payload` is the JSON, rewritten after every case (a cut-off run keeps its rows)."""
    dry_run: bool
    plan: Plan
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    json_path: Path
    payload: dict
    backend: str | None  # "triton" in the dry run (the interpreter), None on the GPU (automatic dispatch)
    peaks: Peaks | None = None
    notes: list = field(default_factory=list)
    written_at: float = 0.0  # monotonic time of the last write

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def note(self, text: str) -> None:
        """A note in the JSON's "notes", printed now."""
        self.notes.append(text)
        print(f"NOTE: {text}", flush=True)

    def write(self, at_most_every_s: float = 0.0) -> None:
        """Rewrite the JSON (atomically); with at_most_every_s, only if the last write is that old."""
        if time.monotonic() - self.written_at >= at_most_every_s:
            write_json(self.json_path, self.payload)
            self.written_at = time.monotonic()

    def sibling(self, suffix: str) -> Path:
        """A file next to the JSON: gpu-check-<device>-<date><suffix>."""
        return self.json_path.with_name(self.json_path.stem + suffix)

    def dispatch(self):
        """The dry run forces the Triton backend (the interpreter); the GPU run dispatches as a user's call would."""
        from fastpeft.ops import use_backend

        return use_backend(self.backend) if self.backend else contextlib.nullcontext()

    @contextlib.contextmanager
    def pinned(self, strategy: str):
        """A linear op's strategy pinned inside the block (its backward pass runs under the same pin)."""
        from fastpeft.ops import use_kernel_options

        with use_kernel_options(linear_strategy=strategy):
            yield

    def run_for(self, bench: str, impls, *, axis: str = "", peft=None, ctx: dict | None = None, **args) -> Run:
        """A benchmark family's `Run` for this check: its case functions read device, dtype, timer, peaks, impls,
        `args` (modes, no_check, seed and the family's own), `peft` (PEFT's layer class) and `ctx`."""
        namespace = argparse.Namespace(**{"modes": list(MODES), "no_check": False, "seed": 0, **args})
        run = Run(SectionFamily(bench, axis), namespace, self.device, self.dtype, self.dry_run, self.plan.timer,
                  list(impls), notes=self.notes, peft=peft, ctx=dict(ctx or {}), peaks=self.peaks)
        run.json_path = self.json_path
        return run

    def section(self, name: str, config: dict) -> dict:
        """The JSON's entry for a section, its rows filled by `record`."""
        entry = {"config": config, "rows": []}
        self.payload["sections"][name] = entry
        self.write()
        return entry

    def record(self, name: str, rows: list[Row], table: TablePrinter | None) -> None:
        """A case's rows: printed, added to the section's rows, the JSON rewritten (every few seconds at most: a
        cut-off run keeps nearly all it measured)."""
        for row in rows:
            flat = row.flat()
            if table is not None:
                table.row(flat)
            self.payload["sections"][name]["rows"].append(flat)
        self.write(at_most_every_s=WRITE_EVERY_S)

    def run_cases(self, name: str, config: dict, cases: list, run_case, describe, columns: list[Column]) -> dict:
        """A section: `run_case(case)` -> rows for each case under the dispatch pin, until the section's time guard
        expires (the cases left are recorded as skipped); returns the section's JSON entry."""
        guard = Guard(self.budget, name)
        print(f"\n== {name}: {len(cases)} cases, {guard.allowed_s:.0f} s allowed ==", flush=True)
        entry = self.section(name, config)
        table = TablePrinter(columns)
        table.header()
        for case in cases:
            if guard.expired():
                guard.skip(describe(case))
                continue
            try:
                with self.dispatch():
                    rows = run_case(case)
            except Exception as exc:  # recorded; the run goes on with the next case
                free_memory(self.device)
                entry.setdefault("errors", []).append(f"{describe(case)}: {failure_note(exc)}")
                print(f"  {name} {describe(case)}: {failure_note(exc)}", flush=True)
                continue
            self.record(name, rows, table)
        entry["guard"] = guard.record()
        self.write()
        return entry


def without_check(run: Run) -> Run:
    """The same run with the families' correctness check off (cases whose outputs are random: dropout)."""
    return dataclasses.replace(run, args=argparse.Namespace(**{**vars(run.args), "no_check": True}))


def thinned(prune_configs, limit: int):
    """An autotuner's prune_configs that keeps at most `limit` of the configs it returns, evenly spaced over its
    list (the kernels list them from the largest tile to the smallest), the first and the last always."""
    def prune(kwargs):
        configs = prune_configs(kwargs)
        if limit <= 0 or len(configs) <= limit:
            return configs
        if limit == 1:
            return configs[:1]
        step = (len(configs) - 1) / (limit - 1)
        return [configs[round(i * step)] for i in range(limit)]
    return prune


def quick_autotune(bench_kwargs: dict, max_configs: int = 0) -> dict:
    """Every Triton autotuner of fastpeft.kernels times its candidate configs with
    `triton.testing.do_bench(**bench_kwargs)` (e.g. 5 ms warm-up, 25 ms of repeats, instead of Triton's 25/100 ms)
    and, with max_configs, tries at most that many of the configs its own pruning leaves (`thinned`): a cold
    Triton cache compiles every config it tries, about a second each. Only this process's autotuners change."""
    import triton.testing
    from triton.runtime.autotuner import Autotuner

    import fastpeft.kernels as kernels

    tuned, failed, seen = [], {}, set()
    bench = functools.partial(triton.testing.do_bench, **bench_kwargs) if bench_kwargs else None
    for info in pkgutil.iter_modules(kernels.__path__):
        try:
            module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        except Exception as exc:  # a kernel file that does not import: its op fails in its own rows
            failed[info.name] = f"{type(exc).__name__}: {str(exc)[:160]}"
            continue
        for name, obj in vars(module).items():
            for _ in range(4):  # an autotuner may sit under heuristics: follow .fn
                if isinstance(obj, Autotuner):
                    if id(obj) not in seen:  # a kernel another kernel file imports is listed once
                        seen.add(id(obj))
                        if bench is not None:
                            obj.do_bench = bench  # shadows Autotuner.do_bench (a cached property in triton 3.x)
                        if max_configs:
                            obj.prune_configs = thinned(obj.prune_configs, max_configs)
                        tuned.append(f"{info.name}.{name}")
                    break
                obj = getattr(obj, "fn", None)
    how = ", ".join(f"{k}={v}" for k, v in bench_kwargs.items())
    return {"autotune_bench": f"triton.testing.do_bench({how})" if bench else "triton's default",
            "configs_tried": (f"at most {max_configs} per tuning key, evenly spaced over the kernel's pruned list"
                              if max_configs else "every config the kernel's pruning leaves"),
            "autotuners": tuned, "import_failures": failed}
