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

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = {"sm80": 80, "sm90": 90}
SHARED_LIMIT = {"sm80": 166912, "sm90": 232448}  # bytes of shared memory one block may use (A100, H100)
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


def capture(module: str, launcher: str, *args, label: str = "", every_config: bool = True,
            **kwargs) -> list[Launch]:
    """Call `fastpeft.kernels.<module>.<launcher>(*args, **kwargs)`, recording its launches instead of running
    (those of the launchers it delegates to in other kernel modules too)."""
    mod = importlib.import_module(f"fastpeft.kernels.{module}")
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
        getattr(mod, launcher)(*args, **kwargs)
    finally:
        for m, original in zip(launching, originals):
            m.launch = original
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
    fused (its own register prune, and the residual's chunk in shared memory) is compiled for every config."""
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
    segments, ranks up to 64 (the widest rank blocks the configs take). Every config of the forward shrink and
    expand in float32 (the most bytes in shared memory; bf16's first config checks the instructions); the backward
    layouts (B as the shrink operand, A as the expand operand) and the weight-gradient reduction's layouts their
    first config; the decode kernel at its narrowest and widest rank block (16 and 256; no autotuning), and with
    float32 adapters on a bf16 input; the reduction's combine kernel (compile time is the suite's budget)."""
    M, K, N, S = 256, 512, 384, 8
    x, dy, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    table, ranks = torch.empty(3, S, dtype=torch.int64), torch.empty(S, dtype=torch.int32)
    order, seg_start, seg_slot = (torch.empty(n, dtype=torch.int32) for n in (M, 4, 3))
    s_buf, token_slot = torch.empty(M, 64), torch.empty(M, dtype=torch.int32)
    seg = dict(num_segments=3, max_segment=128, max_rank=64, adapter_dtype=dtype)
    wide = dtype == torch.float32
    launches = [
        *capture("multi_lora", "shrink", x, table, ranks, order, seg_start, seg_slot, s_buf, u_row=0, rank_major=True,
                 label="fwd shrink (A)", every_config=wide, **seg),
        *capture("multi_lora", "expand", s_buf, table, ranks, order, seg_start, seg_slot, y, e_row=1,
                 rank_major=False, label="fwd expand (B)", every_config=wide, **seg),
        *capture("multi_lora", "shrink", dy, table, ranks, order, seg_start, seg_slot, s_buf, u_row=1,
                 rank_major=False, label="bwd shrink (B)", every_config=False, **seg),
        *capture("multi_lora", "expand", s_buf, table, ranks, order, seg_start, seg_slot, x, e_row=0,
                 rank_major=True, label="bwd expand (A)", every_config=False, **seg),
    ]
    for rank_major, source in ((True, x), (False, dy)):
        launches += capture("multi_lora", "reduce", source, s_buf, table, ranks, order, (0, 100, 200, 256), seg_slot,
                            torch.empty(1, S, dtype=torch.int64), max_rank=64, rank_major=rank_major,
                            out_dtype=dtype, label=f"reduce {'dA' if rank_major else 'dB'}", every_config=False)
    for max_rank, adapters in ((16, dtype), (256, dtype), *(((16, torch.float32),) if dtype == torch.bfloat16 else ())):
        launches += capture("multi_lora", "decode", x[:64], table, ranks, token_slot[:64], y[:64], max_rank=max_rank,
                            adapter_dtype=adapters, target_programs=264,
                            label=f"decode r<={max_rank}, {str(adapters)[6:]} adapters", every_config=False)
    return launches


def multi_ia3_launches(dtype: torch.dtype) -> list[Launch]:
    """The multi-adapter IA3 kernels (fastpeft/kernels/multi_ia3.py): the GEMM with per-row input scales (the
    gathered scale tiles add shared memory: every config) and output scales (first config), float32 vectors; the
    row-scale kernel in place and into a new tensor. Every config of the input-scaled GEMM in float32 (the most
    shared memory) and bfloat16 (the instructions); the rest their first config."""
    M, K, N, S = 256, 512, 384, 8
    x, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype)
    w, bias = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
    table, token_slot = torch.empty(1, S, dtype=torch.int64), torch.empty(M, dtype=torch.int32)
    return [
        *capture("multi_ia3", "gemm", x, w.t(), bias, y, table, token_slot, in_scale=True, vector_dtype=torch.float32,
                 label="gemm, input scales"),
        *capture("multi_ia3", "gemm", x, w.t(), bias, y, table, token_slot, in_scale=False,
                 vector_dtype=torch.float32, label="gemm, output scales", every_config=False),
        *capture("multi_ia3", "row_scale", y, y, table, token_slot, vector_dtype=torch.float32,
                 label="row scale, in place", every_config=False),
        *capture("multi_ia3", "row_scale", y, torch.empty_like(y), table, token_slot, vector_dtype=dtype,
                 label="row scale", every_config=False),
    ]


ELEMENTWISE_KERNELS = {"prefix_attention_combine_kernel", "multi_lora_decode_kernel",  # no matrix product: no
                       "multi_lora_reduce_combine_kernel", "multi_ia3_row_scale_kernel"}  # tensor-core instructions
CATALOG = {"lora": lora_launches, "ia3": ia3_launches, "bottleneck": bottleneck_launches,
           "fused_bottleneck": fused_bottleneck_launches, "prefix_attention": prefix_attention_launches,
           "multi_lora": multi_lora_launches, "multi_ia3": multi_ia3_launches}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def compile_launch(launch: Launch, config, arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"kernel": jit.fn.__name__, "variant": launch.label, "arch": arch,
            "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
            "shared_bytes": compiled.metadata.shared, "mma_sync": "mma.sync" in ptx,
            "wgmma": "wgmma.mma_async" in ptx}


def compile_all(arch: str) -> list[dict]:
    """Every catalogued launch: every config autotune may pick for bf16 and float32 (float32 has the largest
    tiles in bytes), the first one for float16 (same instructions as bf16)."""
    rows = []
    for family, make in CATALOG.items():
        for dtype in DTYPES:
            for launch in make(dtype):
                every = launch.every_config and dtype != torch.float16
                configs = launch.configs if every else launch.configs[:1]
                for config in configs:
                    row = compile_launch(launch, config, arch)
                    rows.append({"family": family, "dtype": str(dtype)[6:], **row})
    return rows


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


def kernels_defined() -> set[str]:
    """Names of every @triton.jit kernel (functions named *_kernel) in fastpeft/kernels, by reading the source."""
    import re

    names = set()
    for file in (ROOT / "fastpeft" / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+_kernel)\(", file.read_text()))
    return names


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    json.dump([row for arch in sys.argv[1:] for row in compile_all(arch)], sys.stdout)
