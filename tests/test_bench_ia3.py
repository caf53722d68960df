"""benchmarks/ia3.py end to end on a tiny CPU case: every impl, mode and IA3 mode timed, checked and written."""
import json
import math

import benchmarks._driver as driver
import benchmarks.common as common
import benchmarks.ia3 as bench
from fastpeft.cli import bench_families

K, N = 64, 96


def test_ia3_bench_writes_every_row(tmp_path, monkeypatch):
    # the roofline probe on small sizes: the default CPU one (2048^3 matmul, 256 MiB copy) takes seconds
    monkeypatch.setattr(driver, "measure_peaks", lambda device, dtype, cfg: common.measure_peaks(
        device, dtype, cfg, matmul_n=128, copy_bytes=2**20))
    argv = ["--device", "cpu", "--quick", "--shapes", f"{K}x{N}", "--m", "1,8", "--no-plot", "--out", str(tmp_path),
            "--warmup-ms", "0", "--rep-ms", "1"]
    assert bench.main(argv) == 0

    (path,) = tmp_path.glob("cpu-*-ia3-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["benchmark"] == "ia3" and result["command"].endswith(" ".join(argv))
    rows = {(r["impl"], r["mode"], r["ia3"], r["M"]): r for r in result["rows"]}
    expected = {(i, m, a, M) for i in bench.IMPLS for m in driver.MODES for a in bench.IA3_MODES for M in (1, 8)}
    assert set(rows) == expected
    for key, row in rows.items():
        assert math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["rel_err"] < 1e-5 and not row["note"], (key, row["rel_err"], row["note"])
        assert row["vs_base"] > 0 and row["vs_peer"] > 0 and row["roofline_pct"] > 0, key
    # the cost model: IA3 adds M*S multiplies to the forward GEMM (S = N for "out", K for "in")
    assert rows["base", "fwd", "out", 8]["flops"] == 2 * 8 * N * K
    assert rows["fastpeft", "fwd", "out", 8]["flops"] == 2 * 8 * N * K + 8 * N
    assert rows["peft", "fwd", "in", 8]["flops"] == 2 * 8 * N * K + 8 * K


def test_ia3_is_a_bench_family():
    assert "ia3" in bench_families()
