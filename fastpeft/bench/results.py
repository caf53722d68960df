"""Result files: the environment a run records (device, versions, git state, command line, date), where its JSON
goes, and writing it.

A run writes <out>/<device-slug>-<bench>-<YYYYMMDD-HHMMSS>.json, --out defaulting to benchmarks/results under the
current directory (a source checkout's benchmarks/results/ when run from its root: GPU results are committed
there, CPU ones (cpu-*) and plots are git-ignored).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from .devices import device_info, device_slug

RESULTS_DIR = Path("benchmarks", "results")  # relative: under the current directory, wherever fastpeft is installed
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the directory holding fastpeft/: a checkout, or site-packages


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


def git_info(root: Path = PACKAGE_PARENT) -> dict:
    """Commit of the source checkout fastpeft runs from and whether the tree differs from it (changes outside
    benchmarks/results/ count); all None when fastpeft is not run from a checkout (installed from a wheel)."""
    def git(*args):
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        return out.stdout if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        in_checkout = top is not None and Path(top.strip()).resolve() == root.resolve()
        commit = git("rev-parse", "HEAD") if in_checkout else None
        status = git("status", "--porcelain") if commit else None
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
