"""fastpeft bench cpu end to end on a tiny Llama: every method fastpeft shares with PEFT, trained and run, fastpeft
and PEFT timed in alternating runs, the pairs checked to compute the same function, the JSON and the table written
(no timing assertions)."""

import math

import pytest
import torch

from fastpeft.bench import cpu as bench
from tests.bench_run import run_bench

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

REPS = 2
ARGS = ["--quick", "--threads", "1", "--reps", str(REPS), "--hidden", "32", "--heads", "2", "--layers", "2",
        "--intermediate", "48", "--vocab", "64", "--seq", "8", "--batch", "2", "--no-plot"]


def test_cpu_bench_writes_every_method(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    result = run_bench(bench, "cpu", ARGS, tmp_path, monkeypatch)
    assert torch.get_num_threads() == threads  # the run's thread count is restored
    config = result["config"]
    assert (config["hidden"], config["layers"], config["seq"], config["batch"], config["reps"]) == (32, 2, 8, 2, REPS)
    assert config["threads"] == 1 and config["clock"] == "wall" and config["dtype"] == "fp32"
    assert config["methods"] == list(bench.METHODS) and config["modes"] == ["train", "infer"]
    assert result["device"]["kind"] == "cpu" and result["versions"]["peft"] and result["notes"] == []
    rows = {(r["method"], r["mode"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(m, mode, i) for m in bench.METHODS for mode in ("train", "infer") for i in bench.IMPLS}
    for key, row in rows.items():
        method, mode, impl = key
        assert not row["note"], (key, row["note"])
        assert len(row["times_ms"]) == REPS and all(t > 0 for t in row["times_ms"]), key
        assert math.isfinite(row["ms"]) and 0 < row["min_ms"] <= row["ms"], key
        assert row["rel_err"] < 1e-5, key  # the same function: logits of fastpeft against PEFT
        if method != "lora_dropout":
            assert row["loss_err"] < 1e-5, key
        else:
            assert row["loss_err"] is None, key
        other = rows[(method, mode, "peft" if impl == "fastpeft" else "fastpeft")]
        assert row["trainable_params"] == other["trainable_params"] > 0, key
        assert row["vs_peer"] == row["ratio"] > 0 and (impl != "peft" or row["vs_peer"] == 1.0), key
        assert row["threads"] == 1 and row["tokens"] == 16, key
    assert result["summary"] == {m: {mode: rows[(m, mode, "fastpeft")]["vs_peer"] for mode in ("train", "infer")}
                                 for m in bench.METHODS}
    for row in rows.values():
        assert row["paired_lo"] <= row["paired_ratio"] <= row["paired_hi"]
    verdict = result["verdict"]
    assert sorted(sum(verdict.values(), [])) == sorted(f"{m} {mode}" for m in bench.METHODS for mode in ("train", "infer"))
    out = capsys.readouterr().out
    assert "PEFT / fastpeft, median time" in out and "worst: " in out and "beyond noise" in out


def test_cpu_bench_subset_and_cpu_clock(tmp_path, monkeypatch):
    args = [*ARGS, "--methods", "lora,prefix", "--modes", "infer", "--clock", "cpu"]
    result = run_bench(bench, "cpu", args, tmp_path, monkeypatch)
    assert result["config"]["clock"] == "cpu" and result["config"]["modes"] == ["infer"]
    assert {(r["method"], r["mode"]) for r in result["rows"]} == {("lora", "infer"), ("prefix", "infer")}
    assert set(result["summary"]) == {"lora", "prefix"}


def test_cpu_bench_defaults_to_the_cpu_and_the_full_preset():
    args = bench.driver.parse_args(bench.FAMILY, [])
    assert args.device == "cpu" and args.quick is False and args.threads == 2 and args.clock == "wall"
    with pytest.raises(SystemExit):
        bench.driver.parse_args(bench.FAMILY, ["--methods", "loha"])


def test_median_interval_is_the_binomial_order_statistics():
    assert bench.median_interval([]) == (None, None)
    assert bench.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95 %: the range
    values = [float(v) for v in range(1, 12)]  # n = 11: P(B <= 1) = 0.6 % <= 2.5 % < P(B <= 2) = 3.3 %
    assert bench.median_interval(values) == (2.0, 10.0)
    assert bench.median_interval([float(v) for v in range(1, 21)]) == (6.0, 15.0)  # n = 20: k = 6


def test_cpu_is_a_bench_family():
    from fastpeft.bench import FAMILIES, load

    assert FAMILIES["cpu"] == "cpu" and load("cpu") is bench
