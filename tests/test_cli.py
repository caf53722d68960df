"""The `fastpeft` command: info, demo --quick, bench; each run in a fresh interpreter like a user would."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

from tests.aot import ROOT
from tests.bench_run import small_peaks

FAMILIES = ("adalora", "bottleneck", "cpu", "dora", "ia3", "lora", "moe", "multi", "multi_adapter", "phm", "prefix",
            "prefix_attention", "qlora", "serve")


def fastpeft(*args: str, timeout: int = 120, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python -m fastpeft ARGS` (the console script's entry point, without relying on PATH)."""
    return subprocess.run([sys.executable, "-m", "fastpeft", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands():
    result = fastpeft("--help")
    assert result.returncode == 0, result.stderr
    for command in ("demo", "info", "bench"):
        assert command in result.stdout


def test_info():
    result = fastpeft("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "lora_linear" in out and "torch" in out and "transformers" in out
    assert re.search(r"cpu tensors:\s+torch", out), out


def test_demo_quick():
    result = fastpeft("demo", "--quick", timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    before, after = map(float, re.search(r"loss .*: ([\d.]+) -> ([\d.]+) \(fell", out).groups())
    assert after < before - 1.0, out
    assert re.search(r"merge: max \|merged - unmerged\| logit = \S+ \(match\)", out), out
    assert "sample: The keeper " in out
    assert re.search(r"training step .*fastpeft [\d.]+ ms", out), out
    assert "training" in result.stderr  # the progress bar


def test_bench_unknown_family():
    result = fastpeft("bench", "no_such_family")
    assert result.returncode == 2
    assert "unknown benchmark family 'no_such_family'" in result.stderr
    assert f"available: {', '.join(FAMILIES)}." in result.stderr


def test_bench_without_family_prints_help(capsys):
    from fastpeft import cli

    assert cli.main(["bench"]) == 2
    assert "available families: " in capsys.readouterr().out


def test_bench_help_lists_families():
    result = fastpeft("bench", "--help")
    assert result.returncode == 0, result.stderr
    listed = " ".join(result.stdout.split())  # argparse wraps the epilog
    assert ("available families: adalora, bottleneck, cpu, dora, ia3, lora, moe, multi, multi_adapter, phm, "
            "prefix") in listed
    assert "common" not in result.stdout.split("families:")[1]


def test_bench_lora_help():
    result = fastpeft("bench", "lora", "--help")
    assert result.returncode == 0, result.stderr
    assert "--shapes" in result.stdout and "--quick" in result.stdout


def test_bench_runs_outside_a_checkout(tmp_path):
    """As from an installed wheel: run from a directory that is not the repository, the benchmarks come from the
    package; a `benchmarks` package in the working directory (first on sys.path under -m) is never imported."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("raise SystemExit('imported ./benchmarks')\n")
    result = fastpeft("bench", "lora", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("usage: fastpeft bench lora") and "--ranks" in result.stdout
    assert "benchmarks/results under the current directory" in " ".join(result.stdout.split())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["__init__.py", "benchmarks"]  # nothing written


def test_bench_writes_under_the_working_directory(tmp_path, monkeypatch):
    """Without --out the result goes to benchmarks/results under the current directory, wherever fastpeft lives."""
    from fastpeft import cli

    small_peaks(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["--device", "cpu", "--quick", "--shapes", "32x32", "--m", "1", "--ranks", "2", "--modes", "fwd",
            "--impls", "base,fastpeft", "--no-plot", "--warmup-ms", "0", "--rep-ms", "1"]
    assert cli.main(["bench", "lora", *argv]) == 0
    (path,) = (tmp_path / "benchmarks" / "results").glob("cpu-*-lora-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and {r["impl"] for r in result["rows"]} == {"base", "fastpeft"}


def test_wheel_ships_the_benchmarks():
    """pyproject's package discovery puts every benchmark package into the wheel."""
    from setuptools import find_packages

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = set(find_packages(ROOT, **pyproject["tool"]["setuptools"]["packages"]["find"]))
    assert {"fastpeft.bench", "fastpeft.bench.multi_adapter", "fastpeft.bench.prefix_attention"} <= found


def test_console_script_declared():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "fastpeft"]
    assert script.value == "fastpeft.cli:main"
