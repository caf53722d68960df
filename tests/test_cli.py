"""The `fastpeft` command: info, demo --quick, bench; each run in a fresh interpreter like a user would."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.aot import ROOT


def fastpeft(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m fastpeft ARGS` (the console script's entry point, without relying on PATH)."""
    return subprocess.run([sys.executable, "-m", "fastpeft", *args], cwd=ROOT, capture_output=True, text=True,
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
    assert result.returncode != 0
    assert "unknown benchmark family 'no_such_family'" in result.stderr and "lora" in result.stderr


def test_bench_help_lists_families():
    result = fastpeft("bench", "--help")
    assert result.returncode == 0, result.stderr
    listed = " ".join(result.stdout.split())  # argparse wraps the epilog
    assert "available families: adalora, bottleneck, dora, ia3, lora, multi, multi_adapter, phm, prefix" in listed
    assert "common" not in result.stdout.split("families:")[1]


def test_bench_lora_help():
    result = fastpeft("bench", "lora", "--help")
    assert result.returncode == 0, result.stderr
    assert "--shapes" in result.stdout and "--quick" in result.stdout


def test_bench_without_source_checkout(tmp_path, monkeypatch, capsys):
    from fastpeft import cli

    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path / "benchmarks")
    assert cli.main(["bench", "lora"]) == 2
    assert "needs a source checkout" in capsys.readouterr().err


def test_console_script_declared():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "fastpeft"]
    assert script.value == "fastpeft.cli:main"
