"""`fastpeft serve` on the command line, the package without the serve extra, and `fastpeft bench serve --quick`."""
from __future__ import annotations

import json
import subprocess
import sys

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
    runs = json.loads(path.read_text())["runs"]
    assert {r["adapters"] for r in runs} == {0, 8} and all(r["answered"] == r["requests"] for r in runs)
    assert all(r["vs_no_adapters"] > 0 for r in runs)
