"""The GPU test tier: `pytest -m gpu -q` on the test files that carry the `gpu` marker, in a subprocess (every
kernel against its float64 reference on CUDA tensors, the CUDA C++ extension built and tested), with its counts
and wall time; killed at the plan's cap (the cut recorded). A failure is recorded and the run goes on.

On the GPU the files run in FIRST's order (the C++ extension first: its build is the cache the multi-adapter
section loads), then the others with the marker; in the dry run only the first two (their tests skip on the CPU).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ..results import PACKAGE_PARENT

FIRST = ("tests/ops/test_cuda_ext_gpu.py", "tests/ops/test_lora_cuda.py", "tests/ops/test_multi_adapter_cuda.py")
MARKER = re.compile(r"^\s*(?:pytestmark\s*=.*\bpytest\.mark\.gpu\b|@pytest\.mark\.gpu\b)", re.MULTILINE)
OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
TAIL_CHARS = 4000
PLUGIN = "fastpeft.bench.gpu_check.tier_plugin"  # autotune in the tier: two configs per key, timed briefly


def gpu_test_files(root: Path = PACKAGE_PARENT) -> list[str]:
    """The test files (relative to root) that mark tests `gpu`, FIRST's order first."""
    tests = root / "tests"
    found = sorted(str(p.relative_to(root)) for p in tests.rglob("test_*.py") if MARKER.search(p.read_text()))
    return [f for f in FIRST if f in found] + [f for f in found if f not in FIRST]


def run_tier(files: list[str], cap_s: float, log_path: Path, root: Path = PACKAGE_PARENT) -> dict:
    """Run pytest on `files` (cwd = root), at most cap_s seconds; its log to log_path. The result for the JSON."""
    if not files:
        return {"ran": False, "why": f"no test file under {root / 'tests'} has the gpu marker"}
    with tempfile.TemporaryDirectory(prefix="fastpeft-gpu-tier-") as tmp:
        xml = Path(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", PLUGIN,
                   "-rfE", f"--junitxml={xml}", *files]
        print(f"GPU test tier: {' '.join(command[1:])} (at most {cap_s:.0f} s)", flush=True)
        start = time.monotonic()
        timed_out = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                returncode = proc.wait(timeout=max(1.0, cap_s))
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = _stop(proc)
        wall = time.monotonic() - start
        output = log_path.read_text(errors="replace")
        if xml.exists():
            counts, failures = _junit(xml)
        else:  # cut at the cap (no summary yet), or pytest did not start
            counts, failures = (_progress(output) if timed_out else _summary_line(output)), []
    result = {"ran": True, "command": ["python", *command[1:]], "files": files, "returncode": returncode,
              "timed_out": timed_out, "cap_s": cap_s, "wall_s": round(wall, 1), **counts, "failures": failures,
              "log": log_path.name, "output_tail": output[-TAIL_CHARS:]}
    result["ok"] = returncode == 0 and not timed_out
    print(f"GPU test tier: {describe(result)}", flush=True)
    return result


def describe(result: dict) -> str:
    """One line: the counts, the wall time, and a timeout or error if there was one."""
    if not result.get("ran"):
        return f"not run: {result.get('why', '')}"
    counts = ", ".join(f"{result.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
    extra = " (cut at the cap: counts so far)" if result["timed_out"] else (
        "" if result["returncode"] in (0, 5) else f" (pytest exit status {result['returncode']})")
    return f"{counts} in {result['wall_s']:.0f} s{extra}"


def _stop(proc: subprocess.Popen) -> int:
    """Terminate the pytest process group (its compilers included), then kill what is left."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def _junit(path: Path) -> tuple[dict, list[dict]]:
    """(counts, failed tests with their first message line) from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                 "message": message[0][:300] if message else ""})
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"],
            "skipped": total["skipped"]}, failures


def _progress(output: str) -> dict:
    """Counts from -q's progress characters (a run cut before its summary): . passed, F failed, E error, s skip."""
    marks = "".join(m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?\s*$", output, re.MULTILINE))
    return {"passed": marks.count("."), "failed": marks.count("F"), "errors": marks.count("E"),
            "skipped": marks.count("s")}


def _summary_line(output: str) -> dict:
    """Counts from pytest's last line ("3 passed, 1 skipped in 2.0s")."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for number, kind in OUTCOME.findall(output.strip().splitlines()[-1] if output.strip() else ""):
        key = "errors" if kind.startswith("error") else kind
        if key in counts:
            counts[key] = int(number)
    return counts
