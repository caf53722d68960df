"""Tiling helpers the kernel families share: size buckets, power-of-two blocks, the GEMM tile configs, the
shared-memory fit of a pipelined config, and the grouped launch order of a GEMM's tiles."""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from functools import lru_cache

import torch

from ._compat import interpreting, tl, triton

# Bytes of shared memory one block may use (the opt-in limit), by compute capability: the architectures the
# ahead-of-time gate compiles for. A GPU at run time reports its own (shared_memory_per_block_optin).
SHARED_PER_BLOCK = {80: 166912, 90: 232448}
EPILOGUE_ROOM = 19 * 1024  # left free of pipelined operand tiles for the epilogue's layout conversions
_TARGET = contextvars.ContextVar("fastpeft_compile_target", default=None)


@contextmanager
def compiling_for(capability: int):
    """Prune configs for compute capability `capability` (e.g. 90) instead of the current GPU's: the
    ahead-of-time compile runs the kernels' own pruning for each target it compiles."""
    token = _TARGET.set(capability)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_capability(t: torch.Tensor) -> int | None:
    """The compute capability kernels are chosen for (e.g. 90): the one being compiled for ahead of time, else
    that of the CUDA device `t` lies on; None for a CPU tensor (the interpreter)."""
    target = _TARGET.get()
    if target is not None:
        return target
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


@lru_cache(maxsize=None)
def _device_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0)) or SHARED_PER_BLOCK[80]


def shared_budget() -> int:
    """Bytes of pipelined operand tiles one block may hold on the target: its per-block limit less the
    epilogue's room (sm_80: 144 KiB of 163; sm_90: 208 KiB of 227; sm_86/89: 80 KiB of 99)."""
    target = _TARGET.get()
    if target is not None:
        limit = SHARED_PER_BLOCK[target]
    elif torch.cuda.is_available():
        limit = _device_limit(torch.cuda.current_device())
    else:
        limit = SHARED_PER_BLOCK[80]
    return limit - EPILOGUE_ROOM


def bucket(n: int) -> int:
    """Autotune key for a size that varies call to call (token count): its power-of-two bucket."""
    return triton.next_power_of_2(max(int(n), 1))


def pow2_at_least_16(n: int, cap: int) -> int:
    """n's power-of-two bucket, at least 16 (the smallest tensor-core dot dimension) and at most `cap`."""
    return max(16, min(cap, bucket(n)))


def gemm_configs():
    """What autotune may pick for the GEMM kernels (LoRA, IA3, multi-adapter IA3); tests compile every one ahead
    of time. Under the interpreter a single small config keeps the CPU tests fast and exercises partial tiles."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5),
        (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


MIN_BLOCK_M = 16  # the smallest BLOCK_M of gemm_configs(): bounds the number of row blocks


def fit_shared(configs, stage_bytes):
    """Each config with its pipeline depth cut so that stages × stage_bytes(config) fits shared_budget();
    configs that cannot hold two stages are dropped (float32 operands need half the depth of bf16)."""
    fitted, budget = {}, shared_budget()
    for c in configs:
        stages = min(c.num_stages, budget // stage_bytes(c))
        if stages >= 2:
            key = (tuple(sorted(c.kwargs.items())), c.num_warps, stages)
            fitted.setdefault(key, triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages))
    return list(fitted.values())


def strides2(t):
    """(stride 0, stride 1) of a 2-D operand, or (0, 0) for an absent one (its pointer never dereferenced)."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped launch order: GROUP_M row tiles share each column strip
    of W while it sits in L2."""
    return tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number `pid` of a num_m x num_n grid, in grouped order."""
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group
