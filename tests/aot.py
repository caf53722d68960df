"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

An op's launcher is called on small CPU tensors with kernel launches captured instead of run; each captured
launch is compiled for every autotune config with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`, specialised as the JIT specialises it (integers equal to 1 become constants; pointers and multiples of
16 get the divisibility hint). Results: shared memory, and whether the PTX uses tensor-core instructions.

This runs in its own process (`python -m tests.aot sm80 sm90`): a process that imported triton under
TRITON_INTERPRET=1 holds interpreter versions of triton's own library functions and cannot compile.
Adding a kernel family to the check is one entry in CATALOG.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = {"sm80": 80, "sm90": 90}
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
              torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1", torch.float64: "fp64"}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Launch:
    kernel: object          # Autotuner or JITFunction
    args: tuple
    kwargs: dict
    label: str = ""
    every_config: bool = True  # False: only the first config (a variant whose tiles another launch covers)

    @property
    def jit(self):
        from triton.runtime.jit import JITFunction

        return self.kernel if isinstance(self.kernel, JITFunction) else self.kernel.fn  # Autotuner: its .fn

    @property
    def configs(self) -> list:
        """The configs autotune may pick for this launch: the kernel's list after its own pruning."""
        import triton

        default = triton.Config({}, num_warps=self.kwargs.get("num_warps", 4),  # a plain kernel: its launch's
                                num_stages=self.kwargs.get("num_stages", 3))     # warps and stages
        configs = list(getattr(self.kernel, "configs", None) or [default])
        prune = getattr(self.kernel, "early_config_prune", None)
        if prune is not None and len(configs) > 1:
            configs = prune(configs, dict(zip(self.jit.arg_names, self.args)), **self.kwargs)
        return configs


@contextlib.contextmanager
def recording(label: str = "", every_config: bool = True):
    """Inside the block, every kernel launch of fastpeft.kernels.* is recorded (into the list it yields) instead
    of run."""
    launches: list[Launch] = []

    def fake_launch(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *a, **kw: launches.append(Launch(kernel, a, kw, label, every_config))

        return Grid()

    launching = [m for name, m in sorted(sys.modules.items())
                 if name.startswith("fastpeft.kernels.") and hasattr(m, "launch")]
    originals = [m.launch for m in launching]
    for m in launching:
        m.launch = fake_launch
    try:
        yield launches
    finally:
        for m, original in zip(launching, originals):
            m.launch = original


def capture(module: str, launcher: str, *args, label: str = "", every_config: bool = True,
            **kwargs) -> list[Launch]:
    """Call `fastpeft.kernels.<module>.<launcher>(*args, **kwargs)`, recording its launches instead of running
    (those of the launchers it delegates to in other kernel modules too)."""
    mod = importlib.import_module(f"fastpeft.kernels.{module}")
    with recording(label, every_config) as launches:
        getattr(mod, launcher)(*args, **kwargs)
    return launches


# ---------------------------------------------------------------------------------------------------------------
# The catalog: for each kernel family, launches that cover every kernel variant (one line per variant).
# ---------------------------------------------------------------------------------------------------------------

def lora_launches(dtype: torch.dtype) -> list[Launch]:
    M, K, N, R = 256, 512, 384, 16  # multiples of 16 specialise like real model shapes
    x, dy = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype)
    w, bias = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
    a, b, scale, s = torch.empty(R, K), torch.empty(N, R), torch.empty(R), torch.empty(M, R)
    out, dx = torch.empty(M, N, dtype=dtype), torch.empty(M, K, dtype=dtype)
    drop = dict(seed=torch.zeros((), dtype=torch.int64), threshold=-1717986918, inv_keep=1.1111)
    return [
        *capture("lora", "gemm", x, w.t(), bias, b.t(), scale, out, s=s, u_kr=a.t(), write_s=True, label="fwd fused"),
        *capture("lora", "gemm", x, w.t(), bias, b.t(), scale, out, s=s, label="fwd"),
        *capture("lora", "gemm", dy, w, None, a, scale, dx, s=s, **drop, label="dX masked"),
        *capture("lora", "shrink", x, a.t(), s, **drop, label="T masked"),
        *capture("lora", "reduce", x, s, scale, torch.empty(R, K).t(), **drop, label="dA masked"),
        *capture("lora", "reduce", dy, s, scale, torch.empty(N, R), colsum=torch.empty(N), splits=2, label="dB"),
        *capture("lora", "gemm", x, w.t(), bias, b.t(), scale, out, s=s, u_kr=a.t(), write_s=True,
                 out_scale=torch.empty(N), z=torch.empty(M, N, dtype=dtype), label="DoRA fwd fused"),
        *capture("lora", "gemm", dy, w, None, a, scale, dx, s=s, u_kr=b, write_s=True, in_scale=torch.empty(N),
                 in_dot=(torch.empty(M, N, dtype=dtype), torch.empty(N)), label="DoRA dX fused, dm"),
        # dropout with the fused shrink (small M: ops/lora.py fuses the dX GEMM's shrink whatever the dropout)
        *capture("lora", "gemm", dy, w, None, a, scale, dx, s=s, u_kr=b, write_s=True, **drop,
                 label="dX fused shrink, masked"),
        # the separate-shrink paths of DoRA (larger M): forward with the column scale, dX with mask, scale and dm
        *capture("lora", "gemm", x, w.t(), bias, b.t(), scale, out, s=s, out_scale=torch.empty(N),
                 z=torch.empty(M, N, dtype=dtype), label="DoRA fwd"),
        *capture("lora", "gemm", dy, w, None, a, scale, dx, s=s, in_scale=torch.empty(N), **drop,
                 in_dot=(torch.empty(M, N, dtype=dtype), torch.empty(N)), label="DoRA dX masked, dm"),
    ]


def ia3_launches(dtype: torch.dtype) -> list[Launch]:
    """IA3 runs the LoRA GEMM kernel with no low-rank term and its scale and reduction options on (the launcher of
    fastpeft/kernels/ia3.py)."""
    M, K, N = 256, 512, 384
    x, dy = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype)
    w, bias, z = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    u, v = torch.empty(K), torch.empty(N)
    out, dx = torch.empty(M, N, dtype=dtype), torch.empty(M, K, dtype=dtype)
    return [
        *capture("ia3", "scaled_gemm", x, w.t(), bias, out, in_scale=u, out_scale=v, scale_bias=True, z=z,
                 label="ia3 fwd"),
        *capture("ia3", "scaled_gemm", dy, w, None, dx, in_scale=v, out_scale=u, in_dot=(z, torch.empty(N)),
                 in_sum=torch.empty(N), out_dot=(x, torch.empty(K)), label="ia3 dX dv db du"),
    ]


def bottleneck_launches(dtype: torch.dtype) -> list[Launch]:
    """Wide bottlenecks (m > 256, the two-kernel path): the GEMM kernel with no base product, f(S + b) and the
    residual in its epilogue."""
    M, d, m = 256, 512, 32
    x, y = torch.empty(M, d, dtype=dtype), torch.empty(M, d, dtype=dtype)
    w_up, s = torch.empty(d, m, dtype=dtype), torch.empty(M, m)
    return [launch for act in (1, 2, 3)
            for launch in capture("lora", "gemm", x[:, :0], w_up.t()[:0], torch.empty(d, dtype=dtype), w_up.t(),
                                  torch.empty(m), y, s=s, s_act=act, s_bias=torch.empty(m, dtype=dtype),
                                  residual=torch.empty(M, d, dtype=dtype), label=f"bottleneck act {act}",
                                  every_config=act == 2)]  # the activation only changes the epilogue's math


def fused_bottleneck_launches(dtype: torch.dtype) -> list[Launch]:
    """The fused single-pass adapter kernels (fastpeft/kernels/bottleneck.py) at the widest bottleneck they take
    (m = 256: the largest tiles in registers and shared memory), every config; the variants (layer norm before,
    per-channel and learned scaling, no residual; a narrow m = 64, where tall row blocks survive the register
    prune) add a few registers and no shared memory: their first config. The backward with the layer norm after
    fused (its own register prune, and the residual's chunk in shared memory) is compiled for every config. The
    plain backward takes 64-row blocks at m = 256 only with an activation whose slope is cheap (relu here); with
    gelu_new (no 64-row blocks) its first config."""
    M, d = 256, 512
    x, r, y = (torch.empty(M, d, dtype=dtype) for _ in range(3))
    ln_w, b_up, channel = torch.empty(d, dtype=dtype), torch.empty(d, dtype=dtype), torch.empty(d)
    launches = []
    for m in (64, 256):  # the variants below use the last, m = 256
        w_down, w_up, b_down = torch.empty(m, d, dtype=dtype), torch.empty(d, m, dtype=dtype), torch.empty(m)
        s, f, ds, dsr = (torch.empty(M, m) for _ in range(4))
        stats, ln = torch.empty(M, 2), (ln_w, torch.empty(m), torch.empty(m))
        launches += [
            *capture("bottleneck", "forward", x, r, w_down, b_down, w_up, b_up, y, act=1, s=s,
                     label=f"fwd m{m}", every_config=m == 256),
            *capture("bottleneck", "backward", y, s, w_down, b_down, w_up, act=1, f=f, ds=ds, dx=x,
                     label=f"bwd m{m}", every_config=m == 256),
        ]
    launches += [
        *capture("bottleneck", "backward", y, s, w_down, b_down, w_up, act=3, f=f, ds=ds, dx=x,
                 label=f"bwd m{m} gelu_new", every_config=False),
        *capture("bottleneck", "forward", x, None, w_down, b_down, w_up, b_up, y, act=3, scale=channel, ln=ln, s=s,
                 stats=stats, label=f"fwd m{m} ln_before, channel scale", every_config=False),
        *capture("bottleneck", "backward", y, s, w_down, b_down, w_up, act=3, scale=channel, f=f, ds=ds, dx=x, x=r,
                 ln=ln, stats=stats, dsr=dsr, label=f"bwd m{m} ln_before, channel scale", every_config=False),
        *capture("bottleneck", "backward", y, s, w_down, None, w_up, act=2, scale=torch.empty(1), ds=ds, dx=x,
                 rowdot=torch.empty(M), label=f"bwd m{m} learned scale", every_config=False),
        # the layer norm after, fused: a third pass in the forward; in the backward two more dots per chunk (ẑ
        # recomputed), the residual's chunk when it was added before the norm, dz and the 16-row partial sums
        *capture("bottleneck", "forward", x, r, w_down, b_down, w_up, b_up, y, act=1, s=s, ln_after=(ln_w, b_up),
                 astats=stats, label=f"fwd m{m} ln_after, residual before it", every_config=False),
        *capture("bottleneck", "forward", x, r, w_down, b_down, w_up, b_up, y, act=3, scale=channel, ln=ln, s=s,
                 stats=stats, ln_after=(ln_w, b_up), residual_after_ln=True, astats=torch.empty(M, 2),
                 label=f"fwd m{m} ln_before, ln_after, residual after it", every_config=False),
        *capture("bottleneck", "backward", y, s, w_down, b_down, w_up, act=1, f=f, ds=ds, dx=x, ln_after=ln_w,
                 b_up=b_up, residual=r, astats=stats, dz=torch.empty(M, d, dtype=dtype),
                 part=torch.empty((M + 15) // 16, 2, d), label=f"bwd m{m} ln_after, residual before it"),
        *capture("bottleneck", "backward", y, s, w_down, b_down, w_up, act=3, scale=torch.empty(1), ds=ds, dx=x,
                 rowdot=torch.empty(M), ln_after=ln_w, b_up=b_up, astats=stats, dz=torch.empty(M, d, dtype=dtype),
                 label=f"bwd m{m} ln_after, learned scale", every_config=False),
    ]
    return launches


def prefix_attention_launches(dtype: torch.dtype) -> list[Launch]:
    """The prefix-attention kernels (fastpeft/kernels/attention.py) at head dims 64 and 128. Every config autotune
    may pick is compiled where it matters, at head dim 128 (BLOCK_D 128, the largest tiles): in bf16 (tensor-core
    instructions) the forward and dQ causal with the key padding mask and a per-row prefix, dK/dV over the real
    keys and the 16-row decode forward; in float32 (most bytes) the same three with a float32 attn_mask bias
    (1, H, Lq, Lk) (stride 0 on the batch; the widest mask tile, which the pipeliner stages in shared memory): the
    largest shared-memory footprint of each config. Everything else compiles its first config (compile time is the
    suite's budget): head dim 64, the plain forward/dQ with a shared prefix, dK/dV of a shared prefix, a bool
    (B, 1, Lq, Lk) mask, and the split-K decode forward (GQA group of 4 packed, 4 splits: causal, key padding, a
    bias (B, 1, 1, Lk) in the input dtype) with its combine kernel (half precision); per-row prefix ranges (a packed
    prefix: forward, dQ, dK/dV, split-K decode) at head dim 128 in bf16 only. float16 and float32 compile the
    subset `_attention_variant_wanted` lists."""
    B, H, Hkv, Lq, Lk, P = 2, 8, 2, 256, 512, 32
    launches = []
    half, wide = dtype == torch.bfloat16, dtype == torch.float32
    for D in (64, 128):
        big = D == 128
        q, o = torch.empty(B, H, Lq, D, dtype=dtype), torch.empty(B, H, Lq, D, dtype=dtype)
        k, v = torch.empty(B, Hkv, Lk, D, dtype=dtype), torch.empty(B, Hkv, Lk, D, dtype=dtype)
        lse, mask = torch.empty(B, H, Lq), torch.empty(B, Lk, dtype=torch.int8)
        delta = torch.empty(B, H, Lq)
        for causal in (True, False):
            Bp = B if causal else 1
            pk, pv = torch.empty(Bp, Hkv, P, D, dtype=dtype), torch.empty(Bp, Hkv, P, D, dtype=dtype)
            what = " causal, mask, per-row prefix" if causal else ""
            launches += capture("attention", "forward", q, k, v, pk, pv, o, lse, scale=D ** -0.5, causal=causal,
                                key_padding_mask=mask if causal else None, query_offset=Lk - Lq,
                                label=f"fwd D{D}" + what, every_config=causal and big and half)
            launches += capture("attention", "backward_dq", q, o, lse, delta, k, v, pk, pv, torch.empty_like(q),
                                scale=D ** -0.5, causal=causal, key_padding_mask=mask if causal else None,
                                query_offset=Lk - Lq, label=f"dq D{D}" + what, every_config=causal and big and half)
        launches += capture("attention", "backward_dkdv", q, o, lse, delta, k, v, torch.empty_like(k),
                            torch.empty_like(v), scale=D ** -0.5, causal=True, key_padding_mask=mask,
                            query_offset=Lk - Lq, label=f"dkdv D{D} real keys, causal, mask",
                            every_config=big and half)
        pk, pv = torch.empty(1, Hkv, P, D, dtype=dtype), torch.empty(1, Hkv, P, D, dtype=dtype)
        launches += capture("attention", "backward_dkdv", q, o, lse, delta, pk, pv, torch.empty_like(pk),
                            torch.empty_like(pv), scale=D ** -0.5, label=f"dkdv D{D} shared prefix",
                            every_config=False)
        masks = {"bias": torch.empty(1, H, Lq, Lk), "bool": torch.empty(B, 1, Lq, Lk, dtype=torch.bool)}
        for kind, am in masks.items():
            every = kind == "bias" and big and wide
            launches += capture("attention", "forward", q, k, v, pk, pv, o, lse, scale=D ** -0.5, causal=True,
                                query_offset=Lk - Lq, attn_mask=am, label=f"fwd D{D} causal, {kind} attn_mask",
                                every_config=every)
            launches += capture("attention", "backward_dq", q, o, lse, delta, k, v, pk, pv, torch.empty_like(q),
                                scale=D ** -0.5, causal=True, key_padding_mask=mask, query_offset=Lk - Lq,
                                attn_mask=am, label=f"dq D{D} causal, mask, {kind} attn_mask", every_config=every)
            launches += capture("attention", "backward_dkdv", q, o, lse, delta, k, v, torch.empty_like(k),
                                torch.empty_like(v), scale=D ** -0.5, causal=True, key_padding_mask=mask,
                                query_offset=Lk - Lq, attn_mask=am, label=f"dkdv D{D} causal, mask, {kind} attn_mask",
                                every_config=every)
        q1, o1, lse1 = q[:, :, :1], o[:, :, :1], lse[:, :, :1].contiguous()
        launches += capture("attention", "forward", q1, k, v, pk, pv, o1, lse1, scale=D ** -0.5, causal=True,
                            query_offset=Lk - 1, attn_mask=masks["bool"][:, :, :1],
                            label=f"fwd D{D} decode (Lq 1), causal, bool attn_mask",
                            every_config=big and half)
        if dtype != torch.float32:
            launches += capture("attention", "forward_decode", q1, k, v, pk, pv, o1, lse1, scale=D ** -0.5,
                                causal=True, key_padding_mask=mask, query_offset=Lk - 1,
                                attn_mask=torch.empty(B, 1, 1, Lk, dtype=dtype), num_splits=4,
                                label=f"split-K decode D{D} (Lq 1, group 4, 4 splits), causal, mask, bias",
                                every_config=False)
        if big:  # per-row prefix ranges (multi-adapter batches) on a packed prefix: each row walks its own range
            rows = dict(prefix_offsets=torch.zeros(B, dtype=torch.int32),
                        prefix_lengths=torch.full((B,), P // 2, dtype=torch.int32), every_config=False)
            what = "causal, mask, packed prefix ranges"
            launches += capture("attention", "forward", q, k, v, pk, pv, o, lse, scale=D ** -0.5, causal=True,
                                key_padding_mask=mask, query_offset=Lk - Lq, label=f"fwd D{D} {what}", **rows)
            launches += capture("attention", "backward_dq", q, o, lse, delta, k, v, pk, pv, torch.empty_like(q),
                                scale=D ** -0.5, causal=True, key_padding_mask=mask, query_offset=Lk - Lq,
                                label=f"dq D{D} {what}", **rows)
            launches += capture("attention", "backward_dkdv", q, o, lse, delta, pk, pv, torch.empty_like(pk),
                                torch.empty_like(pv), scale=D ** -0.5, label=f"dkdv D{D} packed prefix ranges", **rows)
            launches += [launch for launch in capture(  # the combine kernel is unchanged (compiled above)
                "attention", "forward_decode", q1, k, v, pk, pv, o1, lse1, scale=D ** -0.5, causal=True,
                key_padding_mask=mask, query_offset=Lk - 1, num_splits=4,
                label=f"decode D{D} (Lq 1, group 4, 4 splits) {what}", **rows)
                if launch.jit.fn.__name__ == "prefix_attention_decode_kernel"]
    return [launch for launch in launches if _attention_variant_wanted(launch.label, dtype)]


def _attention_variant_wanted(label: str, dtype: torch.dtype) -> bool:
    """bf16 compiles every variant. float16 (bf16's instructions) the causal forward, dQ and dK/dV at head dim 128
    and the split-K decode; float32 (no tensor cores, most bytes) the causal forward, dQ and dK/dV at both head dims
    and, at head dim 128, the bias variants and the decode forward. The per-row prefix ranges: bf16 only."""
    base = "causal, mask, per-row prefix" in label or "real keys, causal, mask" in label
    if "prefix ranges" in label:
        return dtype == torch.bfloat16
    if dtype == torch.bfloat16:
        return True
    if dtype == torch.float16:
        return ("D128" in label and base) or label.startswith("split-K")
    return base or ("D128" in label and ("bias attn_mask" in label or "decode (Lq 1)" in label))


def multi_lora_launches(dtype: torch.dtype) -> list[Launch]:
    """The multi-adapter LoRA kernels (fastpeft/kernels/multi_lora.py): 8 adapter slots (the pointer table), 3
    segments, ranks up to 64 (the widest rank blocks the configs take). Every config of the segment kernels (their
    tiles differ; each compiles in about a second): the forward shrink and expand (A as the shrink operand, B as the
    expand operand), the backward layouts (B as the shrink operand, A as the expand operand), the weight-gradient
    reduction's layouts; the expand at ranks up to 128 and 256 too (its rank chunks are unrolled); on half
    inputs, float32 adapters (the adapter operand converted in registers). In float32 (no tensor cores, not gated)
    every config of the forward shrink and of the reduction (their pipelined tiles: the most bytes in shared
    memory), the rest their first. The decode kernel at its narrowest and widest rank block (16 and 256; no
    autotuning), and with float32 adapters on a bf16 input; the reduction's combine kernel."""
    M, K, N, S = 256, 512, 384, 8
    x, dy, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    table, ranks = torch.empty(3, S, dtype=torch.int64), torch.empty(S, dtype=torch.int32)
    order, seg_start, seg_slot = (torch.empty(n, dtype=torch.int32) for n in (M, 4, 3))
    s_buf, token_slot = torch.empty(M, 64), torch.empty(M, dtype=torch.int32)
    segs = (table, ranks, order, seg_start, seg_slot)
    half = dtype != torch.float32
    launches = []
    for adapters in dict.fromkeys((dtype, torch.float32)):
        seg = dict(num_segments=3, max_segment=128, max_rank=64, adapter_dtype=adapters)
        what = "" if adapters == dtype else ", float32 adapters"
        launches += [
            *capture("multi_lora", "shrink", x, *segs, s_buf, u_row=0, rank_major=True, label=f"fwd shrink (A){what}",
                     **seg),
            *capture("multi_lora", "expand", s_buf, *segs, y, e_row=1, rank_major=False, label=f"fwd expand (B){what}",
                     every_config=half, **seg),
            *capture("multi_lora", "shrink", dy, *segs, s_buf, u_row=1, rank_major=False, label=f"bwd shrink (B){what}",
                     every_config=half, **seg),
            *capture("multi_lora", "expand", s_buf, *segs, x, e_row=0, rank_major=True, label=f"bwd expand (A){what}",
                     every_config=half, **seg),
        ]
    for wide in (128, 256):  # several rank chunks: the prune keeps the tiles whose adapter chunk is lighter
        rank = dict(num_segments=3, max_segment=128, max_rank=wide, adapter_dtype=dtype)
        s_wide = torch.empty(M, wide)
        launches += [
            *capture("multi_lora", "expand", s_wide, *segs, y, e_row=1, rank_major=False,
                     label=f"fwd expand (B) r<={wide}", every_config=half, **rank),
            *capture("multi_lora", "expand", s_wide, *segs, x, e_row=0, rank_major=True,
                     label=f"bwd expand (A) r<={wide}", every_config=half, **rank),
        ]
    for rank_major, source in ((True, x), (False, dy)):
        launches += capture("multi_lora", "reduce", source, s_buf, table, ranks, order, (0, 100, 200, 256), seg_slot,
                            torch.empty(1, S, dtype=torch.int64), max_rank=64, rank_major=rank_major,
                            out_dtype=dtype, label=f"reduce {'dA' if rank_major else 'dB'}")
    for max_rank, adapters in ((16, dtype), (256, dtype), *(((16, torch.float32),) if dtype == torch.bfloat16 else ())):
        launches += capture("multi_lora", "decode", x[:64], table, ranks, token_slot[:64], y[:64], max_rank=max_rank,
                            adapter_dtype=adapters, target_programs=264,
                            label=f"decode r<={max_rank}, {str(adapters)[6:]} adapters", every_config=False)
    return launches


def multi_ia3_launches(dtype: torch.dtype) -> list[Launch]:
    """The multi-adapter IA3 kernels (fastpeft/kernels/multi_ia3.py): the GEMM with per-row input scales (x ⊙ u
    formed in registers, the gathered scale tiles pipelined in shared memory when they are 4-byte) and with output
    scales (the gathered tile in the epilogue), with float32 vectors and vectors in the input's dtype (an adapter's
    own dtype: the loads differ). Every config of the input-scaled GEMM with either vectors; of the output-scaled
    GEMM with float32 vectors on half inputs (the widest epilogue tile; vectors in the input's dtype and float32
    inputs, no tensor cores, their first config). The row-scale kernel in place and into a new tensor."""
    M, K, N, S = 256, 512, 384, 8
    x, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype)
    w, bias = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
    table, token_slot = torch.empty(1, S, dtype=torch.int64), torch.empty(M, dtype=torch.int32)
    launches = []
    for vectors in dict.fromkeys((torch.float32, dtype)):
        name = str(vectors)[6:]
        launches += [
            *capture("multi_ia3", "gemm", x, w.t(), bias, y, table, token_slot, in_scale=True, vector_dtype=vectors,
                     label=f"gemm, input scales, {name} vectors"),
            *capture("multi_ia3", "gemm", x, w.t(), bias, y, table, token_slot, in_scale=False, vector_dtype=vectors,
                     label=f"gemm, output scales, {name} vectors",
                     every_config=vectors == torch.float32 and dtype != torch.float32),
        ]
    return [
        *launches,
        *capture("multi_ia3", "row_scale", y, y, table, token_slot, vector_dtype=torch.float32,
                 label="row scale, in place", every_config=False),
        *capture("multi_ia3", "row_scale", y, torch.empty_like(y), table, token_slot, vector_dtype=dtype,
                 label="row scale", every_config=False),
    ]


def lora_update_launches(dtype: torch.dtype) -> list[Launch]:
    """The cuBLAS-base strategy's adapter kernel (fastpeft/kernels/lora_update.py): every config at rank 16 and
    at its widest rank block (64, the most registers), forward with the dropout mask on x and S written, DoRA's
    forward (column scale, bias, Z), and the dX update with the mask on the low-rank term."""
    M, K, N = 256, 512, 384
    x, dy, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    drop = dict(seed=torch.zeros((), dtype=torch.int64), threshold=-1717986918, inv_keep=1.1111)
    launches = []
    for R in (16, 64):
        a, b, scale, s = torch.empty(R, K), torch.empty(N, R), torch.empty(R), torch.empty(M, R)
        launches += [
            *capture("lora_update", "update", x, a.t(), b.t(), scale, y, s=s, **drop, target_programs=264,
                     label=f"fwd r{R} masked, S"),
            *capture("lora_update", "update", x, a.t(), b.t(), scale, y, out_scale=torch.empty(N),
                     bias=torch.empty(N, dtype=dtype), z=torch.empty(M, N, dtype=dtype), target_programs=264,
                     label=f"DoRA fwd r{R}"),
            *capture("lora_update", "update", dy, b, a, scale, x, s=s, **drop, mask_out=True, target_programs=264,
                     label=f"dX r{R} masked, G"),
        ]
    return launches


def nf4_launches(dtype: torch.dtype) -> list[Launch]:
    """The 4-bit base-weight GEMM (fastpeft/kernels/nf4.py), bitsandbytes' layout at blocksize 64 with the scales
    stored (float32) and double-quantized (uint8 codes): the forward with the low-rank term and the bias, dX with
    the dropout mask on the low-rank term, both without the low-rank term, and the forward at the widest rank
    block (64). Every config of the double-quantized ones with the low-rank term (the most registers: the scales
    decoded in the K loop) in half precision, and in float32 (no tensor cores, not gated for spills) of the masked
    dX; the rest (same tiles, fewer registers) their first config. dX where blocks span rows (K not a multiple of
    64: a scale per element) and with odd K (a byte per element, the most gathers): their first config, and every
    config of odd K double-quantized in bfloat16 (their own pruning). Not here: the forward with such K, whose
    loop on sm_90 waits for every wgmma group (correct, no spills; real models have K a multiple of 64)."""
    M, K, N = 256, 512, 384
    x, dy, bias = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype), torch.empty(N, dtype=dtype)
    code, w_dtype = torch.empty(16), (dtype if dtype != torch.float32 else torch.bfloat16)
    drop = dict(seed=torch.zeros((), dtype=torch.int64), dropout_p=0.1)
    half = dtype != torch.float32
    launches = []
    for nested in (False, True):
        def quant(n, k, blocksize=64):
            blocks = -(-n * k // blocksize)
            if not nested:
                return dict(packed=torch.empty(n * k // 2, 1, dtype=torch.uint8), absmax=torch.empty(blocks))
            return dict(packed=torch.empty(n * k // 2, 1, dtype=torch.uint8),
                        absmax=torch.empty(blocks, dtype=torch.uint8), absmax_code=torch.empty(256),
                        absmax_scale=torch.empty(-(-blocks // 256)), absmax_offset=0.03)

        what = ", nested" if nested else ""
        for R in (16, 64):
            a, b, scale, s = torch.empty(R, K), torch.empty(N, R), torch.empty(R), torch.empty(M, R)
            common = dict(shape=(N, K), blocksize=64, w_dtype=w_dtype, s=s, scale=scale, **quant(N, K))
            launches += capture("nf4", "nf4_gemm", x, code=code, e=b.t(), bias=bias, label=f"fwd r{R}, bias{what}",
                                every_config=half and nested, **common)
            if R == 16:
                launches += capture("nf4", "nf4_gemm", dy, code=code, e=a, transpose_w=True, **drop, **common,
                                    label=f"dX r{R} masked{what}", every_config=nested)
        common = dict(shape=(N, K), blocksize=64, w_dtype=w_dtype, **quant(N, K))
        launches += capture("nf4", "nf4_gemm", x, code=code, label=f"fwd plain{what}", every_config=False, **common)
        launches += capture("nf4", "nf4_gemm", dy, code=code, transpose_w=True, label=f"dX plain{what}",
                            every_config=False, **common)
        for k_odd in (200, 201):  # dX where blocks span rows; odd K (N even)
            odd = dict(shape=(N, k_odd), blocksize=64, w_dtype=w_dtype, **quant(N, k_odd))
            launches += capture("nf4", "nf4_gemm", dy, code=code, transpose_w=True, label=f"dX K{k_odd}{what}",
                                every_config=nested and k_odd % 2 == 1 and dtype == torch.bfloat16, **odd)
    return launches


def moe_lora_launches(dtype: torch.dtype) -> list[Launch]:
    """LoRA on MoE expert tensors (fastpeft/ops/moe_lora.py): the multi-LoRA segment kernels with slot = expert, 8
    experts (segments; one without tokens), rank 16 (PEFT's r per expert: the expand's rank chunks unrolled to a
    bucket of 16, a constexpr the multi_lora entry, at 64 and more, does not cover), float32 adapters on half inputs
    (the module's default on half-precision bases) and adapters of the input's dtype: every config of the forward
    and backward expand in half precision, the first of the shrinks and the weight-gradient reductions (the same
    variants as multi_lora's, at these sizes)."""
    E, r, M, K, N = 8, 16, 512, 512, 384
    x, dy, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    table, ranks = torch.empty(3, E, dtype=torch.int64), torch.empty(E, dtype=torch.int32)
    order, seg_start, seg_slot = (torch.empty(n, dtype=torch.int32) for n in (M, E + 1, E))
    t = torch.empty(M, r)
    segs = (table, ranks, order, seg_start, seg_slot)
    half = dtype != torch.float32
    starts = (0, 40, 40, 130, 200, 290, 330, 450, M)  # expert 1 has no tokens
    launches = []
    for adapters in dict.fromkeys((torch.float32, dtype)):
        seg = dict(num_segments=E, max_segment=120, max_rank=r, adapter_dtype=adapters)
        what = f"r{r}, {str(adapters)[6:]} adapters"
        launches += [
            *capture("multi_lora", "shrink", x, *segs, t, u_row=0, rank_major=True,
                     label=f"expert fwd shrink (A) {what}", every_config=False, **seg),
            *capture("multi_lora", "expand", t, *segs, y, e_row=1, rank_major=False,
                     label=f"expert fwd expand (B) {what}", every_config=half, **seg),
            *capture("multi_lora", "shrink", dy, *segs, t, u_row=1, rank_major=False,
                     label=f"expert bwd shrink (B) {what}", every_config=False, **seg),
            *capture("multi_lora", "expand", t, *segs, x, e_row=0, rank_major=True,
                     label=f"expert bwd expand (A) {what}", every_config=half, **seg),
        ]
        for rank_major, source in ((True, x), (False, dy)):
            launches += capture("multi_lora", "reduce", source, t, table, ranks, order, starts, seg_slot,
                                torch.empty(1, E, dtype=torch.int64), max_rank=r, rank_major=rank_major,
                                out_dtype=adapters, every_config=False,
                                label=f"expert reduce {'dA' if rank_major else 'dB'} {what}")
    return launches


ELEMENTWISE_KERNELS = {"prefix_attention_combine_kernel", "multi_lora_decode_kernel",  # no matrix product: no
                       "multi_lora_reduce_combine_kernel", "multi_ia3_row_scale_kernel"}  # tensor-core instructions
CATALOG = {"lora": lora_launches, "lora_update": lora_update_launches, "ia3": ia3_launches,
           "bottleneck": bottleneck_launches, "fused_bottleneck": fused_bottleneck_launches,
           "prefix_attention": prefix_attention_launches, "multi_lora": multi_lora_launches,
           "multi_ia3": multi_ia3_launches, "nf4": nf4_launches,
           "moe_lora": moe_lora_launches}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def specialise(launch: Launch, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch with a config, as the JIT specialises it."""
    jit = launch.jit
    values = dict(zip(jit.arg_names, launch.args))
    values.update(launch.kwargs)
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(jit.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TL_DTYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{jit.fn.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs


def variant_keys(launch: Launch, config) -> tuple[str, str]:
    """(variant, tiles) of a compiled launch. The variant: the kernel, half precision (bf16 and fp16 compile to the
    same instructions) or float32, and every constexpr it was launched with but the config's (absent operands,
    flags, codes, block sizes derived from the shapes such as the rank block). The tiles: the kernel, precision,
    the non-boolean constexprs (rank block, codes) and the config."""
    jit = launch.jit
    signature, constexprs, _ = specialise(launch, config)
    declared = {p.name for p in jit.params if p.is_constexpr}
    flags = {name: value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)
             for name, value in constexprs.items() if (name in declared or value is None) and name not in config.kwargs}
    first = signature[jit.arg_names[0]]
    precision = "half" if first in ("*bf16", "*fp16") else first
    sizes = {name: value for name, value in flags.items() if isinstance(value, int) and not isinstance(value, bool)}
    conf = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    name = jit.fn.__name__
    return (json.dumps([name, precision, flags], sort_keys=True), json.dumps([name, precision, sizes, conf],
                                                                           sort_keys=True))


def compile_launch(launch: Launch, config, arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = launch.jit
    signature, constexprs, attrs = specialise(launch, config)
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # triton prints ptxas' report when it runs ptxas (not on a cache hit)
        compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    ptx = compiled.asm["ptx"]
    variant, tiles = variant_keys(launch, config)
    return {"kernel": jit.fn.__name__, "variant": launch.label, "arch": arch,
            "variant_key": variant, "tiles_key": tiles,
            "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
            "shared_bytes": compiled.metadata.shared, **ptxas_report(compiled, log.getvalue(), arch),
            **ptx_report(ptx)}


_PTXAS_CACHE = ROOT / "build" / "aot-ptxas"


def ptxas_report(compiled, log: str, arch: str) -> dict:
    """Registers, stack, spill stores/loads and serialised wgmma from ptxas' verbose report: the one triton just
    printed, else the one kept for this kernel hash, else ptxas run again on the PTX (a triton cache hit)."""
    kept = _PTXAS_CACHE / f"{compiled.hash}.txt"
    if "Used " not in log:
        if kept.exists():
            log = kept.read_text()
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "k.ptx"
                src.write_text(compiled.asm["ptx"])
                gpu = f"sm_{ARCHS[arch]}a" if ARCHS[arch] >= 90 else f"sm_{ARCHS[arch]}"
                from triton.backends.nvidia.compiler import get_ptxas  # the ptxas triton bundles and uses

                log = subprocess.run([get_ptxas(ARCHS[arch]).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                                      str(src), "-o", str(Path(tmp) / "k.o")],
                                     capture_output=True, text=True, check=True).stderr
    _PTXAS_CACHE.mkdir(parents=True, exist_ok=True)
    kept.write_text(log)
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads"),
            "wgmma_serialized": "wgmma.mma_async instructions are serialized" in log}


_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+);")


def ptx_report(ptx: str) -> dict:
    """What the PTX uses: mma.sync / wgmma tensor-core instructions, cp.async copies, TMA bulk tensor copies;
    and, for every loop (a label with a branch back to it) that issues wgmma, in PTX order, the smallest
    `wgmma.wait_group N` inside it: 0 waits for every group in flight each iteration (the tensor cores idle while
    the next tiles are waited for), N >= 1 keeps N groups in flight. Empty: no wgmma inside a loop."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line.strip()))}
    loops = []  # (first line, last line) of every backward branch's range
    for i, line in enumerate(lines):
        for target in _BRANCH.findall(line):
            if target in labels and labels[target] < i:
                loops.append((labels[target], i))
    waits = []  # per loop issuing wgmma, in PTX order: the smallest wait_group depth inside it
    for start, end in loops:
        body = lines[start:end + 1]
        if any("wgmma.mma_async" in line for line in body):
            depths = [int(d) for line in body for d in _WAIT.findall(line)]
            if depths:
                waits.append(min(depths))
    return {"mma_sync": "mma.sync" in ptx, "wgmma": "wgmma.mma_async" in ptx, "cp_async": "cp.async.ca" in ptx
            or "cp.async.cg" in ptx, "tma": "cp.async.bulk.tensor" in ptx, "loop_wgmma_waits": waits}


def representative_launches() -> list[Launch]:
    """The launches the linear ops make at model shapes, on meta tensors (nothing runs, nothing is allocated):
    LoRA and DoRA forward and backward under both strategies at M in {16, 256, 8192} rows, (K, N) in
    {(4096, 4096), (4096, 14336)}, r in {16, 64}, dropout 0 and 0.1, float32 adapters on bf16/fp16 inputs; IA3's
    fused GEMMs (feed-forward and attention scaling). The gate compiles every config autotune may pick of them."""
    import fastpeft as fp
    from fastpeft.ops import ia3 as ia3_op
    from fastpeft.ops import lora as lora_op

    meta = dict(device="meta")
    launches: list[Launch] = []
    for dtype in (torch.bfloat16, torch.float16):
        for M in (16, 256, 8192):
            for K, N in ((4096, 4096), (4096, 14336)):
                x, dy = torch.empty(M, K, dtype=dtype, **meta), torch.empty(M, N, dtype=dtype, **meta)
                w, bias = torch.empty(N, K, dtype=dtype, **meta), torch.empty(N, dtype=dtype, **meta)
                for R in (16, 64):
                    a, b, scale = torch.empty(R, K, **meta), torch.empty(N, R, **meta), torch.empty(R, **meta)
                    t = torch.empty(M, R, **meta)
                    for p, strategy, c in itertools.product((0.0, 0.1), ("fused", "cublas"),
                                                            (None, torch.empty(N, **meta))):
                        seed = torch.zeros((), dtype=torch.int64, **meta) if p else None
                        label = f"{strategy} M{M} K{K} N{N} r{R} p{p}{' DoRA' if c is not None else ''}"
                        with fp.ops.use_kernel_options(linear_strategy=strategy), recording(label) as got:
                            z = torch.empty(M, N, dtype=dtype, **meta) if c is not None else None
                            lora_op.triton_forward(x, w, bias, a, b, scale, seed, p, False, True, c, c is not None)
                            lora_op.triton_backward(dy, x, w, a, b, scale, t, seed, p, False, (True,) * 5
                                                     + (c is not None,), c, z)
                        launches += got
                u, v = torch.empty(K, **meta), torch.empty(N, **meta)
                for in_scale, out_scale in ((u, None), (None, v)):
                    z = torch.empty(M, N, dtype=dtype, **meta) if out_scale is not None else None
                    with fp.ops.use_kernel_options(linear_strategy="fused"), recording(f"ia3 M{M}") as got:
                        ia3_op._triton_forward(x, w, bias, in_scale, out_scale, False, out_scale is not None)
                        ia3_op._triton_backward(dy, x, w, in_scale, out_scale, z, False,
                                                (True, in_scale is not None, out_scale is not None, True))
                    launches += got
    return launches


# Families whose shared memory is the GEMM's pipelined operand tiles, the same in every variant: in float32 (not
# gated for spills) one variant compiles every config to check those tiles fit, the others their first config.
GEMM_FAMILIES = {"lora", "ia3", "bottleneck", "lora_update"}


def compile_all(arch: str, families=None, dtypes=None, variant: str = "") -> list[dict]:
    """Every catalogued launch: every config autotune may pick for bf16 and float32 (float32 has the largest
    tiles in bytes), the first one for float16 (same instructions as bf16). The kernels' own pruning runs for
    this architecture (its shared-memory budget). families / dtypes / variant (a substring of the label) narrow
    it while working on one kernel."""
    from fastpeft.kernels._tiles import compiling_for

    rows = []
    with compiling_for(ARCHS[arch]):
        for family, make in CATALOG.items():
            if families and family not in families:
                continue
            for dtype in DTYPES:
                if dtypes and str(dtype)[6:] not in dtypes:
                    continue
                fp32_tiles_done = False
                for launch in make(dtype):
                    if variant not in launch.label:
                        continue
                    every = launch.every_config and dtype != torch.float16
                    if every and dtype == torch.float32 and family in GEMM_FAMILIES:
                        every, fp32_tiles_done = not fp32_tiles_done, True  # one variant shows the fp32 tiles
                    configs = launch.configs if every else launch.configs[:1]
                    for config in configs:
                        row = compile_launch(launch, config, arch)
                        rows.append({"family": family, "dtype": str(dtype)[6:], **row})
        if not families or "model_shapes" in families:
            rows += _model_shape_rows(arch, rows)
    return rows


def _model_shape_rows(arch: str, rows: list[dict]) -> list[dict]:
    """What autotune may pick at model shapes (representative_launches, after each kernel's pruning for this
    architecture) that the catalogue above did not compile: the first config of each new variant, and each new
    (rank block, config) of a kernel once. The gate's rules then hold for everything autotune can pick."""
    seen = {key for r in rows for key in (r["variant_key"], r["tiles_key"])}
    extra = []
    for launch in representative_launches():
        dtype = str(launch.args[0].dtype)[6:]
        for config in launch.configs:
            variant, tiles = variant_keys(launch, config)
            if variant in seen and tiles in seen:
                continue
            seen |= {variant, tiles}
            extra.append({"family": "model_shapes", "dtype": dtype, **compile_launch(launch, config, arch)})
    return extra


def run_in_subprocesses(archs=tuple(ARCHS)) -> list[dict]:
    """Compile everything for each arch in parallel child processes (interpreter off); the rows of all."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.aot", arch], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in archs]
    rows = []
    for arch, proc in zip(archs, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time compile for {arch} failed:\n{err[-4000:]}")
        rows += json.loads(out)
    return rows


STATIC_GATE = ROOT / "benchmarks" / "results" / "static-gate.json"
_TABLE_FIELDS = ("arch", "family", "dtype", "kernel", "variant", "config", "registers", "spill_stores", "spill_loads",
                 "stack_bytes", "shared_bytes", "mma_sync", "wgmma", "wgmma_serialized", "loop_wgmma_waits",
                 "cp_async", "tma")


def gate_table(rows: list[dict]) -> dict:
    """The committed form of the compile report: the compiler versions and one row per (variant, config, arch)."""
    import triton

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    table = sorted(({f: r[f] for f in _TABLE_FIELDS} for r in rows),
                   key=lambda r: (r["arch"], r["family"], r["kernel"], r["variant"], r["dtype"],
                                  json.dumps(r["config"], sort_keys=True)))
    return {"versions": {"triton": triton.__version__, "ptxas": ptxas[-1] if ptxas else "?"}, "rows": table}


def write_gate_table(path: Path = STATIC_GATE) -> None:
    """`make static-gate`: compile everything (both archs) and write the committed table, one row per line."""
    table = gate_table(run_in_subprocesses())
    lines = ",\n".join(json.dumps(r, sort_keys=True) for r in table["rows"])
    path.write_text(f'{{"versions": {json.dumps(table["versions"], sort_keys=True)},\n"rows": [\n{lines}\n]}}\n')
    half = [r for r in table["rows"] if r["dtype"] != "float32"]
    print(f"{path.relative_to(ROOT)}: {len(table['rows'])} rows; half precision: "
          f"{sum(1 for r in half if r['spill_stores'] or r['spill_loads'])} spilling, "
          f"{sum(1 for r in half if r['arch'] == 'sm90' and r['loop_wgmma_waits'] and max(r['loop_wgmma_waits']) < 1)}"
          " sm_90 rows whose loops all wait for every wgmma group")


def kernels_defined() -> set[str]:
    """Names of every @triton.jit kernel (functions named *_kernel) in fastpeft/kernels, by reading the source."""
    import re

    names = set()
    for file in (ROOT / "fastpeft" / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+_kernel)\(", file.read_text()))
    return names


def main(argv: list[str]) -> None:
    """`python -m tests.aot sm80 sm90 [--family lora] [--dtype bfloat16] [--variant "dX masked"] [--table]`: the
    rows as JSON on stdout, or (--table) one line per row for reading."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.aot")
    parser.add_argument("archs", nargs="+", choices=sorted(ARCHS))
    parser.add_argument("--family", action="append", choices=sorted([*CATALOG, "model_shapes"]))
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variant", default="", help="a substring of the launch labels to compile")
    parser.add_argument("--table", action="store_true", help="print readable lines instead of JSON")
    args = parser.parse_args(argv)
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    rows = [row for arch in args.archs for row in compile_all(arch, args.family, args.dtype, args.variant)]
    if not args.table:
        json.dump(rows, sys.stdout)
        return
    for r in rows:
        print(f"{r['arch']} {r['dtype']:8} {r['kernel']:34} {r['variant'][:40]:40} {r['config']} "
              f"regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']} smem={r['shared_bytes']} "
              f"wgmma={r['wgmma']} serialized={r['wgmma_serialized']} loop_waits={r['loop_wgmma_waits']}")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    if sys.argv[1:] == ["--write-gate"]:
        write_gate_table()
    else:
        main(sys.argv[1:])
