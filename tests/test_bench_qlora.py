"""fastpeft bench qlora end to end on a tiny Llama: fastpeft's LoRA on a bitsandbytes NF4 base, PEFT's QLoRA on the
same base and fastpeft's LoRA on the bf16 base, trained and run in alternating runs, the NF4 pair checked to give
the same logits, the memory of each recorded (no timing assertions)."""

import math

import pytest
import torch

import fastpeft as fp
from fastpeft.bench import qlora as bench
from tests.bench_run import run_bench

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")

ARGS = ["--device", "cpu", "--quick", "--reps", "2", "--tokens", "2x8,1x4", "--no-plot"]


def test_qlora_bench_writes_every_implementation(tmp_path, monkeypatch):
    result = run_bench(bench, "qlora", ARGS, tmp_path, monkeypatch)
    assert result["config"]["tokens"] == ["2x8", "1x4"] and result["notes"] == []
    rows = {(r["tokens"], r["mode"], r["impl"]): r for r in result["rows"]}
    cpu = ["fastpeft-nf4", "peft-nf4", "fastpeft-bf16"]  # the 4-bit strategies are CUDA's
    assert bench.impls_here(torch.device("cpu"), bench.IMPLS) == cpu
    with fp.ops.use_backend("triton"):  # where fastpeft's 4-bit op runs (CUDA; here the interpreter): both strategies
        assert bench.impls_here(torch.device("cpu"), bench.IMPLS) == [
            "fastpeft-nf4-fused", "fastpeft-nf4-cublas", "peft-nf4", "fastpeft-bf16"]
    assert set(rows) == {(t, m, i) for t in ("2x8", "1x4") for m in ("train", "infer") for i in cpu}
    for key, row in rows.items():
        tokens, mode, impl = key
        assert not row["note"], (key, row["note"])
        assert len(row["times_ms"]) == 2 and math.isfinite(row["ms"]) and row["ms"] > 0, key
        assert row["step_peak_mib"] > 0 and row["weights_mib"] > 0, key
        if impl == "fastpeft-nf4":
            assert row["rel_err"] == 0.0, key  # PEFT's logits, bit for bit: the same base product and term
            assert row["weights_mib"] < rows[(tokens, mode, "fastpeft-bf16")]["weights_mib"], key
        assert row["vs_peer"] > 0 and (impl != "peft-nf4" or row["vs_peer"] == 1.0), key
