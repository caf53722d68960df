"""The Triton dropout mask (fastpeft/kernels/dropout.py) under the interpreter: the reference's bits, good statistics.

A small test kernel stores the keep mask (and the raw hash) of an (M, N) grid through `row_keys` and `keep_tile`,
exactly as the LoRA kernels call them; it is compared bit for bit with fastpeft.reference.dropout and with the
documented formula computed in plain Python.
"""
from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastpeft.kernels.dropout import keep_tile, mix32, row_keys  # noqa: E402
from fastpeft.reference import dropout as ref  # noqa: E402

BLOCK_M, BLOCK_N = 16, 32


@triton.jit
def _mask_kernel(seed_ptr, keep_ptr, hash_ptr, M, N, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    key = row_keys(seed_ptr, rm)
    keep = keep_tile(key, rn, threshold)
    h = mix32(rn.to(tl.uint32)[None, :] ^ key[:, None]).to(tl.int32, bitcast=True)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=inside)
    tl.store(hash_ptr + offs, h, mask=inside)


def triton_mask(seed: int, M: int, N: int, p: float, *, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(keep as bool, hash as int32) from the Triton functions; outputs start as garbage so unwritten cells show."""
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    keep = torch.full((M, N), 7, dtype=torch.int8, device=device)
    hashes = torch.full((M, N), 12345, dtype=torch.int32, device=device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _mask_kernel[grid](seed_t, keep, hashes, M, N, ref.keep_threshold(p), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    assert set(keep.unique().tolist()) <= {0, 1}, "cells left unwritten"
    return keep.bool().cpu(), hashes.cpu()


def _lowbias32(h: int) -> int:
    """The documented mixer in plain Python integers (uint32)."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _signed(h: int) -> int:
    return h - (1 << 32) if h >= 1 << 31 else h


SEEDS = [0, 1, 12345, 2**31 - 1, 2**31 + 5, 2**40 + 7, -3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (17, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_mask_is_bit_identical_to_reference(shape, seed, kernel_device):
    """Same keep bits and same raw hashes as fastpeft.reference.dropout, partial tiles included."""
    M, N = shape
    keep, hashes = triton_mask(seed, M, N, 0.3, device=kernel_device)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    assert torch.equal(keep, ref.keep_mask(seed_t, M, N, 0.3))
    row_key = ref.mix32(torch.arange(M, dtype=torch.int32) ^ ref.mix32((seed_t & 0x7FFFFFFF).to(torch.int32)))
    want_hash = ref.mix32(torch.arange(N, dtype=torch.int32)[None, :] ^ row_key[:, None])
    assert torch.equal(hashes, want_hash)


@pytest.mark.parametrize("seed", [0, 77, 2**31 + 9])
def test_both_masks_follow_the_documented_formula(seed, kernel_device):
    """keep[m, k] = mix32(k ^ mix32(m ^ mix32(seed & 0x7FFFFFFF))) >= round(p·2³²) − 2³¹, in plain Python."""
    M, N, p = 5, 7, 0.45
    keep, hashes = triton_mask(seed, M, N, p, device=kernel_device)
    t = round(p * 2**32) - 2**31
    s = _lowbias32(seed & 0x7FFFFFFF)
    for m in range(M):
        row = _lowbias32(m ^ s)
        for k in range(N):
            h = _signed(_lowbias32(k ^ row))
            assert hashes[m, k].item() == h and keep[m, k].item() == (h >= t), (m, k)
    assert torch.equal(ref.keep_mask(torch.tensor(seed), M, N, p), keep)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(p, kernel_device):
    """The kept fraction is 1 − p within 4 standard errors (in total and per row block)."""
    M, N = 128, 256
    keep, _ = triton_mask(2024, M, N, p, device=kernel_device)
    n = keep.numel()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * se
    per_row = keep.float().mean(1)  # every row on its own, looser: 256 samples each
    se_row = math.sqrt(p * (1 - p) / N)
    assert (per_row - (1 - p)).abs().max().item() < 5 * se_row


@pytest.mark.parametrize("p", [0.0, 1e-12])
def test_tiny_p_keeps_everything(p, kernel_device):
    """p = 0 (threshold −2³¹, the int32 minimum) keeps every element; so does a p below one part in 2³²."""
    keep, _ = triton_mask(5, 20, 40, p, device=kernel_device)
    assert keep.all()
    assert ref.keep_mask(torch.tensor(5), 20, 40, p).all()


def _agreement_bounds(p: float, n: int) -> tuple[float, float]:
    """Range (4 standard errors) of the fraction of equal cells between two independent keep masks."""
    q = p * p + (1 - p) * (1 - p)
    se = math.sqrt(q * (1 - q) / n)
    return q - 4 * se, q + 4 * se


def test_same_seed_same_mask_different_seed_different_mask(kernel_device):
    """Deterministic per seed; another seed gives an independent-looking mask (agreement ≈ p² + (1−p)²)."""
    M, N, p = 64, 96, 0.5
    a, _ = triton_mask(11, M, N, p, device=kernel_device)
    assert torch.equal(a, triton_mask(11, M, N, p, device=kernel_device)[0])
    lo, hi = _agreement_bounds(p, M * N)
    for other in (12, 11 + 2**31):  # a neighbouring seed, and one that differs only in bit 31 (ignored by design)
        b, _ = triton_mask(other, M, N, p, device=kernel_device)
        if other == 11 + 2**31:
            assert torch.equal(a, b), "bit 31 and above of the seed are masked off"
        else:
            assert lo < (a == b).float().mean().item() < hi


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_rows_and_columns_are_not_trivially_correlated(p, kernel_device):
    """Row m and m+1 (and column k and k+1) differ and agree only as often as independent masks would."""
    M, N = 96, 128
    keep, _ = triton_mask(31337, M, N, p, device=kernel_device)
    for m in range(M - 1):
        assert not torch.equal(keep[m], keep[m + 1]), f"rows {m} and {m + 1} are equal"
    for k in range(N - 1):
        assert not torch.equal(keep[:, k], keep[:, k + 1]), f"columns {k} and {k + 1} are equal"
    lo, hi = _agreement_bounds(p, (M - 1) * N)
    assert lo < (keep[1:] == keep[:-1]).float().mean().item() < hi
    lo, hi = _agreement_bounds(p, M * (N - 1))
    assert lo < (keep[:, 1:] == keep[:, :-1]).float().mean().item() < hi
    # a row is not a shifted copy of the previous one (a common failure of weak counter hashes)
    lo, hi = _agreement_bounds(p, (M - 1) * (N - 1))
    assert lo < (keep[1:, 1:] == keep[:-1, :-1]).float().mean().item() < hi
