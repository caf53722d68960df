"""Devices and dtypes for the benchmarks: which device, its caches, what it is called, out-of-memory handling."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

DEFAULT_CACHE_BYTES = 50 * 2**20  # assumed last-level cache when the device does not report one

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


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


def failure_note(exc: BaseException, what: str = "") -> str:
    """A row's note for a call that raised: "OOM" or "error", `what` (e.g. " in the check"), the exception."""
    return ("OOM" if is_oom(exc) else "error") + f"{what}: {type(exc).__name__}: {str(exc)[:160]}"


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
