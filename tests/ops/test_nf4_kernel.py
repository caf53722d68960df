"""Tier 2: the 4-bit base-weight GEMM (fastpeft/kernels/nf4.py) under the interpreter on CPU, against float64.

W is quantized by bitsandbytes itself (NF4 and FP4, blocksize 32/64/128, with and without double quantization) and
the oracle dequantizes it with bitsandbytes' own `dequantize_4bit`, rounds it to x's dtype as Linear4bit's forward
does, and computes the forward / dX formula in float64 (the dropout mask of dX from fastpeft/reference/dropout.py,
which the LoRA kernels share). Shapes are odd on purpose: M = 1, 7, 33; K not a multiple of the block size (blocks
span rows) or odd; N not a multiple of the tile; ranks 1 to 80. Every output is poisoned with NaN before the call.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fastpeft.reference.dropout import keep_mask, keep_threshold
from tests.harness import TOLERANCE, needs_triton, rel_err

bnb_functional = pytest.importorskip("bitsandbytes.functional")
pytestmark = needs_triton

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _nf4():
    from fastpeft.kernels import nf4

    return nf4


@dataclass
class Quantized:
    """A random W (N, K) quantized by bitsandbytes, the kernel's arguments for it, and bitsandbytes' dequantization."""
    packed: torch.Tensor
    state: object
    dequantized: torch.Tensor  # bitsandbytes' dequantize_4bit: the quant state's dtype

    def kernel_args(self) -> dict:
        qs = self.state
        args = dict(packed=self.packed, absmax=qs.absmax, code=qs.code, shape=tuple(qs.shape), blocksize=qs.blocksize,
                    w_dtype=qs.dtype)
        if qs.nested:
            args.update(absmax_code=qs.state2.code, absmax_scale=qs.state2.absmax, absmax_offset=float(qs.offset),
                        blocksize2=qs.state2.blocksize)
        return args


def quantize(N: int, K: int, blocksize: int, quant_type: str, nested: bool, w_dtype: torch.dtype) -> Quantized:
    g = torch.Generator().manual_seed(N * 131 + K * 7 + blocksize)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(w_dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    assert state.nested == nested and state.dtype == w_dtype
    return Quantized(packed, state, bnb_functional.dequantize_4bit(packed, state))


@dataclass
class Case:
    M: int
    N: int
    K: int
    blocksize: int
    quant_type: str
    nested: bool
    x_dtype: torch.dtype
    w_dtype: torch.dtype
    R: int = 0  # 0: no low-rank term
    bias: bool = False
    dropout_p: float = 0.0  # dX only


FORWARD = {
    "blocks_span_rows_nested": Case(33, 96, 200, 64, "nf4", True, BF16, BF16, R=16, bias=True),
    "blocksize32_fp4": Case(7, 100, 72, 32, "fp4", False, FP16, BF16, R=8, bias=True),
    "m1_r1_fp32": Case(1, 72, 128, 128, "nf4", True, FP32, FP32, R=1),
    "odd_k_r64": Case(7, 96, 33, 64, "fp4", True, BF16, FP16, R=64),
    "plain_bias": Case(33, 100, 256, 128, "nf4", False, FP16, FP16, bias=True),
    "r80_two_chunks": Case(1, 96, 200, 128, "fp4", False, FP32, BF16, R=80),
    "plain_nested": Case(16, 72, 64, 64, "nf4", True, BF16, BF16),
}
BACKWARD = {
    "blocks_span_rows_masked": Case(33, 96, 200, 64, "nf4", True, BF16, BF16, R=16, dropout_p=0.3),
    "scale_groups_masked": Case(7, 100, 128, 32, "fp4", False, FP16, BF16, R=8, dropout_p=0.5),
    "m1_r1_fp32_masked": Case(1, 72, 128, 128, "nf4", True, FP32, FP32, R=1, dropout_p=0.1),
    "odd_k_r64_masked": Case(7, 96, 33, 64, "fp4", True, BF16, FP16, R=64, dropout_p=0.3),
    "plain": Case(33, 100, 256, 128, "nf4", False, FP16, FP16),
    "r80_p0": Case(7, 72, 200, 128, "fp4", False, FP32, BF16, R=80),
}


def _inputs(case: Case, transpose_w: bool):
    """x (or dY), S, scale, E (a strided view, as the op layer passes Bᵀ), bias, seed: random, never zero."""
    g = torch.Generator().manual_seed(case.M * 7919 + case.K * 31 + case.R)
    depth, cols = (case.N, case.K) if transpose_w else (case.K, case.N)
    x = torch.randn(case.M, depth, generator=g).to(case.x_dtype)
    lowrank = {}
    if case.R:
        e_storage = torch.randn(cols, case.R, generator=g).to(case.x_dtype)  # B (N, R) or Aᵀ stored (K, R)
        lowrank = dict(s=torch.randn(case.M, case.R, generator=g), scale=torch.rand(case.R, generator=g) + 0.5,
                       e=e_storage.t())
    bias = torch.randn(case.N, generator=g).to(case.x_dtype) if case.bias else None
    seed = torch.tensor(4242 + case.M, dtype=torch.int64) if case.dropout_p else None
    return x, lowrank, bias, seed


def _expected(case: Case, q: Quantized, x, lowrank, bias, seed, transpose_w: bool) -> torch.Tensor:
    """The formula in float64, with W as Linear4bit multiplies it: bitsandbytes' dequantization in x's dtype."""
    w = q.dequantized.to(case.x_dtype).double()
    out = x.double() @ (w if transpose_w else w.t())
    if lowrank:
        term = (lowrank["s"].double() * lowrank["scale"].double()) @ lowrank["e"].double()
        if seed is not None:
            term = term * keep_mask(seed, case.M, case.K, case.dropout_p).double() / (1.0 - case.dropout_p)
        out = out + term
    if bias is not None:
        out = out + bias.double()
    return out


def _run(case: Case, transpose_w: bool) -> float:
    q = quantize(case.N, case.K, case.blocksize, case.quant_type, case.nested, case.w_dtype)
    x, lowrank, bias, seed = _inputs(case, transpose_w)
    cols = case.K if transpose_w else case.N
    out = torch.full((case.M, cols), float("nan"), dtype=case.x_dtype)
    got = _nf4().nf4_gemm(x, **q.kernel_args(), transpose_w=transpose_w, **lowrank, bias=bias, seed=seed,
                          dropout_p=case.dropout_p, out=out)
    assert got is out and out.dtype == case.x_dtype
    err = rel_err(out, _expected(case, q, x, lowrank, bias, seed, transpose_w))
    assert err <= TOLERANCE[case.x_dtype], f"relative error {err:.3e} > {TOLERANCE[case.x_dtype]:.0e}"
    return err


@pytest.mark.parametrize("case_id", FORWARD)
def test_forward_matches_float64(case_id):
    """OUT = x deq(W)ᵀ + bias + (S ⊙ s) E."""
    _run(FORWARD[case_id], transpose_w=False)


@pytest.mark.parametrize("case_id", BACKWARD)
def test_dx_matches_float64(case_id):
    """dX = dY deq(W) + mask ⊙ ((G ⊙ s) A), the mask the LoRA kernels regenerate from the seed."""
    _run(BACKWARD[case_id], transpose_w=True)


def test_dropout_mask_is_applied():
    """The masked dX differs from the unmasked one exactly on the low-rank term's dropped elements."""
    case = BACKWARD["scale_groups_masked"]
    q = quantize(case.N, case.K, case.blocksize, case.quant_type, case.nested, case.w_dtype)
    x, lowrank, _, seed = _inputs(case, True)
    nf4 = _nf4()
    masked = nf4.nf4_gemm(x, **q.kernel_args(), transpose_w=True, **lowrank, seed=seed, dropout_p=0.5)
    base = nf4.nf4_gemm(x, **q.kernel_args(), transpose_w=True)
    dropped = ~keep_mask(seed, case.M, case.K, 0.5)
    assert dropped.any() and (~dropped).any()
    assert torch.equal(masked[dropped], base[dropped])
    assert not torch.equal(masked[~dropped], base[~dropped])


EXACT = [  # (quant type, double quantization, W's dequantization dtype, x's dtype)
    ("nf4", True, BF16, BF16), ("fp4", False, FP16, FP32), ("nf4", False, FP32, FP16), ("fp4", True, BF16, FP16),
]


@pytest.mark.parametrize("quant_type,nested,w_dtype,x_dtype", EXACT,
                         ids=[f"{t}-{'nested' if n else 'plain'}-{str(w)[6:]}-x_{str(x)[6:]}" for t, n, w, x in EXACT])
@pytest.mark.parametrize("shape", [(24, 100, 64), (30, 33, 32), (20, 128, 32)], ids=["spanning", "odd_k", "groups"])
def test_weight_is_rounded_as_bitsandbytes_does(quant_type, nested, w_dtype, x_dtype, shape):
    """With x the identity, the kernel's W is bitsandbytes' dequantize_4bit(W).to(x.dtype), bit for bit, in both
    directions: the scales decoded, the products rounded to the dequantization dtype and then to x's."""
    N, K, blocksize = shape
    q = quantize(N, K, blocksize, quant_type, nested, w_dtype)
    want = q.dequantized.to(x_dtype)
    nf4 = _nf4()
    forward = torch.full((K, N), float("nan"), dtype=x_dtype)
    nf4.nf4_gemm(torch.eye(K, dtype=x_dtype), **q.kernel_args(), out=forward)
    assert torch.equal(forward, want.t())
    dx = torch.full((N, K), float("nan"), dtype=x_dtype)
    nf4.nf4_gemm(torch.eye(N, dtype=x_dtype), **q.kernel_args(), transpose_w=True, out=dx)
    assert torch.equal(dx, want)


def test_strided_input_and_new_output():
    """x a column slice of a wider tensor; no `out`: a new tensor of x's dtype."""
    q = quantize(40, 64, 64, "nf4", False, BF16)
    wide = torch.randn(9, 100).to(BF16)
    x = wide[:, 10:74]
    got = _nf4().nf4_gemm(x, **q.kernel_args())
    assert got.shape == (9, 40) and got.dtype == BF16
    want = x.double() @ q.dequantized.double().t()
    assert rel_err(got, want) <= TOLERANCE[BF16]


def test_empty_batch():
    q = quantize(8, 64, 64, "nf4", False, BF16)
    assert _nf4().nf4_gemm(torch.empty(0, 64, dtype=BF16), **q.kernel_args()).shape == (0, 8)


def test_keep_threshold_is_the_reference():
    nf4 = _nf4()
    for p in (0.0, 0.1, 0.3, 0.5, 0.999):
        assert nf4.keep_threshold(p) == keep_threshold(p)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(3, 65)), "needs 64"),
    (dict(x=torch.randn(3, 64, dtype=torch.float64)), "float16/bfloat16/float32"),
    (dict(shape=(9, 64)), "packed must be"),
    (dict(blocksize=48), "power of two"),
    (dict(code=torch.zeros(8)), "16-entry"),
    (dict(absmax=torch.zeros(3)), "absmax must hold"),
    (dict(absmax=torch.zeros(8, dtype=torch.uint8)), "absmax_code"),
    (dict(s=torch.zeros(3, 4)), "together"),
    (dict(seed=torch.tensor(1), dropout_p=0.1), "dX"),
    (dict(bias=torch.zeros(8), transpose_w=True, x=torch.randn(3, 8)), "forward only"),
    (dict(out=torch.empty(3, 9)), "out must be"),
    (dict(w_dtype=torch.int8), "w_dtype"),
])
def test_rejects_bad_arguments(change, message):
    """Validation on the host, before any launch, with what was wrong."""
    q = quantize(8, 64, 64, "nf4", False, FP32)
    args = dict(x=torch.randn(3, 64), **q.kernel_args())
    args.update(change)
    with pytest.raises(ValueError, match=message):
        _nf4().nf4_gemm(args.pop("x"), **args)
