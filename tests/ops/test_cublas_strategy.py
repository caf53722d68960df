"""Tier 2: the cuBLAS-base strategy of the linear ops and the strategy table that picks it.

The base product runs on torch.mm/addmm (cuBLAS on a GPU), the adapter's terms in the one small kernel of
fastpeft/kernels/lora_update.py (interpreter on CPU). Each case: forward and every gradient vs float64 with
outputs poisoned (tests.harness.check_op), the kernels that ran spied on: the update kernel, never the fused GEMM.
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch

import fastpeft as fp
from fastpeft.errors import InputError
from fastpeft.kernels.limits import UPDATE_MAX_RANK
from fastpeft.ops import strategy
from tests.harness import HAS_TRITON, check_op, needs_triton
from tests.ops.test_dora_op import CASES as DORA_CASES
from tests.ops.test_dora_op import _make as dora_inputs
from tests.ops.test_ia3_op import CASES as IA3_CASES
from tests.ops.test_lora_op import CASES as LORA_CASES
from tests.ops.test_lora_op import EXTRA_CASES as LORA_EXTRA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cublas_strategy():
    with fp.ops.use_kernel_options(linear_strategy="cublas"):
        yield


@pytest.fixture
def launches(monkeypatch):
    """(launcher, keyword arguments) of every call into kernels/lora_update.py and kernels/lora.py."""
    calls: list[tuple[str, dict]] = []
    if not HAS_TRITON:
        return calls
    for module, names in (("lora_update", ("update",)), ("lora", ("gemm", "shrink", "reduce"))):
        kern = importlib.import_module(f"fastpeft.kernels.{module}")
        for name in names:
            real = getattr(kern, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                calls.append((_name, kwargs))
                return _real(*args, **kwargs)

            monkeypatch.setattr(kern, name, spy)
    return calls


LORA_GRID = [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in LORA_CASES for d in DTYPES] + [
    pytest.param(c, torch.bfloat16, id=f"{c}-bfloat16") for c in LORA_EXTRA]


@needs_triton
@pytest.mark.parametrize("case_id,dtype", LORA_GRID)
def test_lora_matches_float64(case_id, dtype, launches):
    case = LORA_CASES.get(case_id) or LORA_EXTRA[case_id]
    check_op(fp.ops.lora_linear, case.make, dtype)
    updates = [kw for name, kw in launches if name == "update"]
    if case.R > UPDATE_MAX_RANK:  # ranks the update kernel cannot hold in registers run the fused strategy
        assert not updates and any(name == "gemm" for name, _ in launches)
        return
    assert "gemm" not in [name for name, _ in launches], "the cuBLAS-base strategy ran the fused GEMM"
    assert updates, "the adapter kernel did not run"
    assert updates[0].get("mask_out", False) is False
    if case.dropout_p and "x" in case.grads:  # the dX update masks the low-rank term of its output
        assert any(kw.get("mask_out") and kw.get("seed") is not None for kw in updates)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", list(DORA_CASES))
def test_dora_matches_float64(case_id, dtype, launches):
    M, K, N, R, kw = DORA_CASES[case_id]
    check_op(fp.ops.dora_linear, dora_inputs(M, K, N, R, **kw), dtype)
    updates = [kw for name, kw in launches if name == "update"]
    if R > UPDATE_MAX_RANK:  # ranks the update kernel cannot hold in registers run the fused strategy
        assert not updates and any(name == "gemm" for name, _ in launches)
        return
    assert "gemm" not in [name for name, _ in launches]
    assert updates and updates[0].get("out_scale") is not None and updates[0].get("z") is not None


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", list(IA3_CASES))
def test_ia3_matches_float64(case_id, dtype, launches):
    """IA3's cuBLAS-base strategy is the reference's formula (GEMM on cuBLAS, scales as elementwise passes)."""
    check_op(fp.ops.ia3_linear, IA3_CASES[case_id].make, dtype)
    assert not launches


@needs_triton
def test_decode_rows_spread_over_column_splits():
    from fastpeft.kernels.lora_update import column_splits

    assert column_splits(1, 4096, 264) == 32  # one row block: 32 column ranges of 128
    assert column_splits(16384, 4096, 264) == 1
    assert 1 < column_splits(256, 14336, 264) <= 112


def test_row_buckets():
    assert [strategy.row_bucket(m) for m in (1, 2, 16, 17, 4096, 5000, 10**6)] == [1, 16, 16, 256, 4096, 16384,
                                                                                    16384]


def test_table_lookup(tmp_path, monkeypatch):
    path = tmp_path / "strategies.json"
    table = strategy.record({}, "NVIDIA H100 80GB HBM3", "bfloat16", "lora_linear", {16: "fused", 4096: "fused"})
    strategy.write_table(table, path, source="test")
    monkeypatch.setattr(strategy, "load_table", lambda: json.loads(path.read_text())["devices"])
    monkeypatch.setattr(strategy, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    with fp.ops.use_kernel_options(linear_strategy=None):
        assert strategy.choose_strategy("lora_linear", cuda, torch.bfloat16, 9)[0] == "fused"
        choice, why = strategy.choose_strategy("lora_linear", cuda, torch.bfloat16, 100)
        assert choice == "cublas" and "no entry" in why and "M <= 256" in why
        assert strategy.choose_strategy("lora_linear", cuda, torch.float16, 9)[0] == "cublas"
        assert strategy.choose_strategy("ia3_linear", cuda, torch.bfloat16, 9)[0] == "cublas"
    assert strategy.choose_strategy("lora_linear", cuda, torch.bfloat16, 9) == (
        "cublas", "pinned by use_kernel_options(linear_strategy=...)")


def test_committed_table_is_valid():
    for device, dtypes in strategy.load_table().items():
        for dtype, ops in dtypes.items():
            assert dtype in ("bfloat16", "float16", "float32"), (device, dtype)
            for op, buckets in ops.items():
                assert op in ("lora_linear", "dora_linear", "ia3_linear"), (device, op)
                assert all(int(b) in strategy.ROW_BUCKETS and s in strategy.STRATEGIES for b, s in buckets.items())


def test_bad_records_and_pins_are_refused():
    with pytest.raises(ValueError, match="row bucket"):
        strategy.record({}, "dev", "bfloat16", "lora_linear", {17: "fused"})
    with pytest.raises(InputError, match="linear_strategy='fast'.*'fused', 'cublas'"):
        with fp.ops.use_kernel_options(linear_strategy="fast"):
            pass
