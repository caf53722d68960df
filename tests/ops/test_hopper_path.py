"""Tier 2: the linear ops' Hopper GEMM (fastpeft/kernels/lora_tma.py: TMA descriptors, persistent tile order), run
by the Triton interpreter with the kernels chosen for sm_90 (`compiling_for(90)`, as on an H100).

The LoRA, DoRA and IA3 ops under the fused strategy go through tests.harness.check_op (forward and every
gradient vs float64, outputs poisoned) with the Hopper GEMM spied on: it must run for the forward and for dX
(with the dropout mask), and nowhere its variant does not cover. Then: bit-for-bit the result of the sm_80 GEMM
on the same tiles, and the rules that send a call to it or keep it on the pointer GEMM.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from tests.harness import HAS_TRITON, check_op, needs_triton
from tests.ops.test_dora_op import _make as dora_inputs
from tests.ops.test_lora_op import Case

pytestmark = needs_triton
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _hopper_fused():
    """Kernels chosen for sm_90, the fused strategy, the shrink as its own kernel (so the GEMM is the base one)."""
    if not HAS_TRITON:
        yield
        return
    from fastpeft.kernels._tiles import compiling_for

    with compiling_for(90), fp.ops.use_kernel_options(linear_strategy="fused", fused_shrink=False):
        yield


@pytest.fixture
def tma_calls(monkeypatch):
    """The keyword arguments of every call of the Hopper GEMM's launcher."""
    from fastpeft.kernels import lora_tma

    calls: list[dict] = []
    real = lora_tma.gemm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_tma, "gemm", spy)
    return calls


# M >= 128 rows (lora_tma.TMA_MIN_ROWS), K and N multiples of 8 (16-byte rows of half precision for TMA)
LORA_CASES = {
    "bias": Case(150, 48, 40, 5, bias=True),
    "dropout": Case(133, 56, 24, 20, dropout_p=0.3),
    "two_rank_chunks": Case(140, 40, 72, 70),
    "fan_in_fan_out": Case(130, 24, 40, 6, bias=True, fan_in_fan_out=True),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case_id", list(LORA_CASES))
def test_lora_on_the_hopper_gemm_matches_float64(case_id, dtype, tma_calls):
    case = LORA_CASES[case_id]
    check_op(fp.ops.lora_linear, case.make, dtype)
    assert len(tma_calls) == 2, "the Hopper GEMM runs the forward and dX"
    forward, dx = tma_calls
    assert forward["seed"] is None and (dx["seed"] is not None) == bool(case.dropout_p)  # dX carries the mask


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_dora_forward_on_the_hopper_gemm_matches_float64(dtype, tma_calls):
    """The forward (column scale, Z kept) runs there; dX scales its dY tiles in the K loop, so it does not."""
    check_op(fp.ops.dora_linear, dora_inputs(150, 48, 40, 4), dtype)
    assert tma_calls and all(c["out_scale"] is not None and c["z"] is not None for c in tma_calls)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ia3_output_scaling_on_the_hopper_gemm_matches_float64(dtype, tma_calls):
    g = torch.Generator().manual_seed(3)

    def make(dt):
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        return dict(x=rnd(144, 32).to(dt).requires_grad_(), weight=(rnd(48, 32) / 6).to(dt),
                    bias=rnd(48).to(dt).requires_grad_(), in_scale=None,
                    out_scale=(rnd(48) + 1).to(dt).requires_grad_())

    check_op(fp.ops.ia3_linear, make, dtype)
    assert tma_calls and all(c["out_scale"] is not None and c["s"] is None for c in tma_calls)


@pytest.mark.parametrize("variant", ["plain", "masked", "column_scale", "conv1d"])
def test_same_bits_as_the_pointer_gemm(variant):
    """On the same tiles (the interpreter's one config) both GEMMs add the same products in the same order."""
    from fastpeft.kernels import lora
    from fastpeft.kernels._tiles import compiling_for

    g = torch.Generator().manual_seed(11)
    M, K, N, R, dt = 131, 40, 56, 9, torch.bfloat16
    x = torch.randn(M, K, generator=g).to(dt)
    w = torch.randn(N, K, generator=g).to(dt)
    w_kn = w.t().contiguous() if variant == "conv1d" else w.t()
    e_rn, s, scale = torch.randn(R, N, generator=g), torch.randn(M, R, generator=g), torch.rand(R, generator=g)
    bias = torch.randn(N, generator=g).to(dt)
    extra = {}
    if variant == "masked":
        extra = dict(seed=torch.tensor(7), threshold=-1717986918, inv_keep=1 / 0.9)
    if variant == "column_scale":
        extra = dict(out_scale=torch.rand(N, generator=g) + 0.5, z=None)
    outs = []
    for cc in (80, 90):
        out = torch.full((M, N), float("nan"), dtype=dt)
        z = torch.full((M, N), float("nan"), dtype=dt) if variant == "column_scale" else None
        with compiling_for(cc):
            lora.gemm(x, w_kn, bias, e_rn, scale, out, s=s, **{**extra, **({"z": z} if z is not None else {})})
        outs += [out] + ([z] if z is not None else [])
    half = len(outs) // 2
    for a, b in zip(outs[:half], outs[half:]):
        assert not a.isnan().any() and torch.equal(a, b)


def test_which_calls_take_the_hopper_gemm():
    from fastpeft.kernels.lora_tma import applies, tma_layout

    x = torch.empty(256, 64, dtype=torch.bfloat16)
    w = torch.empty(96, 64, dtype=torch.bfloat16)
    assert tma_layout(w.t()) == "cols" and tma_layout(w) == "rows"
    assert tma_layout(torch.empty(64, 30, dtype=torch.bfloat16)) is None  # 60-byte rows
    assert tma_layout(torch.empty(64, 32, dtype=torch.bfloat16)[:, 1:17]) is None  # base off 16-byte alignment
    plain = dict(fused=False, extras=False)
    assert applies(x, w.t(), 90, **plain) and applies(x, w.t().contiguous(), 90, **plain)
    assert not applies(x, w.t(), 80, **plain) and not applies(x, w.t(), None, **plain)  # sm_80, the interpreter
    assert not applies(x, w.t(), 90, fused=True, extras=False)  # the shrink in the K loop
    assert not applies(x, w.t(), 90, fused=False, extras=True)  # an input scale / reduction in the K loop
    assert not applies(x[:100], w.t(), 90, **plain)  # fewer rows than TMA_MIN_ROWS
    assert not applies(x.float(), w.t().float(), 90, **plain)  # float32 stays on the pointer GEMM
    assert not applies(x.t().contiguous().t(), w.t(), 90, **plain)  # column-major X
