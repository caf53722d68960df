"""benchmarks/bottleneck.py end to end on a tiny CPU case: every impl, mode and reduction factor timed, checked and
written."""
import json
import math

import pytest

import benchmarks._driver as driver
import benchmarks.bottleneck as bench
import benchmarks.common as common
from fastpeft.cli import bench_families

D = 64
RFS = (4, 16)


def test_bottleneck_bench_writes_every_row(tmp_path, monkeypatch):
    # the roofline probe on small sizes: the default CPU one (2048^3 matmul, 256 MiB copy) takes seconds
    monkeypatch.setattr(driver, "measure_peaks", lambda device, dtype, cfg: common.measure_peaks(
        device, dtype, cfg, matmul_n=128, copy_bytes=2**20))
    argv = ["--device", "cpu", "--quick", "--shapes", f"{D}x{D}", "--m", "1,8", "--reduction-factors", "4,16",
            "--no-plot", "--out", str(tmp_path), "--warmup-ms", "0", "--rep-ms", "1"]
    assert bench.main(argv) == 0

    (path,) = tmp_path.glob("cpu-*-bottleneck-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["benchmark"] == "bottleneck" and result["command"].endswith(" ".join(argv))
    assert result["config"]["reduction_factors"] == list(RFS)
    rows = {(r["impl"], r["mode"], r["rf"], r["M"]): r for r in result["rows"]}
    expected = {(i, m, rf, M) for i in bench.IMPLS for m in driver.MODES for rf in RFS for M in (1, 8)}
    assert set(rows) == expected
    for key, row in rows.items():
        assert math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["rel_err"] < 1e-5 and not row["note"], (key, row["rel_err"], row["note"])
        assert row["vs_base"] > 0 and row["vs_torch"] > 0 and row["roofline_pct"] > 0, key
        assert row["vs_peer"] is None, key  # no peft impl: PEFT has no bottleneck adapters
    # the cost model: m = d // rf; the base copy does no flops and moves x then y (fwd), plus dY and dx (fwd+bwd)
    m = D // 4
    assert rows["base", "fwd", 4, 8]["flops"] == 0 and rows["base", "fwd", 4, 8]["bytes"] == 4 * 2 * 8 * D
    assert rows["base", "fwd+bwd", 4, 8]["bytes"] == 4 * 4 * 8 * D
    assert rows["fastpeft", "fwd", 4, 8]["flops"] == 4 * 8 * D * m + 2 * 8 * m + 3 * 8 * D
    assert rows["torch", "fwd", 4, 8]["bytes"] == 4 * (3 * 8 * D + 2 * D * m + m + D)


def test_bottleneck_rejects_non_square_shapes():
    with pytest.raises(SystemExit, match="hidden size"):
        bench.run_case(None, 64, 96, 1, 4)


def test_bottleneck_is_a_bench_family():
    assert "bottleneck" in bench_families()
