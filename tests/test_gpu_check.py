"""`make gpu-check DRY_RUN=1`: the script a lent GPU runs first, run on the CPU as a user would (a subprocess from the
repository root, Triton's interpreter, tiny sizes), so that it cannot rot unnoticed: it exits cleanly, writes the
JSON, the markdown summary and the plots, every section has rows for the strategies, the base op and PEFT, the
summary is printed last, and fastpeft/data/strategies.json is left as it was. No timed assertions. Beside it, the
time guard, the targets and the strategy rule on hand-made rows."""
from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch

from fastpeft.bench.gpu_check import plan, run, targets, tier
from tests.aot import ROOT

TABLE = ROOT / "fastpeft" / "data" / "strategies.json"
SECTIONS = {  # section -> the implementations it must have timed
    "lora": {"base", "fused", "cublas", "peft"},
    "dora": {"base", "fused", "cublas", "peft"},
    "ia3": {"base", "fused", "cublas", "peft"},
    "multi_lora": {"base", "fastpeft", "peft"},  # the base product of multi-adapter paths is cuBLAS's: no pins
    "prefix_attention": {"floor", "fastpeft", "torch"},  # SDPA without the prefix, and concatenate + SDPA
    "train_step": {"base", "fused", "cublas", "peft"},
    "lora_4bit": {"base", "fused", "cublas", "peft", "bf16_lora"},
    "qlora": {"fastpeft-nf4-fused", "fastpeft-nf4-cublas", "peft-nf4", "fastpeft-bf16"},
    "serve": {"base", "uniform", "zipf"},  # no adapter, then the adapters with each popularity
    "moe": {"base", "fastpeft", "peft"},  # the experts module alone, fastpeft's LoRAExperts, PEFT's target_parameters
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(completed process, output directory, the strategy table's bytes before the run)."""
    out = tmp_path_factory.mktemp("gpu-check")
    before = TABLE.read_bytes() if TABLE.exists() else None
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", "DRY_RUN=1", f"OUT={out}",
                             f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out, before


@pytest.fixture(scope="module")
def payload(dry_run) -> dict:
    _, out, _ = dry_run
    (path,) = out.glob("gpu-check-cpu-*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_dry_run_writes_every_file(dry_run, payload):
    _, out, _ = dry_run
    stem = f"gpu-check-cpu-{payload['device']['name']}"
    (json_path,) = out.glob("gpu-check-cpu-*.json")
    names = {p.name for p in out.iterdir()}
    assert json_path.with_suffix(".md").name in names
    assert json_path.stem + "-gpu-tests.log" in names
    if importlib.util.find_spec("matplotlib") is not None:
        for section in ("lora", "dora", "ia3", "multi_lora", "prefix_attention", "train_step", "lora_4bit", "serve"):
            assert f"{json_path.stem}-{section}.png" in names, (section, sorted(names), stem)


@pytest.mark.slow
def test_dry_run_records_the_run(payload):
    assert payload["complete"] and payload["dry_run"] and payload["benchmark"] == "gpu-check"
    assert payload["triton_interpreter"], "the dry run must run the kernels in Triton's interpreter"
    assert payload["command"].endswith("-m fastpeft.bench.gpu_check --dry-run --out " + payload["argv"][-1])
    assert all(payload["versions"].get(k) for k in ("torch", "triton", "transformers", "peft"))
    assert payload["device"]["kind"] == "cpu" and "commit" in payload["git"]
    tests = payload["gpu_tests"]
    assert tests["ran"] and tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0, tests
    assert payload["peaks"]["bandwidth_gbps"] > 0 and payload["peaks"]["matmul_tflops"] > 0
    assert {t["target"] for t in payload["targets"]} == {t[0] for t in targets.TARGETS}


@pytest.mark.slow
def test_every_section_times_every_implementation(payload):
    assert set(payload["sections"]) == set(SECTIONS)
    for name, impls in SECTIONS.items():
        section = payload["sections"][name]
        rows = section["rows"]
        timed = {r["impl"] for r in rows if r.get("ms")}
        assert impls <= timed, (name, impls - timed, [r.get("note") for r in rows if not r.get("ms")])
        assert not section["guard"]["skipped"] and not section.get("errors"), (name, section.get("errors"))
        assert not [r for r in rows if "MISMATCH" in (r.get("note") or "")], name
    lora = payload["sections"]["lora"]["rows"]
    assert {(r["M"], r["dropout"]) for r in lora} == {(m, p) for m in (1, 16) for p in (0.0, 0.05)}
    train = {r["impl"]: r for r in payload["sections"]["train_step"]["rows"]}
    for impl in ("fused", "cublas", "peft"):
        assert train[impl]["loss_err"] < 1e-2 and train[impl]["grad_norm_err"] < 5e-2, train[impl]


@pytest.mark.slow
def test_summary_is_printed_last_and_the_strategy_table_is_untouched(dry_run, payload):
    result, out, before = dry_run
    (md,) = out.glob("gpu-check-cpu-*.md")
    assert result.stdout.rstrip().endswith(md.read_text().rstrip())
    assert "## Strategy table" in md.read_text() and "## Targets" in md.read_text()
    assert (TABLE.read_bytes() if TABLE.exists() else None) == before
    table = payload["strategy_table"]
    assert table["written"] == [] and "dry run" in table["why_not_written"]
    assert set(table["choices"]) == {"lora_linear", "dora_linear", "ia3_linear", "lora_linear_4bit"}
    for per in table["choices"].values():
        assert set(per) == {"1", "16"} and all(c["choice"] in ("fused", "cublas") for c in per.values())


def test_time_guard_shares_what_is_left():
    budget = plan.Budget(100.0 + plan.FINISH_S)
    first = plan.Guard(budget, plan.SECTIONS[0])
    total = sum(plan.SHARES.values())
    assert first.allowed_s == pytest.approx(100.0 * plan.SHARES[plan.SECTIONS[0]] / total, rel=0.01)
    last = plan.Guard(plan.Budget(100.0 + plan.FINISH_S), plan.SECTIONS[-1])
    assert last.allowed_s == pytest.approx(100.0, rel=0.01)  # the last section gets all that is left
    spent = plan.Guard(plan.Budget(0.0), "lora")
    assert spent.expired() or spent.allowed_s == 0.0
    spent.skip("K=1 N=1 M=1")
    assert spent.record()["skipped"] == ["K=1 N=1 M=1"]


def _row(impl, mode, M, ms, **case):
    return {"impl": impl, "mode": mode, "M": M, "ms": ms, "shape": "8x8", "r": 16, "dropout": 0.0, **case}


def test_targets_and_strategy_rule_on_hand_made_rows():
    lora = [_row("base", m, 4096, 1.0) for m in ("fwd", "fwd+bwd")]
    lora += [_row("fused", "fwd", 4096, 1.04), _row("cublas", "fwd", 4096, 1.20), _row("peft", "fwd", 4096, 1.5),
             _row("fused", "fwd+bwd", 4096, 1.30), _row("cublas", "fwd+bwd", 4096, 1.20),
             _row("peft", "fwd+bwd", 4096, 1.25)]
    lora += [_row("fused", "fwd+bwd", 16, 1.00), _row("cublas", "fwd+bwd", 16, 1.005)]  # within 1%: the default
    result = {t["target"]: t for t in targets.compute({"lora": {"rows": lora}}, applicable=True)}
    fwd = result["lora_fwd"]["variants"]
    assert fwd["fused"]["met"] and not fwd["cublas"]["met"] and fwd["best"]["value"] == pytest.approx(1.04)
    assert result["lora_fwd_bwd"]["variants"]["best"]["value"] == pytest.approx(1.20)
    assert not result["lora_fwd_bwd"]["met"]
    assert result["lora_vs_peft"]["variants"]["fused"]["value"] == pytest.approx(1.25 / 1.30)
    assert result["dora_vs_lora"]["met"] is None  # nothing measured
    off_gpu = targets.compute({"lora": {"rows": lora}}, applicable=False)
    assert all(t["met"] is None for t in off_gpu)
    choices = targets.choose_strategies({"lora": {"rows": lora}}, "cublas")["lora_linear"]
    assert choices[4096]["choice"] == "cublas" and choices[16]["choice"] == "cublas"
    lora.append(_row("fused", "fwd+bwd", 256, 0.9))
    lora.append(_row("cublas", "fwd+bwd", 256, 1.0))
    assert targets.choose_strategies({"lora": {"rows": lora}}, "cublas")["lora_linear"][256]["choice"] == "fused"


def test_serve_target_on_hand_made_rows():
    def row(impl, adapters, tokens_per_s, mode="saturation"):
        return {"impl": impl, "adapters": adapters, "mode": mode, "tokens_per_s": tokens_per_s,
                "vs_no_adapters": tokens_per_s / 100.0}
    rows = [row("base", 0, 100.0), row("uniform", 64, 88.0), row("zipf", 64, 95.0), row("uniform", 64, 10.0, "rate"),
            row("uniform", 8, 50.0)]
    result = {t["target"]: t for t in targets.compute({"serve": {"rows": rows}}, applicable=True)}["serve_64_adapters"]
    assert result["variants"]["best"]["value"] == pytest.approx(0.88) and result["met"] is False
    assert result["variants"]["best"]["points"] == 2 and result["variants"]["best"]["worst"]["popularity"] == "uniform"
    off_gpu = {t["target"]: t for t in targets.compute({"serve": {"rows": rows}}, applicable=False)}
    assert off_gpu["serve_64_adapters"]["met"] is None


def test_moe_targets_on_hand_made_rows():
    def row(layer, impl, ms, mode="fwd+bwd"):
        return {"layer": layer, "impl": impl, "mode": mode, "ms": ms}
    rows = [row("mixtral", "base", 10.0), row("mixtral", "fastpeft", 11.0), row("mixtral", "peft", 30.0),
            row("qwen3_moe", "base", 4.0), row("qwen3_moe", "fastpeft", 5.0), row("qwen3_moe", "peft", 9.0),
            row("mixtral", "fastpeft", 100.0, "fwd")]
    result = {t["target"]: t for t in targets.compute({"moe": {"rows": rows}}, applicable=True)}
    assert result["moe_vs_base"]["variants"]["best"]["value"] == pytest.approx(1.25)
    assert result["moe_vs_base"]["met"] is False and result["moe_vs_base"]["variants"]["best"]["points_met"] == 1
    assert result["moe_vs_peft"]["variants"]["best"]["value"] == pytest.approx(1.8)
    assert result["moe_vs_peft"]["variants"]["best"]["worst"] == {"layer": "qwen3_moe"}


@pytest.mark.slow
def test_tier_is_cut_at_its_cap_and_counts_what_ran(tmp_path):
    """The GPU tier's cap: pytest killed (process group), the tests that finished counted from its progress."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_slow_gpu.py").write_text(
        "import time\nimport pytest\npytestmark = pytest.mark.gpu\n\n"
        "def test_fast():\n    pass\n\ndef test_stuck():\n    time.sleep(120)\n")
    files = tier.gpu_test_files(tmp_path)
    assert files == ["tests/test_slow_gpu.py"]
    result = tier.run_tier(files, cap_s=8.0, log_path=tmp_path / "tier.log", root=tmp_path)
    assert result["timed_out"] and not result["ok"] and result["wall_s"] < 60
    assert result["passed"] == 1 and result["failed"] == 0
    assert "cut at the cap" in tier.describe(result)


def test_strategy_table_on_a_gpu_keeps_the_other_entries(tmp_path, monkeypatch):
    """What a real GPU run writes (simulated here): this device's bf16 entries replaced, every other entry kept,
    the rule in the source line; the same file next to the results."""
    from fastpeft.ops import strategy

    table_path = tmp_path / "strategies.json"
    other = {"Other GPU": {"bfloat16": {"lora_linear": {"1": "fused"}}},
             "NVIDIA H100 80GB HBM3": {"float16": {"ia3_linear": {"16": "fused"}},
                                       "bfloat16": {"dora_linear": {"1": "fused"}}}}
    monkeypatch.setattr(strategy, "TABLE", table_path)
    committed = functools.lru_cache(maxsize=1)(lambda: other)  # like strategy.load_table (write_table clears it)
    monkeypatch.setattr(strategy, "load_table", committed)
    monkeypatch.setattr(strategy, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    rows = [_row("fused", "fwd+bwd", 256, 0.9), _row("cublas", "fwd+bwd", 256, 1.0)]
    check = types.SimpleNamespace(
        dry_run=False, cuda=True, device=torch.device("cuda"), dtype=torch.bfloat16, notes=[],
        payload={"sections": {"lora": {"rows": rows}}, "date": "2026-12-03", "git": {"commit": "abc"}},
        json_path=tmp_path / "gpu-check-x.json", sibling=lambda suffix: tmp_path / f"gpu-check-x{suffix}")
    out = run.strategy_table(check)
    assert out["written"] == [str(table_path), str(tmp_path / "gpu-check-x-strategies.json")]
    written = json.loads(table_path.read_text())
    assert written["devices"]["Other GPU"] == other["Other GPU"]
    h100 = written["devices"]["NVIDIA H100 80GB HBM3"]
    assert h100["float16"] == {"ia3_linear": {"16": "fused"}} and h100["bfloat16"] == {"lora_linear": {"256": "fused"}}
    assert targets.RULE in written["source"] and "abc" in written["source"]
    assert (tmp_path / "gpu-check-x-strategies.json").read_text() == table_path.read_text()
