"""fastpeft bench phm end to end on a tiny CPU case: every impl, mode and phm_dim timed, checked and written."""

import pytest

from fastpeft.bench import phm as bench
from fastpeft.bench.grid import MODES
from fastpeft.cli import bench_families
from tests.bench_run import assert_rows_timed_and_checked, run_quick

K, N = 64, 32
DIMS = (2, 4)


def test_phm_bench_writes_every_row(tmp_path, monkeypatch):
    result = run_quick(bench, "phm", ["--shapes", f"{K}x{N}", "--phm-dims", "2,4"], tmp_path, monkeypatch)
    assert result["config"]["phm_dims"] == list(DIMS) and result["config"]["phm_rank"] == 1
    rows = {(r["impl"], r["mode"], r["n"], r["M"]): r for r in result["rows"]}
    expected = {(i, m, n, M) for i in bench.IMPLS for m in MODES for n in DIMS for M in (1, 8)}
    assert set(rows) == expected
    assert_rows_timed_and_checked(rows, peer="vs_torch")
    for key, row in rows.items():
        assert row["vs_peer"] is None, key  # no peft impl: PEFT has no PHM layers
    # the cost model (k = 1): base is the dense GEMM; the op never touches in x out; the eager way forms H
    M, n = 8, 4
    assert rows["base", "fwd", n, M]["flops"] == 2 * M * K * N
    assert rows["base", "fwd", n, M]["bytes"] == 4 * (M * K + K * N + M * N)
    assert rows["fastpeft", "fwd", n, M]["flops"] == 2 * M * n * (K + N) + 2 * M * n**3 + M * N
    assert rows["fastpeft", "fwd", n, M]["bytes"] == 4 * (M * K + n**3 + K + 2 * N + M * N)
    assert rows["torch", "fwd", n, M]["flops"] == 2 * K * N // n + 2 * n * K * N + 2 * M * K * N + M * N


def test_phm_rejects_indivisible_shapes():
    with pytest.raises(SystemExit, match="must divide"):
        bench.run_case(None, 64, 30, 1, 4)


def test_phm_is_a_bench_family():
    assert "phm" in bench_families()
