"""fastpeft bench bottleneck end to end on a tiny CPU case: every impl, mode and reduction factor timed, checked and
written."""

import pytest

from fastpeft.bench import bottleneck as bench
from fastpeft.bench.grid import MODES
from fastpeft.cli import bench_families
from tests.bench_run import assert_rows_timed_and_checked, run_quick

D = 64
RFS = (4, 16)


def test_bottleneck_bench_writes_every_row(tmp_path, monkeypatch):
    result = run_quick(bench, "bottleneck", ["--shapes", f"{D}x{D}", "--reduction-factors", "4,16"],
                        tmp_path, monkeypatch)
    assert result["config"]["reduction_factors"] == list(RFS)
    rows = {(r["impl"], r["mode"], r["rf"], r["M"]): r for r in result["rows"]}
    expected = {(i, m, rf, M) for i in bench.IMPLS for m in MODES for rf in RFS for M in (1, 8)}
    assert set(rows) == expected
    assert_rows_timed_and_checked(rows, peer="vs_torch")
    for key, row in rows.items():
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
