"""Timing for the benchmarks: `time_ms(fn, device)`, the median milliseconds of fn() after warm-up.

CUDA: device events through `triton.testing.do_bench` (which also clears L2 before every call), after explicit
warm-up calls so that compilation and autotuning never land in a measurement; `TimerConfig.cuda_graph` replays the
calls from a CUDA graph instead (`do_bench_cudagraph`: no host launch overhead). Without triton: one pair of CUDA
events per call. CPU: `time.perf_counter`, warm-up, median of the repeats.
"""
from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .devices import synchronize


@dataclass
class TimerConfig:
    """warmup_ms/rep_ms: time budgets (as do_bench's warmup/rep); warmup_calls: untimed calls made first
    (compilation, autotuning); min_reps/max_reps bound the CPU repeat count; cuda_graph: on CUDA, replay the
    calls from a CUDA graph (`triton.testing.do_bench_cudagraph`), which removes host launch overhead from the
    figure (no L2 flush there: the input pools keep operands cold)."""
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    warmup_calls: int = 2
    min_reps: int = 3
    max_reps: int = 1000
    cuda_graph: bool = False

    def method(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "time.perf_counter (median)"
        if self.cuda_graph:
            return "triton.testing.do_bench_cudagraph (CUDA graph replay, median)"
        return "triton.testing.do_bench (CUDA events, median)" if _triton_bench("do_bench") else "CUDA events (median)"


def _triton_bench(name: str):
    """triton.testing.<name>, or None without a working triton."""
    try:
        import triton.testing
    except Exception:  # no triton, or a broken install: time with plain CUDA events
        return None
    return getattr(triton.testing, name, None)


def time_ms(fn: Callable[[], Any], device: torch.device, cfg: TimerConfig | None = None) -> float:
    """Median run time of fn() in milliseconds, after warm-up. Gradient mode is the caller's."""
    cfg = cfg or TimerConfig()
    for _ in range(cfg.warmup_calls):
        fn()
    synchronize(device)
    if device.type == "cuda":
        if cfg.cuda_graph:
            bench = _triton_bench("do_bench_cudagraph")
            if bench is None:
                raise RuntimeError("cuda_graph timing needs triton.testing.do_bench_cudagraph (install triton)")
            return _triton_median(bench, fn, {"rep": cfg.rep_ms})
        bench = _triton_bench("do_bench")
        if bench is not None:
            return _triton_median(bench, fn, {"warmup": cfg.warmup_ms, "rep": cfg.rep_ms})
        return _cuda_events_median(fn, device, cfg)
    return _perf_counter_median(fn, cfg)


def _triton_median(bench, fn, base: dict) -> float:
    """Median through triton's do_bench* across triton 3.x: `return_mode="median"` where the signature has it,
    else `quantiles=[0.5]`."""
    params = inspect.signature(bench).parameters
    attempts = []
    if "return_mode" in params:
        attempts.append({**base, "return_mode": "median"})
    attempts.append({**base, "quantiles": [0.5]})
    error = None
    for kwargs in attempts:
        try:
            out = bench(fn, **kwargs)
        except (AssertionError, TypeError, ValueError) as exc:  # an older signature: try the next form
            error = exc
            continue
        return float(out[0] if isinstance(out, (list, tuple)) else out)
    raise RuntimeError(f"triton.testing.{bench.__name__} rejected every call form: {error}")


def _cuda_events_median(fn, device, cfg: TimerConfig) -> float:
    """Fallback without triton: one pair of CUDA events per call, median."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    synchronize(device)
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(cfg.warmup_ms / estimate))):
        fn()
    reps = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _perf_counter_median(fn, cfg: TimerConfig) -> float:
    """CPU: call until warmup_ms has passed (at least once), then time single calls for rep_ms, median."""
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < cfg.warmup_ms:
        fn()
    times = []
    budget_start = time.perf_counter()
    while len(times) < cfg.max_reps and (len(times) < cfg.min_reps
                                         or (time.perf_counter() - budget_start) * 1e3 < cfg.rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
