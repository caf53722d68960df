"""fastpeft bench prefix end to end on tiny CPU cases: every impl, mode, L and P timed, checked and written,
with the ratio to the floor and the (L + P) / L target on every row; the model section (one prefix-tuning step of a
tiny Llama: floor, fastpeft, PEFT) likewise (no timing assertions)."""

import math

import pytest

from fastpeft.bench import prefix_attention as bench
from fastpeft.bench.prefix_attention import op, step
from fastpeft.cli import bench_families
from tests.bench_run import run_bench

LENGTHS = (16, 64)
PREFIXES = (3, 10)
ARGS = ["--device", "cpu", "--quick", "--lengths", "16,64", "--prefix-lengths", "3,10", "--tokens", "64",
        "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--no-plot", "--warmup-ms", "0", "--rep-ms", "1",
        "--modes", "fwd,fwdbwd,decode"]
MODEL_ARGS = ["--device", "cpu", "--quick", "--modes", "step", "--model-lengths", "16,32", "--model-prefix-lengths",
              "4", "--model-tokens", "32", "--no-plot", "--warmup-ms", "0", "--rep-ms", "1"]


def run_quick(tmp_path, monkeypatch, args=ARGS) -> dict:
    """bench.main on the tiny cases into tmp_path (a small roofline probe); the complete JSON it wrote."""
    return run_bench(bench, "prefix_attention", args, tmp_path, monkeypatch)


def test_prefix_bench_writes_every_row(tmp_path, monkeypatch):
    result = run_quick(tmp_path, monkeypatch)
    config = result["config"]
    assert config["lengths"] == list(LENGTHS) and config["prefix_lengths"] == list(PREFIXES)
    assert config["heads"] == 4 and config["kv_heads"] == 2 and config["head_dim"] == 64 and config["dtype"] == "fp32"
    assert {"name", "kind"} <= set(result["device"]) and result["versions"]["torch"] and result["date"]
    assert result["peaks"]["matmul_tflops"] > 0 and result["peaks"]["bandwidth_gbps"] > 0
    rows = {(r["impl"], r["mode"], r["L"], r["P"]): r for r in result["rows"]}
    assert set(rows) == {(i, m, L, P) for i in op.IMPLS for m in op.MODES for L in LENGTHS for P in PREFIXES}
    for key, row in rows.items():
        impl, mode, L, P = key
        assert math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["rel_err"] < 1e-5 and not row["note"], (key, row["rel_err"], row["note"])
        assert row["roofline_pct"] > 0 and row["bound"] in ("compute", "memory"), key
        assert row["B"] == 64 // L and row["Lq"] == (1 if mode == "decode" else L), key
        assert row["target_ratio"] == (L + P) / L, key
        assert row["ratio_to_floor"] == row["vs_base"] > 0 and row["vs_peer"] > 0, key
        if impl == "floor":
            assert row["vs_base"] == 1.0 and row["meets_target"] is None, key
        else:
            assert row["meets_target"] == (row["vs_base"] <= row["target_ratio"]), key
    for mode in op.TARGET_MODES:
        assert result["summary"][mode]["cases"] == len(LENGTHS) * len(PREFIXES)


def test_prefix_bench_model_step(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = run_quick(tmp_path, monkeypatch, MODEL_ARGS)
    assert result["rows"] == [] and result["config"]["modes"] == []
    config = result["model_config"]
    assert config["hidden"] == 64 and config["layers"] == 2 and config["heads"] == 4 and config["vocab"] == 128
    assert config["lengths"] == [16, 32] and config["prefix_lengths"] == [4] and config["dtype"] == "fp32"
    assert config["impls"] == list(step.IMPLS) and config["prefix_kinds"] == list(step.PREFIX_KINDS)
    rows = {(r["impl"], r["L"], r["prefix"]): r for r in result["model"]}
    assert set(rows) == {(i, L, k) for i in step.IMPLS for L in (16, 32) for k in step.PREFIX_KINDS}
    for (impl, L, kind), row in rows.items():
        key = (impl, L, kind)
        assert row["mode"] == "step" and row["P"] == 4 and row["B"] == 32 // L and not row["note"], key
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["tflops"] > 0, key
        assert row["flops"] == step.model_step_flops(config, row["B"], L, 0 if impl == "floor" else 4), key
        assert row["ratio_to_floor"] == row["vs_base"] > 0 and row["speedup_over_peft"] == row["vs_peer"] > 0, key
        if impl == "floor":
            assert row["vs_base"] == 1.0 and row["rel_err"] is None and row["trainable_params"] == 64, key
        else:  # equal prefixes: the same loss and prefix gradients
            assert row["rel_err"] == row["loss_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-4, key
            assert math.isfinite(row["loss"]) and row["trainable_params"] > 0, key
        if impl == "peft":
            assert row["vs_peer"] == 1.0 and abs(row["loss"] - rows[("fastpeft", L, kind)]["loss"]) < 1e-4, key
    summary = result["model_summary"]
    assert summary["cases"] == 4 and 0 <= summary["met"] <= 4 and summary["worst"]["vs_peer"] > 0


def test_model_step_flops():
    dims = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 128}
    B, L, P = 2, 16, 4
    linear = 4 * B * L * (2 * (4 * 64 * 64 + 3 * 64 * 128) + 64 * 128)
    assert step.model_step_flops(dims, B, L, 0) == linear + 2 * 3.5 * 4 * B * 4 * 16 * (L * L / 2)
    extra = step.model_step_flops(dims, B, L, P) - step.model_step_flops(dims, B, L, 0)
    assert extra == 2 * 3.5 * 4 * B * 4 * 16 * L * P


def test_prefix_cost_model():
    B, H, Hkv, L, P, D = 2, 4, 2, 64, 10, 64
    fwd = 4 * B * H * D * (L * P + L * L / 2)
    assert op.attention_flops(B, H, L, P, D, "fwd", "fastpeft") == fwd
    assert op.attention_flops(B, H, L, P, D, "fwd+bwd", "torch") == 3.5 * fwd
    assert op.attention_flops(B, H, L, P, D, "fwd", "floor") == 4 * B * H * D * L * L / 2
    assert op.attention_flops(B, H, L, P, D, "decode", "fastpeft") == 4 * B * H * (L + P) * D
    assert op.attention_bytes(B, H, Hkv, L, P, D, "decode", "fastpeft", 2) == \
        2 * (2 * B * H * D + 2 * B * Hkv * L * D + 2 * Hkv * P * D)
    assert op.attention_bytes(B, H, Hkv, L, P, D, "fwd+bwd", "floor", 2) == 2 * 6 * (B * H * L * D + B * Hkv * L * D)


def test_prefix_is_a_bench_family():
    families = bench_families()
    assert "prefix" in families and "prefix_attention" in families
