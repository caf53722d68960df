"""fastpeft bench adalora end to end on a tiny CPU case: every impl and mode timed, checked and written."""

from fastpeft.bench import adalora as bench
from fastpeft.bench.grid import MODES
from fastpeft.cli import bench_families
from tests.bench_run import assert_rows_timed_and_checked, run_quick

K, N, R = 64, 96, 4


def test_adalora_bench_writes_every_row(tmp_path, monkeypatch):
    result = run_quick(bench, "adalora", ["--shapes", f"{K}x{N}", "--ranks", str(R)], tmp_path, monkeypatch)
    rows = {(r["impl"], r["mode"], r["M"]): r for r in result["rows"]}
    assert set(rows) == {(i, m, M) for i in bench.IMPLS for m in MODES for M in (1, 8)}
    assert_rows_timed_and_checked(rows)
    # the cost model: AdaLoRA = LoRA + the per-rank scale (Mr; 4Mr with the backward's scaling and dE)
    M = 8
    lora_fwd = 2 * M * N * K + 2 * M * K * R + 2 * M * N * R
    lora_bwd = 2 * M * N * K + 4 * M * K * R + 4 * M * N * R
    assert rows["base", "fwd", M]["flops"] == 2 * M * N * K
    assert rows["fastpeft", "fwd", M]["flops"] == rows["peft", "fwd", M]["flops"] == lora_fwd + M * R
    assert rows["torch", "fwd+bwd", M]["flops"] == lora_fwd + lora_bwd + 4 * M * R
    assert rows["fastpeft", "fwd", M]["bytes"] == 4 * (M * K + N * K + M * N + R * K + N * R + R)


def test_adalora_is_a_bench_family():
    assert "adalora" in bench_families()
