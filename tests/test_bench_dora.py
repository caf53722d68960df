"""fastpeft bench dora end to end on a tiny CPU case: every impl and mode timed, checked and written."""

from fastpeft.bench import dora as bench
from fastpeft.bench.grid import MODES
from fastpeft.cli import bench_families
from tests.bench_run import assert_rows_timed_and_checked, run_quick

K, N, R = 64, 96, 4


def test_dora_bench_writes_every_row(tmp_path, monkeypatch):
    result = run_quick(bench, "dora", ["--shapes", f"{K}x{N}", "--ranks", str(R)], tmp_path, monkeypatch)
    rows = {(r["impl"], r["mode"], r["M"]): r for r in result["rows"]}
    assert set(rows) == {(i, m, M) for i in bench.IMPLS for m in MODES for M in (1, 8)}
    assert_rows_timed_and_checked(rows)
    assert all(row["vs_lora"] > 0 for row in rows.values())
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
