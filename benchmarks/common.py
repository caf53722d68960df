"""Shared pieces of the fastpeft microbenchmarks (benchmarks/<family>.py).

A benchmark script builds its cases and the callables to time; `_driver.py` runs them (command line, case
loop, checks, JSON, pivots, plot) and this module holds the pieces, the same way for every op family:

* timing:       `time_ms(fn, device)`: median milliseconds. CUDA: device events through
                `triton.testing.do_bench` (which also clears L2 before every call), after explicit warm-up calls
                so compilation and autotuning never land in a measurement. CPU: `time.perf_counter`, warm-up,
                median of the repeats.
* input pools:  `InputPool.build(make_one, device)`: enough copies of a case's tensors that one pass over all
                of them moves more than 2x the last-level cache (CUDA: L2_cache_size, else 50 MB), cycled
                call after call so no timing sees its operands cache-hot.
* rooflines:    `measure_peaks`: a large square `torch.mm` (2n³ flops) and a large device-to-device copy
                (2 x bytes: read + write), both timed like everything else, in the benchmark dtype.
                `Row` + `fill_metrics`: TFLOP/s, GB/s, ratio to the base op, speed-up over a peer, and % of
                the roofline bound that applies (below).
* PEFT layers:  `frozen_linear(w)`, the base layer around w's storage; `takes_config(cls)`, config= or keywords.
* records:      `environment` (device, versions, git commit, command, UTC date), `result_path`, `write_json`,
                `TablePrinter`, `print_pivot`, `plot_ratio_to_base`.

Roofline: for a row with F flops and B bytes of minimum traffic measured at t seconds, the bound is
    t_bound = max(F / peak_flops, B / peak_bandwidth)
("compute" when the first term is larger, i.e. arithmetic intensity F/B above the ridge point
peak_flops/peak_bandwidth, else "memory"), and % of roofline = 100 * t_bound / t.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_CACHE_BYTES = 50 * 2**20  # assumed last-level cache when the device does not report one

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


# ------------------------------------------------------------------------------------------------------------
# Devices, dtypes, argument parsing helpers
# ------------------------------------------------------------------------------------------------------------

def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or cuda when available, else cpu."""
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine.")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; use one of bf16, fp16, fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", ""))


def int_list(text: str) -> list[int]:
    """'1,16,128' -> [1, 16, 128]."""
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def str_list(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def shape_list(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)] (in_features x out_features)."""
    shapes = []
    for item in str_list(text):
        parts = item.lower().split("x")
        if len(parts) != 2:
            raise SystemExit(f"bad shape {item!r}: expected KxN, e.g. 4096x11008")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """Size of the cache inputs must outgrow: L2 on CUDA, the largest CPU cache level from sysfs on CPU."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) if size else DEFAULT_CACHE_BYTES
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])
    return max(sizes) if sizes else DEFAULT_CACHE_BYTES


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------
# PEFT layers
# ------------------------------------------------------------------------------------------------------------

def frozen_linear(w: torch.Tensor) -> torch.nn.Linear:
    """nn.Linear(K, N, bias=False) of w's dtype and device, its frozen weight sharing w's storage (PEFT's base)."""
    N, K = w.shape
    base = torch.nn.utils.skip_init(torch.nn.Linear, K, N, bias=False, device=w.device, dtype=w.dtype)
    base.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
    return base


def takes_config(peft_class: type) -> bool:
    """Whether a PEFT layer class takes its hyperparameters as a config (`config=`, recent PEFT) rather than as
    keyword arguments (older releases)."""
    try:
        return "config" in inspect.signature(peft_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def importable_impls(impls: list[str], modules: dict[str, str], required: str, notes: list[str],
                     where: str) -> list[str] | None:
    """`impls` without those whose module (modules[impl]) fails to import, each dropped with a note (printed);
    None when the `required` impl's module fails: the section cannot run."""
    kept = list(impls)
    for impl, module in modules.items():
        if impl not in kept:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            notes.append(f"{where}: {module} unavailable ({type(exc).__name__}: {exc})")
            print(f"NOTE: {notes[-1]}", flush=True)
            if impl == required:
                return None
            kept.remove(impl)
    return kept


def random_llama(dims: dict, max_positions: int, dtype, device, seed: int):
    """A random LlamaForCausalLM of the given dims (hidden, intermediate, layers, heads, kv_heads, vocab; no
    download), frozen, SDPA attention, in eval mode."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).requires_grad_(False).eval()


# ------------------------------------------------------------------------------------------------------------
# Input pools: rotate through copies so that operands are not cache-hot
# ------------------------------------------------------------------------------------------------------------

def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors inside obj (tensors, modules' parameters, and dicts/lists/tuples of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0  # modules are expected to share storage with tensors already counted


class InputPool:
    """Copies of one case's inputs, handed out in turn by `next()`.

    `build` makes `copies = clamp(ceil(factor * cache / item_bytes), min_copies, max_copies)` items, so a
    full cycle touches more than `factor` x the cache (2x L2 by default), capped so the pool stays under
    `memory_fraction` of the free device memory.
    """

    def __init__(self, items: list[Any], item_bytes: int):
        self.items = items
        self.item_bytes = item_bytes
        self._cycle = itertools.cycle(items)

    def __len__(self) -> int:
        return len(self.items)

    def next(self) -> Any:
        return next(self._cycle)

    @property
    def first(self) -> Any:
        return self.items[0]

    @classmethod
    def build(cls, make_one: Callable[[], Any], device: torch.device, *, factor: float = 2.0, min_copies: int = 2,
              max_copies: int = 64, memory_fraction: float = 0.5) -> "InputPool":
        first = make_one()
        item_bytes = max(1, tensor_bytes(first))
        copies = min(max_copies, max(min_copies, math.ceil(factor * cache_bytes(device) / item_bytes)))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            copies = max(1, min(copies, int(memory_fraction * free / item_bytes) + 1))
        return cls([first] + [make_one() for _ in range(copies - 1)], item_bytes)

    def describe(self) -> dict:
        return {"copies": len(self), "item_bytes": self.item_bytes, "total_bytes": self.item_bytes * len(self)}


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# Measured peaks (the roofline)
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Peaks:
    """Measured in the run: matmul peak from torch.mm(n x n) (2n³ flops), bandwidth from dst.copy_(src)
    (2 x copy_bytes moved: read + write)."""
    dtype: str
    matmul_n: int
    matmul_ms: float
    matmul_tflops: float
    copy_bytes: int
    copy_ms: float
    bandwidth_gbps: float

    @property
    def ridge_flops_per_byte(self) -> float:
        return self.matmul_tflops * 1e12 / (self.bandwidth_gbps * 1e9)

    def to_dict(self) -> dict:
        return {**asdict(self), "ridge_flops_per_byte": self.ridge_flops_per_byte}


def measure_peaks(device: torch.device, dtype: torch.dtype, cfg: TimerConfig | None = None, *,
                  matmul_n: int | None = None, copy_bytes: int | None = None) -> Peaks:
    """Peak matmul throughput and memory bandwidth on `device`, timed like the benchmark rows.

    CUDA: one 8192³ matmul. CPU: square sizes 256, 512, ... up to 2048, stopping once one call takes over
    0.25 s (a bf16 matmul without hardware support runs at ~1 GFLOP/s); the peak is the best of them.
    """
    cuda = device.type == "cuda"
    sizes = [matmul_n] if matmul_n else ([8192] if cuda else [256, 512, 1024, 2048])
    best = None
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        probe_s = time.perf_counter() - start
        ms = time_ms(lambda: torch.mm(a, b), device, cfg)
        del a, b
        if best is None or n**3 / ms > best[0] ** 3 / best[1]:
            best = (n, ms)
        if not cuda and probe_s > 0.25:
            break
    n, mm_ms = best
    nbytes = copy_bytes or (2**30 if cuda else 2**28)
    src = torch.empty(nbytes, device=device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, cfg)
    del src, dst
    free_memory(device)
    return Peaks(dtype=dtype_name(dtype), matmul_n=n, matmul_ms=mm_ms, matmul_tflops=2.0 * n**3 / (mm_ms * 1e-3) / 1e12,
                 copy_bytes=nbytes, copy_ms=copy_ms, bandwidth_gbps=2.0 * nbytes / (copy_ms * 1e-3) / 1e9)


# ------------------------------------------------------------------------------------------------------------
# Rows and derived metrics
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One timing: a case (dict of sizes, e.g. shape/M/r), a mode, an implementation; metrics filled later.

    flops: useful floating-point operations of the op (not counting redundant work an implementation does);
    bytes: minimum memory traffic (each operand read once, each result written once).
    vs_base = ms / ms(base impl, same case and mode); vs_peer = ms(peer impl) / ms (> 1: faster than peer).
    """
    bench: str
    case: dict
    mode: str
    impl: str
    ms: float | None
    flops: float
    bytes: float
    tflops: float | None = None
    gbps: float | None = None
    roofline_pct: float | None = None
    bound: str | None = None
    vs_base: float | None = None
    vs_peer: float | None = None
    rel_err: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return tuple(sorted(self.case.items())) + (self.mode,)

    def flat(self) -> dict:
        """The row as one flat dict (case keys first): what the JSON holds and the table prints."""
        out = dict(self.case)
        for k, v in asdict(self).items():
            if k not in ("case", "extra"):
                out[k] = v
        out.update(self.extra)
        return out


def fill_metrics(rows: Sequence[Row], peaks: Peaks | None, *, base: str = "base", peer: str | None = "peft") -> None:
    """Compute TFLOP/s, GB/s, roofline % and bound, ratio to `base` and speed-up over `peer`, in place."""
    by_key = {(r.key(), r.impl): r for r in rows}
    for row in rows:
        if row.ms is None or row.ms <= 0:
            continue
        seconds = row.ms * 1e-3
        row.tflops = row.flops / seconds / 1e12
        row.gbps = row.bytes / seconds / 1e9
        if peaks is not None:
            t_compute = row.flops / (peaks.matmul_tflops * 1e12)
            t_memory = row.bytes / (peaks.bandwidth_gbps * 1e9)
            row.bound = "compute" if t_compute >= t_memory else "memory"
            row.roofline_pct = 100.0 * max(t_compute, t_memory) / seconds
        ref = by_key.get((row.key(), base))
        if ref is not None and ref.ms:
            row.vs_base = row.ms / ref.ms
        other = by_key.get((row.key(), peer)) if peer else None
        if other is not None and other.ms:
            row.vs_peer = other.ms / row.ms


# ------------------------------------------------------------------------------------------------------------
# Environment capture
# ------------------------------------------------------------------------------------------------------------

def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"kind": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count, "memory_bytes": props.total_memory,
                "l2_cache_bytes": getattr(props, "L2_cache_size", None), "index": device.index or 0}
    return {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cache_bytes": cache_bytes(device)}


def device_slug(device: torch.device) -> str:
    """File-name prefix: the GPU name ('nvidia-h100-80gb-hbm3'), or 'cpu-<model>' on CPU (git-ignored)."""
    if device.type == "cuda":
        slug = slugify(torch.cuda.get_device_name(device))
        return slug if not slug.startswith("cpu-") else "gpu-" + slug
    return "cpu-" + slugify(cpu_name())


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or the module's __version__ (for a source checkout), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(name), "__version__", None)
    except Exception:
        return None


def git_info(root: Path = REPO_ROOT) -> dict:
    """Commit of the checkout and whether it differs from it (changes outside benchmarks/results/ count)."""
    def git(*args):
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        return out.stdout if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    if commit is None:
        return {"commit": None, "dirty": None, "changes": []}
    changes = [line[3:] for line in (status or "").splitlines() if not line[3:].startswith("benchmarks/results/")]
    return {"commit": commit.strip(), "dirty": bool(changes), "changes": changes[:50]}


def environment(device: torch.device, argv: Sequence[str], *, packages: Iterable[str] = (
        "torch", "triton", "transformers", "peft", "fastpeft", "numpy", "matplotlib"), when: datetime | None = None
        ) -> dict:
    """Everything a result file needs to be reproduced: device, versions, git state, command line, date."""
    when = when or datetime.now(timezone.utc)
    versions = {name: package_version(name) for name in packages}
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    if device.type == "cuda" and "triton" in versions and versions["triton"] is None:
        versions["triton"] = package_version("pytorch-triton")
    return {
        "date": when.isoformat(timespec="seconds"),
        "command": shlex.join(["python", *argv]),
        "argv": list(argv),
        "executable": sys.executable,
        "device": device_info(device),
        "versions": versions,
        "git": git_info(),
        "platform": platform.platform(),
        "env_vars": {k: os.environ[k] for k in ("FASTPEFT_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                     if k in os.environ},
    }


# ------------------------------------------------------------------------------------------------------------
# Output: JSON, table, plot
# ------------------------------------------------------------------------------------------------------------

def result_path(out_dir: str | os.PathLike, device: torch.device, bench: str, when: datetime, suffix: str = ".json"
                ) -> Path:
    """<out_dir>/<device-slug>-<bench>-<YYYYMMDD-HHMMSS><suffix>."""
    return Path(out_dir) / f"{device_slug(device)}-{bench}-{when.strftime('%Y%m%d-%H%M%S')}{suffix}"


def _jsonable(obj):
    """Plain JSON values: non-finite floats become "nan"/"inf" strings (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json(path: Path, payload: dict) -> Path:
    """Write atomically (temp file, then rename), so an interrupted run leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


@dataclass
class Column:
    key: str
    header: str
    width: int
    fmt: str = ""  # format spec for numbers, e.g. ".3f"; '' -> str()

    def render(self, value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            text = "-"
        elif self.fmt and isinstance(value, (int, float)):
            text = format(value, self.fmt)
        else:
            text = str(value)
        return text.rjust(self.width)


class TablePrinter:
    """Fixed-width table printed row by row as results arrive (long runs show progress)."""

    def __init__(self, columns: Sequence[Column], stream=None):
        self.columns = list(columns)
        self.stream = stream or sys.stdout

    def header(self) -> None:
        line = " ".join(c.header.rjust(c.width) for c in self.columns)
        print(line, file=self.stream)
        print("-" * len(line), file=self.stream, flush=True)

    def row(self, values: dict) -> None:
        print(" ".join(c.render(values.get(c.key)) for c in self.columns), file=self.stream, flush=True)


def print_pivot(rows: Sequence[dict], *, row_keys: Sequence[str], col_key: str, value_key: str, title: str,
                fmt: str = ".2f", stream=None) -> None:
    """A compact summary: one line per distinct `row_keys` values, one column per `col_key` value."""
    stream = stream or sys.stdout
    cols = sorted({r[col_key] for r in rows})
    lines: dict[tuple, dict] = {}
    for r in rows:
        lines.setdefault(tuple(r[k] for k in row_keys), {})[r[col_key]] = r.get(value_key)
    label_w = max([len(" ".join(map(str, k))) for k in lines] + [len(" ".join(row_keys))])
    cell = Column("", "", max(7, *(len(str(c)) for c in cols)) if cols else 7, fmt)
    print(title, file=stream)
    print(" ".join(row_keys).ljust(label_w) + " " + " ".join(str(c).rjust(cell.width) for c in cols), file=stream)
    for k, values in lines.items():
        print(" ".join(map(str, k)).ljust(label_w) + " " + " ".join(cell.render(values.get(c)) for c in cols),
              file=stream)
    stream.flush()


def plot_ratio_to_base(rows: Sequence[dict], path: Path, *, title: str, panel_key: str = "shape", x_key: str = "M",
                       series_key: str = "impl", style_key: str | None = None, mode_key: str = "mode",
                       base: str = "base") -> Path | None:
    """Grid of panels (one row per mode, one column per `panel_key` value): ms / ms(base) against `x_key` (log x),
    one line per `series_key` value (colour) and `style_key` value (line style). Returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot skipped: matplotlib is not available ({exc})", flush=True)
        return None
    rows = [r for r in rows if r.get("vs_base") is not None and r[series_key] != base]
    if not rows:
        print("plot skipped: no rows with a ratio to the base op", flush=True)
        return None
    modes = list(dict.fromkeys(r[mode_key] for r in rows))
    panels = list(dict.fromkeys(r[panel_key] for r in rows))
    series = list(dict.fromkeys(r[series_key] for r in rows))
    styles = list(dict.fromkeys(r[style_key] for r in rows)) if style_key else [None]
    colors = {s: f"C{i}" for i, s in enumerate(series)}
    linestyles = dict(zip(styles, itertools.cycle(["-", "--", ":", "-."])))
    markers = dict(zip(styles, itertools.cycle(["o", "s", "^", "D"])))
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(4.6 * len(panels) + 0.4, 3.6 * len(modes)),
                             squeeze=False, sharex=True)
    for i, mode in enumerate(modes):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.axhline(1.0, color="0.4", lw=1, ls="--")
            for s, st in itertools.product(series, styles):
                pts = sorted((r[x_key], r["vs_base"]) for r in rows if r[mode_key] == mode and r[panel_key] == panel
                             and r[series_key] == s and (st is None or r[style_key] == st))
                if pts:
                    label = s if st is None else f"{s} {style_key}={st}"
                    ax.plot(*zip(*pts), color=colors[s], ls=linestyles[st], marker=markers[st], ms=3.5, lw=1.3,
                            label=label)
            ax.set_xscale("log", base=2)
            xs = sorted({r[x_key] for r in rows})
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in xs], rotation=45 if len(xs) > 5 else 0, fontsize=8)
            ax.minorticks_off()
            ymax = max((r["vs_base"] for r in rows if r[mode_key] == mode), default=1.0)
            if ymax > 6:
                ax.set_yscale("log")
            ax.set_title(f"{panel_key} {panel} - {mode}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("time / base time")
            if i == len(modes) - 1:
                ax.set_xlabel(x_key)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # every series, even those missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles.append(plt.Line2D([], [], color="0.4", lw=1, ls="--"))
    labels.append(f"{base} (= 1)")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(labels) / min(len(labels), 7))
    fig.tight_layout(rect=(0, 0.03 + 0.035 * legend_rows, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
