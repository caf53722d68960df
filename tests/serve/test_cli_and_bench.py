"""`fastpeft serve` on the command line, the package without the serve extra, and `fastpeft bench serve --quick`."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

BLOCK = "import sys; sys.modules.update(fastapi=None, uvicorn=None); "


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_package_and_the_cli_work_without_the_serve_extra():
    done = _python(BLOCK + "import fastpeft, fastpeft.serve, fastpeft.cli as c; "
                           "sys.exit(c.main(['serve', '--model', '.']))")
    assert done.returncode == 2, done.stderr
    assert "pip install 'fastpeft[serve]'" in done.stderr


def test_serve_help_and_bad_flags():
    done = _python("import fastpeft.cli as c; c.main(['serve', '--help'])")
    assert "--adapter NAME=PATH" in done.stdout and "--max-batch-tokens" in done.stdout
    bad = _python("import fastpeft.cli as c; c.main(['serve', '--model', '/nonexistent', '--adapter', 'x'])")
    assert "expected NAME=PATH" in bad.stderr


def test_bench_serve_quick(tmp_path):
    import torch

    from fastpeft.bench import serve

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one intra-op thread is far faster here
    try:
        assert serve.main(["--quick", "--rate", "0", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("*-serve-*.json")
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "serve" and payload["complete"] and "commit" in payload["git"]
    assert payload["command"].endswith("bench serve --quick --rate 0 --out " + str(tmp_path))
    runs = payload["runs"]
    assert {r["adapters"] for r in runs} == {0, 8} and all(r["answered"] == r["requests"] for r in runs)
    assert all(r["vs_no_adapters"] > 0 for r in runs)
    if importlib.util.find_spec("matplotlib") is not None:
        assert path.with_suffix(".png").is_file()


def test_bench_serve_plot_draws_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from fastpeft.bench import serve

    lat = {"p50": 1.0, "p99": 2.0}
    runs = [dict(adapters=n, popularity=p, mode=m, tokens_per_s=100.0 - n, ttft_ms=lat, per_token_ms=lat)
            for m in ("saturation", "rate") for n, p in [(0, "none"), (1, "uniform"), (8, "uniform"), (8, "zipf")]]
    runs.append(dict(adapters=64, popularity="zipf", mode="rate", skipped=True))
    serve.ratios(runs)
    assert runs[2]["vs_no_adapters"] == pytest.approx(92 / 100)
    assert serve.plot(runs, tmp_path / "x.png", title="t") == tmp_path / "x.png" and (tmp_path / "x.png").is_file()


def test_bench_serve_time_guard_skips_runs_and_leaves_no_adapter():
    import fastpeft as fp
    from fastpeft.bench import serve
    from fastpeft.bench.gpu_check import serving
    from fastpeft.inject.state import get_state
    from fastpeft.serve.tiny import build_model

    model = build_model(hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8)
    runs = serve.measure(model, adapters=[0, 2], popularity=["uniform", "zipf"], rank=2, prompts=[[1, 2]] * 3,
                         gen_len=2, rate=5.0, expired=lambda: True)
    assert len(runs) == 2 + 4 and all(r["skipped"] for r in runs)
    assert [serving.row(r)["impl"] for r in runs[:3]] == ["base", "base", "uniform"]
    assert get_state(model) is None or not fp.adapters(model)
