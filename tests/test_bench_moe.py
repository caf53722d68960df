"""fastpeft bench moe end to end on tiny experts layers (Mixtral- and Qwen3-MoE-shaped) on the CPU: the base experts
module, fastpeft's LoRAExperts and PEFT's target_parameters on shared weights, forward and forward+backward, each
timed, fastpeft checked against PEFT (output, dX, every A and B gradient); no timing assertions."""

import math

import pytest

from fastpeft.bench import moe as bench
from tests.bench_run import run_bench

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

ARGS = ["--device", "cpu", "--quick", "--no-plot", "--warmup-ms", "0", "--rep-ms", "1"]


def test_moe_bench_writes_every_implementation(tmp_path, monkeypatch):
    result = run_bench(bench, "moe", ARGS, tmp_path, monkeypatch)
    assert result["notes"] == [] and result["config"]["preset"] == "quick"
    assert set(result["config"]["layers"]) == {"mixtral", "qwen3_moe"}
    rows = {(r["layer"], r["mode"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(layer, mode, impl) for layer in ("mixtral", "qwen3_moe") for mode in ("fwd", "fwd+bwd")
                         for impl in bench.IMPLS}
    for key, row in rows.items():
        layer, mode, impl = key
        assert not row["note"], (key, row["note"])
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["flops"] > 0 and row["bytes"] > 0, key
        assert row["vs_base"] > 0 and row["vs_peer"] > 0, key
        if impl == "fastpeft":
            assert row["rel_err"] < 1e-5, key  # PEFT's output and gradients (float32)
            assert row["flops"] > rows[(layer, mode, "base")]["flops"], key


def test_moe_bench_one_layer_forward_only(tmp_path, monkeypatch):
    result = run_bench(bench, "moe", [*ARGS, "--layers", "mixtral", "--modes", "fwd", "--tokens", "5", "--rank", "2"],
                       tmp_path, monkeypatch)
    assert result["config"]["tokens"] == 5 and result["config"]["rank"] == 2
    assert {(r["layer"], r["mode"]) for r in result["rows"]} == {("mixtral", "fwd")}
