"""`import fastpeft` never initialises CUDA, never loads (so never compiles) the kernels, and works without Triton.

Of fastpeft/kernels it loads only the triton-free table of the kernels' limits (fastpeft/kernels/limits.py), which
the ops dispatch by; that module imports no triton. (With triton installed, torch itself imports it when the ops
register as `torch.library.triton_op`s; without it, everything but the kernels works.)
Each check runs in a fresh interpreter: this test process has long since imported everything.
"""
from __future__ import annotations

import subprocess
import sys

from tests.aot import ROOT

PROBE = """
import sys
{prelude}
import torch
import fastpeft as fp
assert not torch.cuda.is_initialized(), "import fastpeft initialised CUDA"
loaded = sorted(m for m in sys.modules if m.startswith("fastpeft.kernels"))
triton_free = {{"fastpeft.kernels", "fastpeft.kernels.limits"}}  # the package and its table of limits
assert set(loaded) <= triton_free, f"import fastpeft loaded the kernels: {{loaded}}"
{after}
print("ok")
"""

# Makes `import triton` fail and find_spec("triton") return None, as on a machine without it.
BLOCK_TRITON = """
sys.modules["triton"] = None  # before torch is imported
"""

# With Triton blocked, the CPU path still works end to end: inject, forward, backward, merge, unmerge.
USE_WITHOUT_TRITON = """
from torch import nn
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
fp.add_adapter(model, "a", fp.LoRAConfig(r=2, target_modules=["0", "2"], init_weights="gaussian"))
model(torch.randn(3, 8)).sum().backward()
print(fp.ops.dispatch.explain("cpu"))
"""


def _run(prelude: str = "", after: str = "") -> subprocess.CompletedProcess:
    code = PROBE.format(prelude=prelude, after=after)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_does_not_initialise_cuda_or_load_kernels():
    result = _run()
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# The table of limits imports no triton (nor any kernel): run alone, outside the package (whose ops register as
# triton_ops, which makes torch import triton when it is installed).
LIMITS_ALONE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("limits", "fastpeft/kernels/limits.py")
limits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(limits)
assert limits.TRITON_DTYPES and limits.ACTIVATIONS
assert sys.modules.get("triton") is None, "fastpeft/kernels/limits.py imported triton"
assert not [m for m in sys.modules if m.startswith("fastpeft")], "fastpeft/kernels/limits.py imported fastpeft"
print("ok")
"""


def test_kernel_limits_import_no_triton():
    result = subprocess.run([sys.executable, "-c", LIMITS_ALONE], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_works_without_triton():
    result = _run(prelude=BLOCK_TRITON, after=USE_WITHOUT_TRITON)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert "lora_linear" in result.stdout and "torch" in result.stdout
