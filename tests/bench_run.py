"""Running a benchmark family end to end in a test: a tiny CPU case, a small roofline probe, the JSON it wrote."""
from __future__ import annotations

import json
import math
import shlex

from fastpeft.bench import driver, roofline

QUICK = ["--device", "cpu", "--quick", "--m", "1,8", "--no-plot", "--warmup-ms", "0", "--rep-ms", "1"]


def small_peaks(monkeypatch) -> None:
    """The default CPU roofline probe (2048^3 matmul, 256 MiB copy) takes seconds: probe small sizes instead."""
    monkeypatch.setattr(driver, "measure_peaks", lambda device, dtype, cfg: roofline.measure_peaks(
        device, dtype, cfg, matmul_n=128, copy_bytes=2**20))


def run_bench(bench, family: str, args: list[str], tmp_path, monkeypatch) -> dict:
    """bench.main(args) into tmp_path with a small roofline probe; the complete JSON result it wrote."""
    small_peaks(monkeypatch)
    argv = [*args, "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob(f"cpu-*-{family}-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["benchmark"] == family
    assert result["command"] == shlex.join(["python", "-m", "fastpeft", "bench", family, *argv])
    return result


def run_quick(bench, family: str, args: list[str], tmp_path, monkeypatch) -> dict:
    """An op-grid family on a tiny case (QUICK + args)."""
    return run_bench(bench, family, [*QUICK, *args], tmp_path, monkeypatch)


def assert_rows_timed_and_checked(rows: dict, peer: str = "vs_peer") -> None:
    """Every row: finite time, small error against float64, no note, ratios and roofline filled in."""
    for key, row in rows.items():
        assert math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["rel_err"] < 1e-5 and not row["note"], (key, row["rel_err"], row["note"])
        assert row["vs_base"] > 0 and row[peer] > 0 and row["roofline_pct"] > 0, key
