"""Which GPU strategy a linear op runs: the committed table of measurements, per (device, dtype, op, rows).

Two strategies compute every adapted linear layer on CUDA:
- "fused": the whole layer in one Triton GEMM (base product, low-rank term, scales and bias in its epilogue);
- "cublas": the base product on cuBLAS (torch.mm/addmm), then the adapter's terms in one small Triton kernel that
  reads X once for the shrink and updates Y in place (fastpeft/kernels/lora_update.py).
`make gpu-check` times both on the GPU at hand and writes its choice per row bucket to fastpeft/data/strategies.json
(keyed by torch.cuda.get_device_name). A device, dtype or op with no entry runs "cublas": the base product is then
never slower than PyTorch's, and the adapter's terms move fewer bytes than PEFT's separate kernels.
`use_kernel_options(linear_strategy=...)` pins one.
On a 4-bit base (op "lora_linear_4bit", fastpeft/ops/lora_4bit.py) "fused" reads the packed weight inside the GEMM and
"cublas" dequantizes it to a 16-bit copy first; without an entry, decode-sized calls run "fused" (the copy alone
moves 4.5 bytes per weight, the fused kernel 0.5) and larger ones "cublas".
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from . import dispatch

STRATEGIES = ("fused", "cublas")
DEFAULT = "cublas"
ROW_BUCKETS = (1, 16, 256, 4096, 16384)  # the row counts gpu-check times; an entry covers M up to its bucket
TABLE = Path(__file__).resolve().parents[1] / "data" / "strategies.json"
DEFAULTS = {"lora_linear_4bit": {1: "fused", 16: "fused"}}  # per op and row bucket; DEFAULT elsewhere


def row_bucket(m: int) -> int:
    """The smallest timed row count at least m (the largest beyond them)."""
    return next((b for b in ROW_BUCKETS if m <= b), ROW_BUCKETS[-1])


@lru_cache(maxsize=1)
def load_table(path: Path = TABLE) -> dict:
    """{device name: {dtype: {op: {row bucket (str): strategy}}}} as committed (empty when the file is absent)."""
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("devices", {})


@lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The table's key for a device: torch.cuda.get_device_name on CUDA, else the device type."""
    if device.type != "cuda":
        return device.type
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def choose_strategy(op: str, device: torch.device, dtype: torch.dtype, m: int) -> tuple[str, str]:
    """(strategy, why) for `op` (one of LINEAR_OPS) on `m` rows."""
    pinned = dispatch.kernel_options().linear_strategy
    if pinned is not None:
        return pinned, "pinned by use_kernel_options(linear_strategy=...)"
    name, dt, bucket = device_name(device), str(dtype).removeprefix("torch."), row_bucket(m)
    entry = load_table().get(name, {}).get(dt, {}).get(op, {}).get(str(bucket))
    if entry in STRATEGIES:
        return entry, f"strategies.json: {name}, {dt}, {op}, M <= {bucket}"
    return (DEFAULTS.get(op, {}).get(bucket, DEFAULT),
            f"default: strategies.json has no entry for {name}, {dt}, {op}, M <= {bucket}")


LINEAR_OPS = ("lora_linear", "dora_linear", "ia3_linear", "lora_linear_4bit")


def describe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Lines for `fastpeft info`: each linear op's strategy per row bucket on `device`, and where it came from."""
    from ..kernels.limits import UPDATE_MAX_RANK
    from ._common import TINY_M

    lines = [f"table: {TABLE.name} ({len(load_table())} device(s) measured); this device: {device_name(device)}, "
             f"{str(dtype).removeprefix('torch.')}",
             f"inputs of at most {TINY_M} rows run the reference (cuBLAS) unless a backend is forced"]
    for op in LINEAR_OPS:
        choices = [(bucket, *choose_strategy(op, device, dtype, bucket)) for bucket in ROW_BUCKETS]
        lines.append(f"{op}: " + ", ".join(f"M<={b} {c}" for b, c, _ in choices))
        for why in dict.fromkeys(why.split(", M <= ")[0] for _, _, why in choices):  # one line per source
            lines.append(f"    {why}")
        if op != "ia3_linear":
            lines.append(f"    ranks above {UPDATE_MAX_RANK} run fused (the adapter kernel holds S in registers)")
    return lines


def strategy(op: str, x: torch.Tensor) -> str:
    """The strategy for an op's 2-D input x (what the op's Triton path runs)."""
    return choose_strategy(op, x.device, x.dtype, x.shape[0])[0]


def record(table: dict, device: str, dtype: str, op: str, choices: dict[int, str]) -> dict:
    """`table` with the choices for (device, dtype, op) per row bucket set: what gpu-check writes."""
    for bucket, choice in choices.items():
        if bucket not in ROW_BUCKETS or choice not in STRATEGIES:
            raise ValueError(f"strategy table: {bucket} -> {choice!r} is not a (row bucket, strategy) pair; buckets "
                             f"{ROW_BUCKETS}, strategies {STRATEGIES}")
        table.setdefault(device, {}).setdefault(dtype, {}).setdefault(op, {})[str(bucket)] = choice
    return table


def write_table(devices: dict, path: Path = TABLE, source: str = "") -> None:
    """Writes the table (with a line saying where its figures came from) and drops the cached copy."""
    path.write_text(json.dumps({"source": source, "devices": devices}, indent=1, sort_keys=True) + "\n")
    load_table.cache_clear()
