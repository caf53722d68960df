"""fastpeft bench ia3 end to end on a tiny CPU case: every impl, mode and IA3 mode timed, checked and written."""

from fastpeft.bench import ia3 as bench
from fastpeft.bench.grid import MODES
from fastpeft.cli import bench_families
from tests.bench_run import assert_rows_timed_and_checked, run_quick

K, N = 64, 96


def test_ia3_bench_writes_every_row(tmp_path, monkeypatch):
    result = run_quick(bench, "ia3", ["--shapes", f"{K}x{N}"], tmp_path, monkeypatch)
    rows = {(r["impl"], r["mode"], r["ia3"], r["M"]): r for r in result["rows"]}
    expected = {(i, m, a, M) for i in bench.IMPLS for m in MODES for a in bench.IA3_MODES for M in (1, 8)}
    assert set(rows) == expected
    assert_rows_timed_and_checked(rows)
    # the cost model: IA3 adds M*S multiplies to the forward GEMM (S = N for "out", K for "in")
    assert rows["base", "fwd", "out", 8]["flops"] == 2 * 8 * N * K
    assert rows["fastpeft", "fwd", "out", 8]["flops"] == 2 * 8 * N * K + 8 * N
    assert rows["peft", "fwd", "in", 8]["flops"] == 2 * 8 * N * K + 8 * K


def test_ia3_is_a_bench_family():
    assert "ia3" in bench_families()
