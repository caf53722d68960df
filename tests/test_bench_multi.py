"""fastpeft bench multi end to end on tiny CPU cases: every impl that runs on the CPU (fastpeft runs the
PyTorch reference; fastpeft_cuda is dropped with a note) timed, checked and written for every phase and scenario;
the cost model by hand; the targets summary on hand-made rows; the serving loop on a tiny Llama."""

import math

import pytest
import torch

from fastpeft.bench import multi_adapter as bench
from fastpeft.bench.multi_adapter import cases, impls, serve, targets
from fastpeft.cli import bench_families
from fastpeft.ops import kernel_options
from tests.bench_run import run_bench

K, N, L = 64, 96, 4
OP_ARGS = ["--device", "cpu", "--quick", "--modes", "op", "--shapes", f"{K}x{N}", "--batches", "1,4,72",
           "--prefill-len", str(L), "--no-plot", "--warmup-ms", "0", "--rep-ms", "1", "--threads", "1"]
SERVE_ARGS = ["--device", "cpu", "--quick", "--modes", "serve", "--serve-batch", "2", "--serve-prompt", "4",
              "--serve-new-tokens", "2", "--no-plot", "--warmup-ms", "0", "--rep-ms", "1", "--threads", "1"]


@pytest.fixture
def run_quick(tmp_path, monkeypatch):
    """bench.main(args) into tmp_path with a small roofline probe; the complete JSON it wrote. Restores torch's
    thread count (the quick CPU run sets one thread)."""
    threads = torch.get_num_threads()

    def run(args):
        try:
            return run_bench(bench, "multi_adapter", args, tmp_path, monkeypatch)
        finally:
            torch.set_num_threads(threads)

    return run


def test_multi_bench_writes_every_row(run_quick):
    result = run_quick(OP_ARGS)
    config = result["config"]
    assert config["shapes"] == [f"{K}x{N}"] and config["dtype"] == "fp32" and config["prefill_len"] == L
    assert "fastpeft_cuda" not in config["impls"] and not result["cuda_ext"]["usable"]
    assert any(n.startswith("fastpeft_cuda skipped") for n in result["notes"])
    assert result["peaks"]["bandwidth_gbps"] > 0 and result["versions"]["torch"]
    assert config["decode_max_tokens"] == kernel_options().decode_max_tokens == 64
    specs = cases.case_specs(cases.QUICK, cases.PHASES, [(K, N)], [1, 4, 72], cases.SCENARIOS, cases.RANKS, L)
    expected = {(i, s["phase"], s["B"], s["scenario"], s["n"], s["rank"])
                for s in specs for i in impls.case_impls(config["impls"], s["phase"], s["B"] * s["L"])}
    rows = {(r["impl"], r["mode"], r["B"], r["scenario"], r["n"], r["rank"]): r for r in result["rows"]}
    assert set(rows) == expected and len(rows) == len(result["rows"])
    # B = 72 decode rows are past kernel_options().decode_max_tokens (64): fastpeft_decode (the decode kernel
    # forced) runs there
    assert {k[0] for k in rows} == {"base", "fastpeft", "fastpeft_segment", "fastpeft_decode", "peft", "loop",
                                    "padded_bmm"}
    assert {k[2] for k in rows if k[0] == "fastpeft_decode"} == {72}
    assert {k[1] for k in rows} == set(cases.PHASES) and {k[3] for k in rows} == set(cases.SCENARIOS)
    for key, row in rows.items():
        impl, phase = key[:2]
        assert math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["rel_err"] < 1e-5 and not row["note"], (key, row["rel_err"], row["note"])
        assert row["vs_base"] > 0 and row["roofline_pct"] > 0 and row["routing_us"] > 0, key
        assert row["vs_loop"] > 0 and (phase == "train" or (row["vs_peer"] > 0 and row["vs_padded"] > 0)), key
        assert row["L"] == (1 if phase == "decode" else L) and row["M"] == row["B"] * row["L"], key
        if row["scenario"] == "none":
            assert row["distinct"] == 0 and row["flops"] == rows[("base", *key[1:])]["flops"], key
        elif row["scenario"] == "uniform":
            assert row["distinct"] == row["n"], key
        if impl.startswith("fastpeft") and phase == "decode" and row["distinct"]:
            assert row["adapter_bw_pct"] is None or row["adapter_bw_pct"] > 0, key
    assert result["summary"]["applicable"] is False


def test_multi_cost_model(run_quick):
    result = run_quick([*OP_ARGS, "--batches", "4", "--scenarios", "uniform", "--ranks", "16,mixed"])
    rows = {(r["impl"], r["mode"], r["B"], r["scenario"], r["n"], r["rank"]): r for r in result["rows"]}
    e, M = 4, 4 * L  # fp32; prefill and train tokens
    fast, base = rows["fastpeft", "decode", 4, "uniform", 4, "16"], rows["base", "decode", 4, "uniform", 4, "16"]
    assert fast["flops"] == 2 * 4 * N * K + 2 * 4 * 16 * (K + N) and base["flops"] == 2 * 4 * N * K
    assert fast["bytes"] == e * (4 * K + N * K + 4 * N + 4 * 16 * (K + N))
    assert base["bytes"] == e * (4 * K + N * K + 4 * N)
    mixed = rows["peft", "prefill", 4, "uniform", 4, "mixed"]  # one row each of ranks 8, 16, 64, 128: 216
    assert mixed["flops"] == 2 * M * N * K + 2 * L * 216 * (K + N)
    assert mixed["bytes"] == e * (M * K + N * K + M * N + 216 * (K + N))
    train = rows["fastpeft", "train", 4, "uniform", 2, "16"]  # 2 distinct rank-16 adapters, every token adapted
    ad = 2 * 16 * (K + N)
    assert train["flops"] == 4 * M * N * K + 6 * M * 16 * (K + N)
    assert train["bytes"] == e * ((M * K + N * K + M * N + ad) + (M * N + N * K + M * K + ad) + (M * K + ad))
    assert rows["base", "train", 4, "uniform", 2, "16"]["bytes"] == e * 2 * (M * K + N * K + M * N)
    # the adapter term's bandwidth estimate: its bytes (A, B, x; y read and written) over fastpeft's time above base
    term = e * (4 * 16 * (K + N) + 4 * K + 2 * 4 * N)
    expected = (100 * term / ((fast["ms"] - base["ms"]) * 1e-3) / (result["peaks"]["bandwidth_gbps"] * 1e9)
                if fast["ms"] > base["ms"] else None)
    assert fast["adapter_bw_pct"] == pytest.approx(expected)


def test_scenarios_and_preset():
    g = torch.Generator().manual_seed(0)
    slots = cases.row_slots("uniform", 8, 16, g)
    assert len(slots) == 16 and set(slots) == set(range(8))
    assert sorted(cases.row_slots("uniform", 16, 16, g)) == list(range(16))
    zipf = cases.row_slots("zipf", 64, 256, g)
    assert len(zipf) == 256 and 0 <= min(zipf) and max(zipf) < 64 and zipf.count(0) > zipf.count(63)
    assert cases.row_slots("none", 0, 4, g) == [-1] * 4
    assert cases.slot_ranks("mixed", 5) == [8, 16, 64, 128, 8] and cases.slot_ranks("16", 2) == [16, 16]
    full = cases.case_specs(cases.FULL, cases.PHASES, cases.FULL["shapes"], None, cases.SCENARIOS, cases.RANKS, 512)
    assert len(full) == 174  # the count cases.py's docstring gives
    assert {s["B"] for s in full if s["rank"] in ("8", "64")} == {64}
    assert {s["B"] for s in full if s["rank"] == "mixed" or s["scenario"] == "zipf"} == {16, 64, 256}
    assert {s["B"] for s in full if s["phase"] == "prefill"} == {1, 4, 16, 64}
    assert [(s["B"], s["L"], s["n"]) for s in full if s["phase"] == "train"] == [(16, 512, 8)] * 3


def test_summary_targets():
    """The targets on hand-made rows: one shape, and the 4:2:1 Llama block."""
    def row(impl, K, N, ms):
        return {"impl": impl, "mode": "decode", "scenario": "uniform", "rank": "16", "B": 64, "n": 64, "K": K, "N": N,
                "M": 64, "distinct": 64, "ms": ms, "shape": f"{K}x{N}"}

    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
    times = {(4096, 4096): (0.05, 0.06, 1.0), (4096, 11008): (0.1, 0.12, 1.5), (11008, 4096): (0.1, 0.4, 1.5)}
    flat = [row(i, K, N, t) for (K, N), ts in times.items() for i, t in zip(("base", "fastpeft", "peft"), ts)]
    s = targets.summary(flat, cases.FULL, shapes, True, 3000.0, 2)
    got = {(t["target"], t["scope"].split()[0]): t for t in s["targets"]}
    assert got["ratio_to_base", "4096x4096"]["value"] == pytest.approx(1.2) and got["ratio_to_base", "4096x4096"]["met"]
    block = (4 * 0.06 + 2 * 0.12 + 0.4) / (4 * 0.05 + 2 * 0.1 + 0.1)
    assert got["ratio_to_base", "Llama"]["value"] == pytest.approx(block) and not got["ratio_to_base", "Llama"]["met"]
    assert got["speedup_over_peft", "4096x4096"]["value"] == pytest.approx(1.0 / 0.06)
    term = 2 * (64 * 16 * 8192 + 64 * 4096 + 2 * 64 * 4096)
    assert got["adapter_bw_pct", "4096x4096"]["value"] == pytest.approx(100 * term / 0.01e-3 / 3000e9)
    cpu = targets.summary(flat, cases.FULL, shapes, False, 3000.0, 2)
    assert not cpu["applicable"] and all(t["met"] is None for t in cpu["targets"])


def test_multi_bench_serve(run_quick):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = run_quick(SERVE_ARGS)
    assert result["rows"] == [] and "summary" not in result
    config = result["serve_config"]
    assert config["batch"] == 2 and config["adapters"] == 2 and config["prompt"] == 4 and config["new_tokens"] == 2
    assert config["adapter_dtypes"] == {"peft": "torch.float32", "fastpeft": "torch.float32"}
    rows = {r["impl"]: r for r in result["serve"]}
    assert set(rows) == set(serve.IMPLS)
    dims = {**serve.QUICK, "batch": 2, "prompt": 4, "new_tokens": 2}
    for impl, row in rows.items():
        assert row["mode"] == "serve" and not row["note"] and math.isfinite(row["ms"]) and row["ms"] > 0, impl
        assert row["tokens_per_s"] == pytest.approx(2 * 2 / (row["ms"] * 1e-3)) and len(row["runs_ms"]) == 3, impl
        assert row["flops"] == serve.serve_flops(dims, 2, 4, 2, impl != "base"), impl
        assert row["throughput_vs_base"] > 0 and row["vs_peer"] > 0, impl
        if impl != "base":  # equal adapters: the same logits and tokens, and the adapters do change the output
            assert row["logits_rel_err"] < 1e-5 and row["tokens_equal"] and row["adapter_effect"] > 1e-2, impl
            assert row["logits_ok"] and row["rel_err"] == row[f"{impl}_err_vs_wide"] < 1e-5, impl
    summary = result["serve_summary"]
    assert summary["applicable"] is False and summary["met"] is None and summary["throughput_vs_base"] > 0


def test_multi_is_a_bench_family():
    families = bench_families()
    assert "multi" in families and "multi_adapter" in families
