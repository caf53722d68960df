"""benchmarks/dora.py end to end on a tiny CPU case: every impl and mode timed, checked and written."""
import json
import math

import benchmarks._driver as driver
import benchmarks.common as common
import benchmarks.dora as bench
from fastpeft.cli import bench_families

K, N, R = 64, 96, 4


def test_dora_bench_writes_every_row(tmp_path, monkeypatch):
    # the roofline probe on small sizes: the default CPU one (2048^3 matmul, 256 MiB copy) takes seconds
    monkeypatch.setattr(driver, "measure_peaks", lambda device, dtype, cfg: common.measure_peaks(
        device, dtype, cfg, matmul_n=128, copy_bytes=2**20))
    argv = ["--device", "cpu", "--quick", "--shapes", f"{K}x{N}", "--m", "1,8", "--ranks", str(R), "--no-plot",
            "--out", str(tmp_path), "--warmup-ms", "0", "--rep-ms", "1"]
    assert bench.main(argv) == 0

    (path,) = tmp_path.glob("cpu-*-dora-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["benchmark"] == "dora" and result["command"].endswith(" ".join(argv))
    rows = {(r["impl"], r["mode"], r["M"]): r for r in result["rows"]}
    assert set(rows) == {(i, m, M) for i in bench.IMPLS for m in driver.MODES for M in (1, 8)}
    for key, row in rows.items():
        assert math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["rel_err"] < 1e-5 and not row["note"], (key, row["rel_err"], row["note"])
        assert row["vs_base"] > 0 and row["vs_peer"] > 0 and row["vs_lora"] > 0 and row["roofline_pct"] > 0, key
    # the cost model: DoRA = LoRA + the column scale (MN; 4MN with the backward) + the norm (W Aᵀ, A Aᵀ, O(Nr²))
    M = 8
    lora_fwd = 2 * M * N * K + 2 * M * K * R + 2 * M * N * R
    norm = 2 * N * K * R + 2 * K * R * R + 2 * N * R * R + 5 * N * R
    assert rows["base", "fwd", M]["flops"] == 2 * M * N * K
    assert rows["lora", "fwd", M]["flops"] == lora_fwd
    assert rows["fastpeft", "fwd", M]["flops"] == rows["peft", "fwd", M]["flops"] == lora_fwd + M * N + norm
    assert rows["torch", "fwd+bwd", M]["flops"] == rows["lora", "fwd+bwd", M]["flops"] + 4 * M * N + norm
    assert rows["fastpeft", "fwd", M]["bytes"] == rows["lora", "fwd", M]["bytes"] + 8 * N


def test_dora_is_a_bench_family():
    assert "dora" in bench_families()
