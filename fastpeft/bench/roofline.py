"""The roofline and the derived metrics of a timing.

`measure_peaks`: a large square `torch.mm` (2n³ flops) and a large device-to-device copy (2 x bytes: read +
write), both timed like everything else, in the benchmark dtype. `Row` + `fill_metrics`: TFLOP/s, GB/s, ratio to
the base op, speed-up over a peer, and % of the roofline bound that applies:

for a row with F flops and B bytes of minimum traffic measured at t seconds, the bound is
    t_bound = max(F / peak_flops, B / peak_bandwidth)
("compute" when the first term is larger, i.e. arithmetic intensity F/B above the ridge point
peak_flops/peak_bandwidth, else "memory"), and % of roofline = 100 * t_bound / t.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .devices import dtype_name, free_memory, synchronize
from .timing import TimerConfig, time_ms


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
