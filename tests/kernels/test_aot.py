"""Tier 3: every Triton kernel compiles ahead of time for sm_80 and sm_90, for every config autotune may pick.

Shared memory must fit the architecture and matrix kernels must use tensor-core instructions (wgmma for the
large GEMM tiles on sm_90). The compiled rows (kernel, variant, config, shared memory, instructions) are written
to build/aot-report.json.
"""
from __future__ import annotations

import json

import pytest

from tests.aot import ELEMENTWISE_KERNELS, ROOT, SHARED_LIMIT, kernels_defined, run_in_subprocesses

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    rows = run_in_subprocesses()
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "aot-report.json").write_text(json.dumps(rows, indent=1))
    return rows


def _where(row) -> str:
    return f"{row['kernel']} ({row['variant']}, {row['dtype']}, {row['arch']}, {row['config']})"


def test_every_kernel_is_compiled(compiled):
    assert kernels_defined() <= {row["kernel"] for row in compiled}, "add the missing kernels to tests/aot.CATALOG"


def test_shared_memory_fits(compiled):
    too_big = [f"{_where(r)}: {r['shared_bytes']} B" for r in compiled if r["shared_bytes"] > SHARED_LIMIT[r["arch"]]]
    assert not too_big, too_big


def test_half_precision_matrix_kernels_use_tensor_cores(compiled):
    missing = [_where(r) for r in compiled if r["dtype"] != "float32" and r["kernel"] not in ELEMENTWISE_KERNELS
               and not (r["mma_sync"] or r["wgmma"])]
    assert not missing, missing


def test_large_gemm_tiles_use_wgmma_on_hopper(compiled):
    big = [r for r in compiled if r["arch"] == "sm90" and r["kernel"] == "lora_gemm_kernel"
           and r["dtype"] != "float32" and r["config"].get("BLOCK_M", 0) >= 64]
    assert big and all(r["wgmma"] for r in big), [_where(r) for r in big if not r["wgmma"]]
