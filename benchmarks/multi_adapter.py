"""Multi-adapter LoRA serving benchmark: one batch, a different adapter per row; fastpeft's multi_lora_linear against
the base linear (the floor), PEFT's mixed-batch forward, a plain-PyTorch loop and a padded-bmm baseline.

    python benchmarks/multi_adapter.py                  # CUDA: Llama-7B linears, bf16, op section + serving loop
    python benchmarks/multi_adapter.py --quick          # tiny fp32 cases and a tiny model (the default without CUDA)
    python benchmarks/multi_adapter.py --phases decode --shapes 4096x4096 --batches 64 --ranks 16 --modes op
    python benchmarks/multi_adapter.py --modes serve    # the serving loop only
    fastpeft bench multi --quick                        # the same through the command line tool

Op section: y_m = x_m Wᵀ + s_a (x_m A_aᵀ) B_aᵀ, a = the adapter of row b(m) (none: y_m = x_m Wᵀ), x (B, L, K),
W (N, K), A_a (r_a, K), B_a (N, r_a), s_a in {1, 1.5, 2} by slot (alpha = s r), adapters in the benchmark dtype.
A case is (shape K x N, phase, B, scenario, rank):
    phases     decode (L = 1 token per row), prefill (L = --prefill-len, 512; quick 8), both under torch.no_grad;
               train (prefill, fwd+bwd: torch.autograd.grad of a fixed dY w.r.t. x and the used adapters' A, B)
    scenarios  uniform n: n registered adapters, every one in the batch (n <= B), the other rows uniform over them;
               zipf: rows drawn from min(64, B) registered adapters with p(k) ∝ 1/k^1.1;  none: no row adapted
    ranks      8, 16, 64, or mixed (ranks 8, 16, 64, 128 cycling over the registered slots)
Full preset (Llama-7B: 4096x4096, 4096x11008, 11008x4096; 174 cases; on an H100 about 7 min of op timing, 1-3 min of
Triton/CUDA C++ compilation on a cold cache, 2 min of serving loop: 10-15 min in all):
    decode B in 1, 4, 16, 64, 256; prefill B in 1, 4, 16, 64 (B = 256 rows of 512 tokens is 131k tokens, beyond
    any prefill chunk, and the same GEMM-bound regime as B = 64); at every B: rank 16 with uniform n in {1, 8, B}
    and none; ranks 8 and 64 (uniform n in {1, 8, 64}) at B = 64 only; zipf rank 16 and mixed ranks (uniform n = B,
    zipf) at B in {16, 64, 256}; train: B = 16, L = 512, 8 distinct rank-16 adapters, per shape.
Quick preset: shapes 256x256, 256x688, 688x256 (the same 4:2:1 block), decode B 1, 4, 16, prefill B 4, 16, L 8; on
the CPU one torch thread (--threads), the reference path's index_add stalls ~0.1 s per call with two OpenMP threads
on a loaded machine; CPU figures only check that everything runs.
Implementations, side by side on the same inputs (no bias):
    base              F.linear(x, W), the floor
    fastpeft          fp.ops.multi_lora_linear(x, W, None, bank=LoRABank, adapter_index=Routing): default dispatch
                      (CUDA: <= DECODE_MAX_TOKENS tokens the fused Triton decode kernel, more the segment kernels)
    fastpeft_segment  the same with fastpeft.ops.multi_lora.DECODE_MAX_TOKENS = 0: the segment kernels forced
                      (decode rows where the default is the decode kernel)
    fastpeft_decode   the same with DECODE_MAX_TOKENS = M: the decode kernel forced (decode rows where the default
                      is the segment kernels); with fastpeft_segment it shows where the default threshold is wrong
    fastpeft_cuda     the same under fp.ops.use_backend("cuda"): the CUDA C++ decode kernel (decode rows; dropped
                      with a note where fastpeft.ops.cuda_ext.status() says it cannot load)
    peft              peft.tuners.lora.layer.Linear holding the registered adapters (sharing their storage),
                      layer(x, adapter_names=[name per row, "__base__" for none]): its _mixed_batch_forward
    loop              plain PyTorch: F.linear, then per distinct adapter index_select its tokens, (x Aᵀ) Bᵀ,
                      index_add_ with alpha = s (token groups built outside the timed call)
    padded_bmm        Punica-naive: every registered adapter zero-padded to the largest rank and stacked once at
                      setup (s folded into B, a zero slot for rows without adapter), per call gather A, B per row,
                      two torch.bmm, add to F.linear
train runs base, fastpeft and loop only (PEFT's mixed batch is inference-only). Routing.build (host -> device, once
per forward, shared by every layer) runs outside the timed call; it is timed apart (wall clock + synchronize,
median), the "routing_us" column.
Cost model (e bytes per element, M = B·L tokens, M_a tokens of adapter a, r_a its rank, U the distinct adapters
of the batch; base: no adapter terms):
    flops   fwd 2·M·N·K + Σ_a 2·M_a·r_a·(K + N);   train fwd + 2·M·N·K + Σ_a 4·M_a·r_a·(K + N)
    bytes   fwd e·(M·K + N·K + M·N + Σ_{a in U} r_a·(K + N))   x, W, y once, each distinct adapter's A and B once
            train fwd + e·(M·N + N·K + M·K + ad) + e·(M·K + ad), ad = Σ_{a in U} r_a·(K + N) (read dY, W, x, A, B;
            write dX, dA, dB)
% of roofline = 100 · max(flops / peak matmul, bytes / peak bandwidth) / time (peaks measured in the run).
adapter_bw_pct (an ESTIMATE; fastpeft* rows at decode) = e·(Σ_{a in U} r_a·(K + N) + M·K + 2·M·N)
    / (ms - ms(base)) / measured copy bandwidth: the adapter term alone (read A, B, x; read and write y) as % of
    the device-to-device copy bandwidth; target >= 70%.
Columns: "x base" = ms / ms(base); "vs peft", "vs loop", "vs pad" = ms(that impl) / ms (> 1: faster than it);
vs_default (JSON) = ms(fastpeft) / ms for the forced fastpeft kernels. rel_err: every impl against y (and in train
dX, dA, dB) computed in float32 (CUDA) / float64 (CPU) on the first pool item; MISMATCH above _driver.TOLERANCE.
L2: every pool item holds its own W, x and its own registered adapter set (its LoRABank, PEFT layer and padded
stacks), so the pool rotates banks of adapters; it has >= 3 items (CUDA) and a pass touches > 2x L2; on top,
triton's do_bench clears L2 before every timed call (not under --cuda-graph, where the pool alone keeps them cold;
under --cuda-graph PEFT, which copies its row indices from the host on every call, cannot be captured: an error row).
Targets (CUDA; decode, 64 distinct rank-16 adapters in a batch of 64, on 4096x4096 and on the Llama-7B block
4 x 4096x4096 + 2 x 4096x11008 + 11008x4096, i.e. the three shapes weighted 4:2:1): fastpeft <= 1.3x base;
>= 10x faster than peft; adapter term >= 70% of the copy bandwidth. In payload["summary"] (n/a on CPU).

Serving section (--modes serve, in the default run): tokens/s of model.generate for a batch of 64 requests (quick:
4), each request its own rank-16 adapter (q/k/v/o + gate/up/down), prompt 128 (quick 8), greedy, max_new_tokens =
min_new_tokens = 64 (quick 4): base (the model without adapters), fastpeft (fp.add_adapter x 64,
generate(adapter_names=...)), peft (PeftModel with the same 64 adapters, generate(adapter_names=...)). CUDA:
LlamaForCausalLM with Llama-7B layer dims and --serve-layers layers (8), random weights, bf16, sdpa; quick: hidden
64, 2 layers, fp32. Adapters in the model's dtype in both libraries (--serve-adapter-dtype fp32: the libraries'
default on a half-precision base); PEFT's weights are copied into fastpeft's, then checked: last-token logits of
the prompt, fastpeft vs PEFT and both vs PEFT's model in float32 (CUDA) / float64 (CPU) (rel_err: within
_driver.TOLERANCE or 2x PEFT's own error, else MISMATCH), and a short greedy generation (token agreement, recorded: near-ties of a random model may flip). Time: wall clock +
torch.cuda.synchronize, median of 3 runs after one warm-up; tokens/s = B · max_new_tokens / time (prefill
included); flops (TFLOP/s column) = 2 · tokens · linear weights (+ adapters), attention left out. Target:
fastpeft's tokens/s >= 0.75x the base model's.
JSON (benchmarks/results/<device>-multi_adapter-<date>.json, rewritten after every case): environment, "config",
"cuda_ext", "peaks", "rows" (op section), "summary" (targets, decode kernel choice), "serve_config", "serve",
"serve_summary".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.ops import LoRABank, Routing, multi_lora_linear, use_backend
from fastpeft.ops import multi_lora as multi_lora_op

try:  # imported as benchmarks.multi_adapter (repo root on sys.path)
    from . import _driver
    from .common import (Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics, free_memory,
                         frozen_linear, importable_impls, is_oom, parse_dtype, pick_device, plot_ratio_to_base,
                         print_pivot, random_llama, result_path, shape_list, str_list, synchronize, takes_config,
                         time_ms, write_json)
except ImportError:  # run as a script: python benchmarks/multi_adapter.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _driver
    from benchmarks.common import (Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                                   free_memory, frozen_linear, importable_impls, is_oom, parse_dtype, pick_device,
                                   plot_ratio_to_base, print_pivot, random_llama, result_path, shape_list, str_list,
                                   synchronize, takes_config, time_ms, write_json)

BENCH = "multi_adapter"
IMPLS = ("base", "fastpeft", "fastpeft_segment", "fastpeft_decode", "fastpeft_cuda", "peft", "loop", "padded_bmm")
FAST_IMPLS = ("fastpeft", "fastpeft_segment", "fastpeft_decode", "fastpeft_cuda")
TRAIN_IMPLS = ("base", "fastpeft", "loop")
PHASES = ("decode", "prefill", "train")
SCENARIOS = ("uniform", "zipf", "none")
RANKS = ("8", "16", "64", "mixed")
MIXED_RANKS = (8, 16, 64, 128)
SCALES = (1.0, 1.5, 2.0)  # s of slot i: SCALES[i % 3] (alpha = s r)
ZIPF_EXPONENT = 1.1
NONE_REGISTERED = 8  # adapters registered (and unused) in the "none" scenario
FULL = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "decode_batches": [1, 4, 16, 64, 256],
        "prefill_batches": [1, 4, 16, 64], "prefill_len": 512, "uniform_n": [1, 8, "B"], "rank_batches": [64],
        "zipf_batches": [16, 64, 256], "mixed_batches": [16, 64, 256], "zipf_pool": 64,
        "train": {"B": 16, "n": 8, "rank": "16"}, "target": {"B": 64, "n": 64, "rank": "16"}}
QUICK = {"shapes": [(256, 256), (256, 688), (688, 256)], "decode_batches": [1, 4, 16], "prefill_batches": [4, 16],
         "prefill_len": 8, "uniform_n": [1, 8, "B"], "rank_batches": [4], "zipf_batches": [16],
         "mixed_batches": [4, 16], "zipf_pool": 64, "train": {"B": 4, "n": 2, "rank": "16"},
         "target": {"B": 16, "n": 16, "rank": "16"}}
TARGETS = {"ratio_to_base": 1.3, "speedup_over_peft": 10.0, "adapter_bw_pct": 70.0, "serve_throughput": 0.75}
BLOCK_WEIGHTS = {"square": 4, "up": 2, "down": 1}  # q, k, v, o; gate, up; down

SERVE_MODE = "serve"
SERVE_IMPLS = ("base", "fastpeft", "peft")
SERVE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVE_FULL = {"hidden": 4096, "layers": 8, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000,
              "batch": 64, "rank": 16, "prompt": 128, "new_tokens": 64, "check_tokens": 8}
SERVE_QUICK = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 128,
               "batch": 4, "rank": 16, "prompt": 8, "new_tokens": 4, "check_tokens": 4}
SERVE_RUNS = 3


# ------------------------------------------------------------------------------------------------------------
# Cases: which rows use which adapter
# ------------------------------------------------------------------------------------------------------------

def slot_ranks(rank: str, registered: int) -> list[int]:
    """The rank of every registered slot: one rank, or MIXED_RANKS cycling."""
    return [MIXED_RANKS[i % len(MIXED_RANKS)] if rank == "mixed" else int(rank) for i in range(registered)]


def registered_count(scenario: str, n: int) -> int:
    return NONE_REGISTERED if scenario == "none" else n


def row_slots(scenario: str, n: int, B: int, generator: torch.Generator) -> list[int]:
    """The slot of each of B rows (-1: none). uniform: the n adapters all present (n <= B), the other rows uniform
    over them, rows shuffled; zipf: B draws over n adapters with p(k) ∝ 1/k^1.1 (slot 0 the most popular)."""
    if scenario == "none":
        return [-1] * B
    if scenario == "uniform":
        if not 1 <= n <= B:
            raise ValueError(f"uniform scenario: n = {n} distinct adapters must be in 1..B = {B}")
        slots = torch.cat([torch.randperm(n, generator=generator), torch.randint(0, n, (B - n,), generator=generator)])
        return slots[torch.randperm(B, generator=generator)].tolist()
    if scenario == "zipf":
        p = torch.arange(1, n + 1, dtype=torch.float64).pow(-ZIPF_EXPONENT)
        return torch.multinomial(p / p.sum(), B, replacement=True, generator=generator).tolist()
    raise ValueError(f"unknown scenario {scenario!r}")


def case_specs(preset: dict, phases, shapes, batches, scenarios, ranks, prefill_len: int) -> list[dict]:
    """The preset's sparse cross product (module docstring), filtered by scenarios and ranks; `batches`, when given,
    replaces the decode and prefill batch lists."""
    specs = []
    for phase in phases:
        for K, N in shapes:
            if phase == "train":
                t = preset["train"]
                items = [(t["B"], "uniform", t["n"], t["rank"])]
            else:
                items = []
                for B in batches or preset[f"{phase}_batches"]:
                    ns = sorted({B if n == "B" else n for n in preset["uniform_n"] if (B if n == "B" else n) <= B})
                    items += [(B, "uniform", n, "16") for n in ns] + [(B, "none", 0, "16")]
                    pool = min(preset["zipf_pool"], B)
                    if B in preset["zipf_batches"]:
                        items.append((B, "zipf", pool, "16"))
                    if B in preset["rank_batches"]:
                        items += [(B, "uniform", n, r) for r in ("8", "64") for n in ns]
                    if B in preset["mixed_batches"]:
                        items += [(B, "uniform", B, "mixed"), (B, "zipf", pool, "mixed")]
            for B, scenario, n, rank in items:
                if scenario in scenarios and rank in ranks:
                    specs.append({"phase": phase, "K": K, "N": N, "B": B, "L": 1 if phase == "decode" else prefill_len,
                                  "scenario": scenario, "n": n, "rank": rank})
    return specs


def n_label(scenario: str, n: int, B: int) -> str:
    """The pivot label of the distinct-adapter setting: "1", "8", "all" (n = B) for uniform; "-" otherwise."""
    if scenario != "uniform":
        return "-"
    return "all" if n == B and B > 1 else str(n)


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def adapter_sums(slots: list[int], ranks: list[int], L: int) -> tuple[int, int]:
    """(Σ_a M_a·r_a over adapted tokens, Σ_{a in U} r_a over the distinct adapters used)."""
    used = sorted({s for s in slots if s >= 0})
    token_rank = sum(ranks[s] * L for s in slots if s >= 0)
    return token_rank, sum(ranks[s] for s in used)


def multi_flops(M: int, K: int, N: int, token_rank: int, phase: str, impl: str) -> float:
    """Useful flops of one call (module docstring)."""
    adapters = 0 if impl == "base" else token_rank * (K + N)
    fwd = 2 * M * N * K + 2 * adapters
    return float(fwd if phase != "train" else fwd + 2 * M * N * K + 4 * adapters)


def multi_bytes(M: int, K: int, N: int, distinct_rank: int, phase: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (module docstring)."""
    ad = 0 if impl == "base" else distinct_rank * (K + N)
    fwd = M * K + N * K + M * N + ad
    if phase != "train":
        return float(elem * fwd)
    bwd = (M * N + N * K + M * K) if impl == "base" else (M * N + N * K + M * K + ad) + (M * K + ad)
    return float(elem * (fwd + bwd))


def adapter_term_bytes(M: int, K: int, N: int, distinct_rank: int, elem: int) -> float:
    """What the adapter term alone moves: the used A and B, x read, y read and written."""
    return float(elem * (distinct_rank * (K + N) + M * K + 2 * M * N))


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def decode_max_tokens(value: int):
    """fastpeft.ops.multi_lora.DECODE_MAX_TOKENS = value inside the block (0: the segment kernels forced)."""
    old = multi_lora_op.DECODE_MAX_TOKENS
    multi_lora_op.DECODE_MAX_TOKENS = value
    try:
        yield
    finally:
        multi_lora_op.DECODE_MAX_TOKENS = old


def build_peft_layer(peft_linear, w, a, b, scales) -> nn.Module:
    """PEFT's lora.Linear around nn.Linear(K, N, bias=False) sharing w, holding adapter "a<i>" = (a[i], b[i]) with
    scaling s_i (lora_alpha = s_i r_i), their storage shared."""
    base = frozen_linear(w)
    layer = None
    with torch.device(w.device):  # PEFT allocates (and discards) its own A, B: do it on the device, quickly
        for i, (ai, bi, s) in enumerate(zip(a, b, scales)):
            name, r = f"a{i}", ai.shape[0]
            alpha = s * r
            if takes_config(peft_linear):
                from peft import LoraConfig

                config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)
                if layer is None:
                    layer = peft_linear(base, adapter_name=name, config=config, r=r, lora_alpha=alpha)
                else:
                    layer.update_layer(name, r, lora_alpha=alpha, config=config)
            else:  # PEFT < 0.18: keyword arguments
                kw = dict(lora_dropout=0.0, init_lora_weights=False)
                if layer is None:
                    layer = peft_linear(base, adapter_name=name, r=r, lora_alpha=alpha, **kw)
                else:
                    layer.update_layer(name, r, lora_alpha=alpha, **kw)
            layer.lora_A[name].weight = nn.Parameter(ai.detach(), requires_grad=False)
            layer.lora_B[name].weight = nn.Parameter(bi.detach(), requires_grad=False)
    layer.base_layer.weight.requires_grad_(False)
    return layer.eval()


def padded_stacks(a, b, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adapter zero-padded to the largest rank R and stacked, plus a zero slot S for rows without adapter:
    A_pad (S + 1, R, K), B_pad (S + 1, N, R) with the scale folded in."""
    R = max(t.shape[0] for t in a)
    K, N = a[0].shape[1], b[0].shape[0]
    a_pad = a[0].new_zeros(len(a) + 1, R, K)
    b_pad = b[0].new_zeros(len(a) + 1, N, R)
    with torch.no_grad():
        for i, (ai, bi, s) in enumerate(zip(a, b, scales)):
            a_pad[i, :ai.shape[0]] = ai
            b_pad[i, :, :ai.shape[0]] = bi * s
    return a_pad, b_pad


def make_item(spec: dict, slot_info: dict, impls, dtype, device, peft_linear) -> dict:
    """One set of inputs: x (B, L, K) ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r) (non-zero); in train a fixed dY;
    its own LoRABank, PEFT layer and padded stacks over its own adapters."""
    K, N, B, L, grad = spec["K"], spec["N"], spec["B"], spec["L"], spec["phase"] == "train"

    def randn(*shape, std=1.0, requires_grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std).requires_grad_(requires_grad)

    ranks, scales = slot_info["ranks"], slot_info["scales"]
    item = {"x": randn(B, L, K, requires_grad=grad), "w": randn(N, K, std=K**-0.5),
            "a": [randn(r, K, std=K**-0.5, requires_grad=grad) for r in ranks],
            "b": [randn(N, r, std=r**-0.5, requires_grad=grad) for r in ranks]}
    if grad:
        item["dy"] = randn(B, L, N)
    if set(FAST_IMPLS) & set(impls):
        item["bank"] = LoRABank(item["a"], item["b"], scales)  # points at the same tensors (no bytes counted twice)
    if "peft" in impls:
        item["peft"] = build_peft_layer(peft_linear, item["w"], item["a"], item["b"], scales)
    if "padded_bmm" in impls:
        item["a_pad"], item["b_pad"] = padded_stacks(item["a"], item["b"], scales)
    return item


def forward(impl: str, item: dict, ctx: dict) -> torch.Tensor:
    x, w = item["x"], item["w"]
    if impl == "base":
        return F.linear(x, w)
    if impl == "fastpeft":
        return multi_lora_linear(x, w, None, bank=item["bank"], adapter_index=ctx["routing"])
    if impl in ("fastpeft_segment", "fastpeft_decode"):
        with decode_max_tokens(0 if impl == "fastpeft_segment" else x.shape[0] * x.shape[1]):
            return multi_lora_linear(x, w, None, bank=item["bank"], adapter_index=ctx["routing"])
    if impl == "fastpeft_cuda":
        with use_backend("cuda"):
            return multi_lora_linear(x, w, None, bank=item["bank"], adapter_index=ctx["routing"])
    if impl == "peft":
        return item["peft"](x, adapter_names=ctx["peft_names"])
    if impl == "loop":
        B, L, K = x.shape
        x2 = x.reshape(-1, K)
        y = F.linear(x2, w)
        for slot, rows in ctx["groups"]:
            t = x2.index_select(0, rows) @ item["a"][slot].t()
            y.index_add_(0, rows, t @ item["b"][slot].t(), alpha=ctx["scales"][slot])
        return y.reshape(B, L, -1)
    if impl == "padded_bmm":
        a_g = item["a_pad"].index_select(0, ctx["pad_index"])  # (B, R, K)
        b_g = item["b_pad"].index_select(0, ctx["pad_index"])  # (B, N, R)
        return F.linear(x, w) + torch.bmm(torch.bmm(x, a_g.transpose(1, 2)), b_g.transpose(1, 2))
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict, used: list[int]) -> list[torch.Tensor]:
    """What train differentiates: x (base); x, then A and B of every used adapter (fastpeft, loop)."""
    if impl == "base":
        return [item["x"]]
    return [item["x"], *(item["a"][s] for s in used), *(item["b"][s] for s in used)]


def reference_outputs(item: dict, ctx: dict, ref_dtype: torch.dtype, train: bool) -> dict:
    """The formula in ref_dtype: {"base": [y, (dX)], "multi": [y, (dX, dA of each used slot, dB of each)]}."""
    x, w = item["x"].detach(), item["w"].to(ref_dtype)
    B, L, K = x.shape
    x2 = x.reshape(-1, K).to(ref_dtype)
    y_base = x2 @ w.t()
    y = y_base.clone()
    ts = {}
    for slot, rows in ctx["groups"]:  # token indices on the device
        a, b = item["a"][slot].detach().to(ref_dtype), item["b"][slot].detach().to(ref_dtype)
        ts[slot] = x2[rows] @ a.t()
        y[rows] += ctx["scales"][slot] * (ts[slot] @ b.t())
    out = {"base": [y_base.reshape(B, L, -1)], "multi": [y.reshape(B, L, -1)]}
    if train:
        dy = item["dy"].reshape(-1, w.shape[0]).to(ref_dtype)
        dx_base = dy @ w
        dx, da, db = dx_base.clone(), [], []
        for slot, rows in ctx["groups"]:
            a, b = item["a"][slot].detach().to(ref_dtype), item["b"][slot].detach().to(ref_dtype)
            s = ctx["scales"][slot]
            g = dy[rows] @ b
            dx[rows] += s * (g @ a)
            da.append(s * (g.t() @ x2[rows]))
            db.append(s * (dy[rows].t() @ ts[slot]))
        out["base"].append(dx_base.reshape(B, L, K))
        out["multi"] += [dx.reshape(B, L, K), *da, *db]
    return out


def case_impls(impls, phase: str, M: int) -> list[str]:
    """The impls that run in a case: train only base/fastpeft/loop; the forced fastpeft kernels at decode only, where
    they differ from the default."""
    if phase == "train":
        return [i for i in impls if i in TRAIN_IMPLS]
    decode_kernel = M <= multi_lora_op.DECODE_MAX_TOKENS
    skip = {"fastpeft_segment": phase != "decode" or not decode_kernel,
            "fastpeft_decode": phase != "decode" or decode_kernel, "fastpeft_cuda": phase != "decode"}
    return [i for i in impls if not skip.get(i, False)]


def routing_us(slots: list[int], num_slots: int, device: torch.device, L: int, reps: int) -> float:
    """Median wall-clock time of Routing.build (including its host-to-device copy) in microseconds."""
    def build():
        Routing.build(slots, num_slots, device, tokens_per_slot=L)
        synchronize(device)

    build()
    build()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        build()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------------

def run_case(run: dict, spec: dict) -> list[Row]:
    """Check and time every impl of one case on one shared input pool (each item its own adapters)."""
    args, device, dtype = run["args"], run["device"], run["dtype"]
    phase, K, N, B, L, scenario, n, rank = (spec[k] for k in ("phase", "K", "N", "B", "L", "scenario", "n", "rank"))
    M = B * L
    elem = torch.empty((), dtype=dtype).element_size()
    key = f"{args.seed}/{phase}/{K}x{N}/{B}/{L}/{scenario}/{n}/{rank}"
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    registered = registered_count(scenario, n)
    slots = row_slots(scenario, n, B, generator)
    ranks = slot_ranks(rank, registered)
    scales = [SCALES[i % len(SCALES)] for i in range(registered)]
    token_rank, distinct_rank = adapter_sums(slots, ranks, L)
    used = sorted({s for s in slots if s >= 0})
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "B": B, "L": L, "M": M, "scenario": scenario, "n": n,
            "distinct": len(used), "rank": rank, "registered": registered, "dtype": dtype_name(dtype)}
    impls = case_impls(run["impls"], phase, M)
    tolerance = _driver.TOLERANCE.get(dtype, 1e-2)
    rows = []

    def new_row(impl, ms=None, note="", err=None, extra=None):
        return Row(BENCH, case, phase, impl, ms, multi_flops(M, K, N, token_rank, phase, impl),
                   multi_bytes(M, K, N, distinct_rank, phase, impl, elem), rel_err=err, note=note, extra=extra or {})

    routing = Routing.build(slots, registered, device, tokens_per_slot=L)
    groups_host = list(routing.segments())
    ctx = {"routing": routing, "groups_host": groups_host, "scales": scales,
           "groups": [(s, rows.to(device)) for s, rows in groups_host],
           "peft_names": [f"a{s}" if s >= 0 else "__base__" for s in slots],
           "pad_index": torch.tensor([s if s >= 0 else registered for s in slots], device=device)}
    rt_us = routing_us(slots, registered, device, L, 5 if run["quick"] else 20)

    def step(impl, item):
        y = forward(impl, item, ctx)
        if phase != "train":
            return [y]
        return [y, *torch.autograd.grad(y, grad_inputs(impl, item, used), item["dy"])]

    slot_info = {"ranks": ranks, "scales": scales}
    try:
        pool = InputPool.build(lambda: make_item(spec, slot_info, impls, dtype, device, run["peft"]), device,
                               **run["pool"])
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        print(f"  {case} {phase}: {note}", flush=True)
        return [new_row(impl, note=note) for impl in impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference_outputs(pool.first, ctx, run["ref_dtype"], phase == "train")
        except Exception as exc:
            print(f"  check skipped for {case} {phase}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    grad_mode = torch.enable_grad if phase == "train" else torch.no_grad

    def failed(impl, exc, what=""):
        free_memory(device)
        note = ("OOM" if is_oom(exc) else "error") + f"{what}: {type(exc).__name__}: {str(exc)[:160]}"
        print(f"  {impl} {phase} {case}: {note}", flush=True)
        return note

    errs, notes = {}, {}
    for impl in impls if refs is not None else ():  # every check first, then the references are freed
        try:
            with grad_mode():
                errs[impl] = _driver.max_rel_err(step(impl, pool.first), refs["base" if impl == "base" else "multi"])
            if not errs[impl] <= tolerance:  # also true for nan
                notes[impl] = "MISMATCH"
                print(f"  WARNING: {impl} {phase} {case}: rel_err {errs[impl]:.2e} exceeds {tolerance}", flush=True)
        except Exception as exc:
            notes[impl] = failed(impl, exc, " in the check")
    del refs
    free_memory(device)
    for impl in impls:
        ms, note = None, notes.get(impl, "")
        if not note.startswith(("error", "OOM")):
            try:
                with grad_mode():
                    ms = time_ms(lambda: step(impl, pool.next()), device, run["timer"])
            except Exception as exc:
                note = failed(impl, exc)
        rows.append(new_row(impl, ms, note, errs.get(impl), {
            "pool_copies": len(pool), "pool_bytes": pool.item_bytes * len(pool), "routing_us": rt_us,
            "n_label": n_label(scenario, n, B)}))
    del pool
    free_memory(device)
    fill_metrics(rows, run["peaks"], base="base", peer="peft")
    case_metrics(rows, run["peaks"], adapter_term_bytes(M, K, N, distinct_rank, elem))
    return rows


def case_metrics(rows: list[Row], peaks, term_bytes: float) -> None:
    """vs_loop, vs_padded, vs_default (forced fastpeft kernels) and, for fastpeft* at decode, adapter_bw_pct."""
    ms = {r.impl: r.ms for r in rows if r.ms}
    for row in rows:
        e = row.extra
        e["vs_loop"] = ms["loop"] / row.ms if row.ms and "loop" in ms else None
        e["vs_padded"] = ms["padded_bmm"] / row.ms if row.ms and "padded_bmm" in ms else None
        e["vs_default"] = (ms["fastpeft"] / row.ms if row.ms and "fastpeft" in ms and row.impl in FAST_IMPLS[1:]
                           else None)
        e["adapter_bw_pct"] = None
        if (row.impl in FAST_IMPLS and row.mode == "decode" and row.case["distinct"] and row.ms and "base" in ms
                and row.ms > ms["base"] and peaks is not None):
            e["adapter_bw_pct"] = 100.0 * term_bytes / ((row.ms - ms["base"]) * 1e-3) / (peaks.bandwidth_gbps * 1e9)


def columns() -> list[Column]:
    return [Column("shape", "KxN", 11), Column("mode", "phase", 7), Column("B", "B", 3),
            Column("scenario", "scen", 7), Column("n", "n", 3), Column("distinct", "dist", 4),
            Column("rank", "rank", 5),
            Column("impl", "impl", 16), Column("ms", "ms", 9, ".4f"), Column("vs_base", "x base", 6, ".2f"),
            Column("vs_peer", "vs peft", 7, ".2f"), Column("vs_loop", "vs loop", 7, ".2f"),
            Column("vs_padded", "vs pad", 6, ".2f"), Column("roofline_pct", "%roof", 5, ".1f"),
            Column("adapter_bw_pct", "ad_bw%", 6, ".1f"), Column("routing_us", "rt_us", 6, ".0f"),
            Column("rel_err", "rel_err", 7, ".0e"), Column("note", "note", 4)]


# ------------------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------------------

def block_shapes(shapes: list[tuple[int, int]]) -> dict | None:
    """{"square": (h, h), "up": (h, I), "down": (I, h)} from the first square shape and its partners, or None."""
    for K, N in shapes:
        if K == N:
            for K2, N2 in shapes:
                if K2 == K and N2 != K and (N2, K) in shapes:
                    return {"square": (K, K), "up": (K, N2), "down": (N2, K)}
            return {"square": (K, K)}
    return None


def summary(flat: list[dict], preset: dict, shapes, cuda: bool, bandwidth_gbps: float | None, elem: int) -> dict:
    """The targets of the module docstring on the target case (decode, uniform, n = B distinct), and the decode
    kernel choice: in how many decode cases a forced fastpeft kernel beat the default."""
    t = preset["target"]
    block = block_shapes(shapes) or {}

    def pick(impl, shape):
        for r in flat:
            if (r["impl"] == impl and r["mode"] == "decode" and r["scenario"] == "uniform" and r["rank"] == t["rank"]
                    and r["B"] == t["B"] and r["n"] == t["n"] and (r["K"], r["N"]) == shape and r.get("ms")):
                return r
        return None

    def value(kind, parts):
        """kind over the weighted parts [(weight, shape)]: None when a row is missing."""
        rows = [(wt, pick("fastpeft", s), pick("base", s), pick("peft", s)) for wt, s in parts]
        if any(f is None or b is None for _, f, b, _ in rows):
            return None
        fast, base = sum(wt * f["ms"] for wt, f, _, _ in rows), sum(wt * b["ms"] for wt, _, b, _ in rows)
        if kind == "ratio_to_base":
            return fast / base
        if kind == "speedup_over_peft":
            return None if any(p is None for *_, p in rows) else sum(wt * p["ms"] for wt, *_, p in rows) / fast
        term = sum(wt * adapter_term_bytes(f["M"], f["K"], f["N"], f["distinct"] * int(t["rank"]), elem)
                   for wt, f, _, _ in rows)
        return None if fast <= base or not bandwidth_gbps else 100.0 * term / ((fast - base) * 1e-3) / (
            bandwidth_gbps * 1e9)

    targets = []
    scopes = []
    if "square" in block:
        scopes.append(("{}x{}".format(*block["square"]), [(1, block["square"])]))
    if len(block) == 3:
        scopes.append((f"Llama block {block['square'][0]}/{block['up'][1]} (shapes 4:2:1)",
                       [(BLOCK_WEIGHTS[k], block[k]) for k in ("square", "up", "down")]))
    for kind, op in (("ratio_to_base", "<="), ("speedup_over_peft", ">="), ("adapter_bw_pct", ">=")):
        for scope, parts in scopes:
            v = value(kind, parts)
            threshold = TARGETS[kind]
            met = None if v is None or not cuda else (v <= threshold if op == "<=" else v >= threshold)
            targets.append({"target": kind, "scope": scope, "value": v, "op": op, "threshold": threshold, "met": met})
    cases = {}
    for r in flat:
        if r["mode"] == "decode" and r["impl"] in FAST_IMPLS and r.get("ms"):
            k = (r["shape"], r["B"], r["scenario"], r["n"], r["rank"])
            cases.setdefault(k, []).append(r)
    beaten = []
    for k, rs in cases.items():
        best = min(rs, key=lambda r: r["ms"])
        default = next((r for r in rs if r["impl"] == "fastpeft"), None)
        if default is not None and best is not default and default["ms"] / best["ms"] > 1.05:
            beaten.append({"shape": k[0], "B": k[1], "scenario": k[2], "n": k[3], "rank": k[4], "best": best["impl"],
                           "speedup_over_default": default["ms"] / best["ms"]})
    return {"applicable": cuda, "case": {"phase": "decode", "scenario": "uniform", **t}, "targets": targets,
            "decode_kernels": {"cases": len(cases), "default_within_5pct_of_best": len(cases) - len(beaten),
                               "beaten": beaten}}


def print_summary(s: dict, device_type: str) -> None:
    c = s["case"]
    print(f"\ntargets (decode, {c['n']} distinct rank-{c['rank']} adapters, B = {c['B']}):")
    if not s["targets"]:
        print("  not measured: no square shape (K = N) in this run")
    for t in s["targets"]:
        label = {"ratio_to_base": "fastpeft time / base time", "speedup_over_peft": "fastpeft speed-up over peft",
                 "adapter_bw_pct": "adapter term % of copy bandwidth (estimate)"}[t["target"]]
        head = f"  target {label} {t['op']} {t['threshold']:g}, {t['scope']}:"
        if not s["applicable"]:
            print(f"{head} not applicable on {device_type} (the targets are for CUDA GPUs; the CPU runs the PyTorch "
                  "reference)")
        elif t["value"] is None:
            print(f"{head} not measured (case missing or no time above the base)")
        else:
            print(f"{head} {t['value']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    d = s["decode_kernels"]
    if s["applicable"] and d["cases"]:
        print(f"  decode kernels: the default is within 5% of the best fastpeft kernel in "
              f"{d['default_within_5pct_of_best']}/{d['cases']} cases")
        for b in d["beaten"][:12]:
            print(f"    {b['shape']} B={b['B']} {b['scenario']} n={b['n']} r={b['rank']}: {b['best']} "
                  f"{b['speedup_over_default']:.2f}x faster than the default")
    elif d["cases"]:
        print(f"  decode kernel choice: not applicable on {device_type}")


# ------------------------------------------------------------------------------------------------------------
# Serving loop: model.generate with one adapter per request
# ------------------------------------------------------------------------------------------------------------

def serve_models(base, dims: dict, impls, adapter_dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """{impl: model} and {impl: adapter dtype}: PEFT's model with `adapters` random adapters (init_lora_weights=False:
    B non-zero), fastpeft's with the same ones, PEFT's weights copied in; with `adapter_dtype` both models' adapters
    are cast to it (serving stacks keep adapters in the model's dtype; the libraries' default is float32)."""
    import fastpeft as fp

    models, dtypes = {"base": base}, {}
    r, names = dims["rank"], [f"a{i}" for i in range(dims["adapters"])]
    if "peft" in impls:
        import peft

        config = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=SERVE_TARGETS,
                                 lora_dropout=0.0, init_lora_weights=False)
        with torch.device(next(base.parameters()).device):
            pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
            for name in names[1:]:
                pm.add_adapter(name, config)
        models["peft"] = (pm.to(adapter_dtype) if adapter_dtype is not None else pm).eval()
        dtypes["peft"] = str(next(p for n, p in pm.named_parameters() if ".lora_A." in n).dtype)
    if "fastpeft" in impls:
        fm = copy.deepcopy(base)
        for name in names:
            fp.add_adapter(fm, name, fp.LoRAConfig(r=r, alpha=2 * r, target_modules=SERVE_TARGETS, init_weights=False))
        if "peft" in models:
            ours = dict(fm.named_parameters())
            with torch.no_grad():
                for n, p in models["peft"].named_parameters():
                    if ".lora_A." in n or ".lora_B." in n:
                        ours[n.removeprefix("base_model.model.").removesuffix(".weight")].copy_(p)
        models["fastpeft"] = (fm.to(adapter_dtype) if adapter_dtype is not None else fm).eval()
        dtypes["fastpeft"] = str(next(p for n, p in fm.named_parameters() if ".lora_A." in n).dtype)
    return models, dtypes


def serve_check(models: dict, ids: torch.Tensor, names: list[str], check_tokens: int, tolerance: float) -> dict:
    """With equal adapters: last-token logits of the prompt, fastpeft vs PEFT (logits_rel_err) and both against PEFT's
    model in a wider dtype (float32 on CUDA, float64 on CPU): fastpeft passes within `tolerance` of it or within 2x
    PEFT's own error; how far the adapters move the logits from the base model's; and a short greedy generation
    (the fraction of equal tokens: recorded, not judged, as near-ties of a random model may flip)."""
    peft_model = models["peft"]
    wide = torch.float64 if ids.device.type == "cpu" else torch.float32
    with torch.no_grad():
        logits = {impl: m(input_ids=ids, logits_to_keep=1, **({} if impl == "base" else {"adapter_names": names}))
                  .logits.to(wide) for impl, m in models.items()}
        oracle = copy.deepcopy(peft_model).to(wide)
        ref = oracle(input_ids=ids, logits_to_keep=1, adapter_names=names).logits
        del oracle
        free_memory(ids.device)
        tokens = {impl: generate(m, ids, names if impl != "base" else None, check_tokens)
                  for impl, m in models.items() if impl != "base"}

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    fast_err, peft_err = rel(logits["fastpeft"], ref), rel(logits["peft"], ref)
    agree = (tokens["fastpeft"] == tokens["peft"]).float().mean().item()
    return {"logits_rel_err": rel(logits["fastpeft"], logits["peft"]), "fastpeft_err_vs_wide": fast_err,
            "peft_err_vs_wide": peft_err, "logits_ok": fast_err <= max(tolerance, 2 * peft_err),
            "adapter_effect": rel(logits["fastpeft"], logits["base"]), "tokens_agree": agree,
            "tokens_equal": agree == 1.0, "check_tokens": check_tokens}


def generate(model, ids: torch.Tensor, names, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly new_tokens tokens per row; the generated part (B, new_tokens)."""
    kwargs = {"adapter_names": names} if names is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def serve_flops(dims: dict, B: int, prompt: int, new_tokens: int, with_adapters: bool) -> float:
    """2 · tokens · linear weights: every layer's linears on B·(prompt + new_tokens - 1) tokens (prefill, then one
    forward per generated token but the last), the LM head on B·new_tokens; plus the adapters; attention left out."""
    h, n, H, Hkv, I, V, r = (dims[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab",
                                               "rank"))
    D = h // H
    shapes = [(h, H * D), (h, Hkv * D), (h, Hkv * D), (H * D, h), (h, I), (h, I), (I, h)]
    weights = sum(k * m for k, m in shapes)
    adapter = sum(r * (k + m) for k, m in shapes) if with_adapters else 0
    tokens = B * (prompt + new_tokens - 1)
    return float(2 * tokens * n * (weights + adapter) + 2 * B * new_tokens * h * V)


def run_serve_section(run: dict, payload: dict, json_path: Path) -> None:
    """The serving loop: base, fastpeft and PEFT generate for the same batch; rows in payload["serve"]."""
    args, device, dtype, quick = run["args"], run["device"], run["dtype"], run["quick"]
    dims = dict(SERVE_QUICK if quick else SERVE_FULL)
    for k in ("layers", "batch", "prompt", "new_tokens"):
        dims[k] = getattr(args, f"serve_{k}") or dims[k]
    dims["adapters"] = args.serve_adapters or dims["batch"]
    notes = payload["notes"]
    impls = importable_impls([i for i in SERVE_IMPLS if i in args.impls or i == "base"],
                             {"base": "transformers", "fastpeft": "fastpeft", "peft": "peft"}, "base", notes, "serve")
    if impls is None:
        return
    B, P, T = dims["batch"], dims["prompt"], dims["new_tokens"]
    names = [f"a{i % dims['adapters']}" for i in range(B)]
    payload["serve_config"] = {
        "model": "LlamaForCausalLM, random weights" + ("" if quick else f" with Llama-7B layer dims, "
                                                       f"{dims['layers']} layers (of 32)"),
        **dims, "dtype": dtype_name(dtype), "impls": impls, "attention": "sdpa", "targets": SERVE_TARGETS,
        "lora_alpha": "2r", "rows": "request i uses adapter a<i % adapters>",
        "generate": f"greedy, max_new_tokens = min_new_tokens = {T}, KV cache",
        "timing": f"wall clock + synchronize, median of {SERVE_RUNS} after one warm-up",
        "tokens_per_s": "B * new_tokens / time (prefill included)",
        "check": "PEFT's adapters copied into fastpeft's; last-token logits rel_err and greedy token agreement",
        "target": f"tokens/s(fastpeft) / tokens/s(base) >= {TARGETS['serve_throughput']}"}
    print(f"\nServing loop: Llama hidden {dims['hidden']}, {dims['layers']} layers, intermediate "
          f"{dims['intermediate']}, vocab {dims['vocab']}, {dtype_name(dtype)}; {B} requests over {dims['adapters']} "
          f"rank-{dims['rank']} adapters; prompt {P}, {T} new tokens; impls {impls}", flush=True)
    try:
        base = random_llama(dims, P + T + 8, dtype, device, args.seed)
        cast = dtype if args.serve_adapter_dtype == "model" else None
        models, adapter_dtypes = serve_models(base, dims, impls, cast)
    except Exception as exc:
        notes.append(f"serve skipped: building the models failed: {type(exc).__name__}: {str(exc)[:200]}")
        print(f"NOTE: {notes[-1]}", flush=True)
        free_memory(device)
        return
    payload["serve_config"]["adapter_dtypes"] = adapter_dtypes
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, dims["vocab"], (B, P), generator=generator).to(device)
    check = None
    tolerance = _driver.TOLERANCE.get(dtype, 1e-2)
    if not args.no_check and "fastpeft" in models and "peft" in models:
        try:
            check = serve_check(models, ids, names, min(dims["check_tokens"], T), tolerance)
            if not check["logits_ok"]:
                print(f"  WARNING: serve: fastpeft's logits are {check['fastpeft_err_vs_wide']:.2e} from the "
                      f"{'float64' if device.type == 'cpu' else 'float32'} model (PEFT's "
                      f"{check['peft_err_vs_wide']:.2e}; tolerance {tolerance})", flush=True)
        except Exception as exc:
            print(f"  serve check failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            free_memory(device)
    case = {"model": "llama", "layers": dims["layers"], "hidden": dims["hidden"], "B": B, "prompt": P,
            "new_tokens": T, "adapters": dims["adapters"], "rank": dims["rank"], "dtype": dtype_name(dtype)}
    rows = []
    table = TablePrinter(serve_columns())
    table.header()
    for impl in impls:
        runs, note = [], ""
        try:
            with torch.no_grad():
                for _ in range(1 + SERVE_RUNS):
                    synchronize(device)
                    t0 = time.perf_counter()
                    generate(models[impl], ids, names if impl != "base" else None, T)
                    synchronize(device)
                    runs.append((time.perf_counter() - t0) * 1e3)
        except Exception as exc:
            note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
            print(f"  serve {impl}: {note}", flush=True)
            free_memory(device)
        ms = statistics.median(runs[1:]) if len(runs) == 1 + SERVE_RUNS else None
        extra = {"runs_ms": runs[1:], "tokens_per_s": B * T / (ms * 1e-3) if ms else None}
        if impl != "base" and check is not None:
            extra.update(check)
            if impl == "fastpeft" and not check["logits_ok"]:
                note = (note + " MISMATCH").strip()
        rows.append(Row(BENCH, case, SERVE_MODE, impl, ms, serve_flops(dims, B, P, T, impl != "base"), 0.0,
                        rel_err=check[f"{impl}_err_vs_wide"] if check and impl != "base" else None, note=note,
                        extra=extra))
    fill_metrics(rows, None, base="base", peer="peft")
    base_tps = next((r.extra["tokens_per_s"] for r in rows if r.impl == "base"), None)
    for row in rows:
        tps = row.extra["tokens_per_s"]
        row.extra["throughput_vs_base"] = tps / base_tps if tps and base_tps else None
        row.extra["speedup_over_peft"] = row.vs_peer
        table.row(row.flat())
    payload["serve"] = [row.flat() for row in rows]
    fast = next((r for r in payload["serve"] if r["impl"] == "fastpeft"), None)
    value = fast["throughput_vs_base"] if fast else None
    payload["serve_summary"] = {
        "applicable": device.type == "cuda", "throughput_vs_base": value, "threshold": TARGETS["serve_throughput"],
        "met": None if value is None or device.type != "cuda" else value >= TARGETS["serve_throughput"],
        "speedup_over_peft": fast["vs_peer"] if fast else None, "check": check}
    write_json(json_path, payload)
    del models, base
    free_memory(device)


def serve_columns() -> list[Column]:
    return [Column("B", "B", 4), Column("prompt", "prompt", 6), Column("new_tokens", "new", 4),
            Column("adapters", "adapt", 5), Column("impl", "impl", 8), Column("ms", "ms", 10, ".1f"),
            Column("tokens_per_s", "tok/s", 9, ".1f"), Column("throughput_vs_base", "x base tok/s", 12, ".3f"),
            Column("vs_peer", "vs peft", 7, ".2f"), Column("tflops", "TFLOP/s", 8, ".2f"),
            Column("rel_err", "logit_err", 9, ".1e"), Column("tokens_agree", "agree", 5, ".2f"),
            Column("note", "note", 4)]


def print_serve_summary(payload: dict, device_type: str) -> None:
    s = payload.get("serve_summary")
    if not s:
        return
    head = f"target serve: fastpeft tokens/s >= {s['threshold']:g}x the base model's:"
    if not s["applicable"]:
        print(f"{head} not applicable on {device_type} (the target is for CUDA GPUs)")
    elif s["throughput_vs_base"] is None:
        print(f"{head} not measured")
    else:
        peft = f"; {s['speedup_over_peft']:.2f}x PEFT's speed" if s["speedup_over_peft"] else ""
        print(f"{head} {s['throughput_vs_base']:.3f} -> {'met' if s['met'] else 'NOT met'}{peft}")
    c = s.get("check")
    if c:
        print(f"check serve: equal adapters: last-token logits fastpeft vs PEFT rel_err {c['logits_rel_err']:.1e}; "
              f"vs the wide-dtype PEFT model fastpeft {c['fastpeft_err_vs_wide']:.1e}, "
              f"PEFT {c['peft_err_vs_wide']:.1e} "
              f"({'ok' if c['logits_ok'] else 'MISMATCH'}); the adapters move them by {c['adapter_effect']:.2f} from "
              f"the base; greedy tokens agree {100 * c['tokens_agree']:.0f}% over {c['check_tokens']} tokens")


# ------------------------------------------------------------------------------------------------------------
# Command line and run
# ------------------------------------------------------------------------------------------------------------

def choice_list(choices, name: str):
    def parse(text: str) -> list[str]:
        values = str_list(text.lower())
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {name} must be among {', '.join(choices)}")
        return list(dict.fromkeys(values))
    return parse


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"benchmarks/{BENCH}.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny cases and model, fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--modes", type=choice_list(("op", SERVE_MODE), "modes"), default=["op", SERVE_MODE],
                   help="op (the linear layer) and/or serve (the serving loop); default both")
    p.add_argument("--phases", type=choice_list(PHASES, "phases"), default=list(PHASES),
                   help="op: decode,prefill,train (default all)")
    p.add_argument("--shapes", type=shape_list, help="op: KxN list (default the Llama-7B linears; quick 256x256,...)")
    p.add_argument("--batches", type=_driver.positive_ints, help="op: batch sizes B for decode and prefill "
                   "(default decode 1,4,16,64,256 and prefill 1,4,16,64)")
    p.add_argument("--scenarios", type=choice_list(SCENARIOS, "scenarios"), default=list(SCENARIOS),
                   help="op: keep the preset's cases of these scenarios (uniform,zipf,none)")
    p.add_argument("--ranks", type=choice_list(RANKS, "ranks"), default=list(RANKS),
                   help="op: keep the preset's cases of these ranks (8,16,64,mixed)")
    p.add_argument("--prefill-len", type=int, help="op: tokens per row in prefill and train (default 512, quick 8)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--impls", type=choice_list(IMPLS, "impls"), default=list(IMPLS),
                   help=f"subset of {','.join(IMPLS)} (serve uses base, fastpeft, peft)")
    p.add_argument("--serve-layers", type=int, help="serve: Llama layers (default 8, quick 2)")
    p.add_argument("--serve-batch", type=int, help="serve: requests per batch (default 64, quick 4)")
    p.add_argument("--serve-adapters", type=int, help="serve: adapters (default: one per request)")
    p.add_argument("--serve-prompt", type=int, help="serve: prompt length (default 128, quick 8)")
    p.add_argument("--serve-new-tokens", type=int, help="serve: generated tokens (default 64, quick 4)")
    p.add_argument("--serve-adapter-dtype", choices=("model", "fp32"), default="model",
                   help="serve: adapters in the model's dtype (default, as serving stacks keep them) or float32 (the "
                        "libraries' default on a half-precision base)")
    _driver.add_run_args(p)
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default 1 with --quick, else torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    return p.parse_args(argv)


def cuda_ext_status(device: torch.device) -> tuple[bool, str]:
    """Whether fastpeft_cuda can run: fastpeft.ops.cuda_ext.status(), then load() (compiles on first use)."""
    if device.type != "cuda":
        return False, f"the CUDA C++ kernel needs a CUDA device (running on {device.type})"
    from fastpeft.ops import cuda_ext

    ok, why = cuda_ext.status()
    if not ok:
        return False, why
    print(f"fastpeft_cuda: loading the CUDA C++ extension ({why}; a cold build takes minutes)", flush=True)
    start = time.perf_counter()
    try:
        cuda_ext.load()
    except Exception as exc:
        return False, f"cuda_ext.load() failed: {type(exc).__name__}: {str(exc)[:200]}"
    return True, f"{why} (load took {time.perf_counter() - start:.1f} s)"


def record(case_rows: list[Row], rows: list[Row], table, payload: dict, json_path: Path) -> None:
    """Print a case's rows, add them to payload["rows"] and rewrite the JSON (a cut-off run keeps what it has)."""
    for row in case_rows:
        table.row(row.flat())
    rows += case_rows
    payload["rows"] = [row.flat() for row in rows]
    write_json(json_path, payload)


def main(argv=None) -> int:
    """Run the benchmark: every case checked, timed and printed, the JSON rewritten after each case."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    quick = (not cuda) if args.quick is None else args.quick
    preset = QUICK if quick else FULL
    if not cuda and (args.threads or quick):
        torch.set_num_threads(args.threads or 1)  # quick: one thread (OpenMP stalls for ~0.1 s on a loaded machine)
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if not cuda and quick and args.rep_ms is None:
        args.rep_ms = 40.0  # tiny CPU cases: the figures are not the point
    timer = _driver.timer_config(cuda, quick, args)
    torch.manual_seed(args.seed)
    shapes = args.shapes or preset["shapes"]
    prefill_len = args.prefill_len or preset["prefill_len"]
    impls, notes = list(args.impls), []
    if "base" not in impls:
        impls.insert(0, "base")
    peft_cls = None
    if "peft" in impls and "op" in args.modes:
        peft_cls, why = _driver.load("peft.tuners.lora.layer", "Linear")
        if why:
            notes.append(f"peft skipped: {why}")
            impls.remove("peft")
    cuda_ok, cuda_why = (False, "not requested")
    if "fastpeft_cuda" in impls and "op" in args.modes:
        cuda_ok, cuda_why = cuda_ext_status(device)
        if not cuda_ok:
            notes.append(f"fastpeft_cuda skipped: {cuda_why}")
            impls.remove("fastpeft_cuda")
    for n in notes:
        print(f"NOTE: {n}", flush=True)
    specs = case_specs(preset, args.phases, shapes, args.batches, args.scenarios, args.ranks, prefill_len) \
        if "op" in args.modes else []
    when = datetime.now(timezone.utc)
    env = environment(device, [f"benchmarks/{BENCH}.py", *argv], when=when)
    json_path = result_path(args.out, device, BENCH, when)
    print(f"Multi-adapter LoRA benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {timer.method(device)}", flush=True)
    print(f"{len(specs)} op cases: shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; phases {args.phases}; "
          f"prefill L {prefill_len}; impls {impls}; fastpeft DECODE_MAX_TOKENS {multi_lora_op.DECODE_MAX_TOKENS}; "
          f"CUDA C++ kernel: {cuda_why}", flush=True)
    peaks = _driver.announce_peaks(device, dtype, timer)
    pool = {"min_copies": 3, "max_copies": 16} if cuda else {"min_copies": 2, "max_copies": 3}
    payload = {
        "benchmark": BENCH, **env, "complete": False, "notes": notes,
        "config": {"preset": "quick" if quick else "full", "shapes": [f"{k}x{n}" for k, n in shapes],
                   "phases": args.phases, "modes": args.modes, "batches": args.batches,
                   **{k: preset[k] for k in ("decode_batches", "prefill_batches", "uniform_n", "rank_batches",
                                             "zipf_batches", "mixed_batches", "zipf_pool", "train", "target")},
                   "prefill_len": prefill_len, "scenarios": args.scenarios, "ranks": args.ranks,
                   "mixed_ranks": list(MIXED_RANKS), "scales": list(SCALES), "zipf_exponent": ZIPF_EXPONENT,
                   "none_registered": NONE_REGISTERED, "cases": len(specs), "dtype": dtype_name(dtype),
                   "adapter_dtype": dtype_name(dtype), "impls": impls,
                   "decode_max_tokens": multi_lora_op.DECODE_MAX_TOKENS, "quick": quick, "seed": args.seed,
                   "cpu_threads": None if cuda else torch.get_num_threads(),
                   "timer": {"method": timer.method(device), **vars(timer)}, "pool": pool,
                   "check": not args.no_check, "reference": "float32" if cuda else "float64",
                   "cost_model": {"flops": "fwd 2MNK + sum_a 2 M_a r_a (K+N); train + 2MNK + sum_a 4 M_a r_a (K+N)",
                                  "bytes": "fwd e(MK + NK + MN + sum_distinct r_a (K+N)); train (module docstring)",
                                  "adapter_bw_pct": "e(sum_distinct r_a (K+N) + MK + 2MN) / (ms - ms_base) / "
                                                    "copy bandwidth (estimate)"},
                   "targets": TARGETS},
        "cuda_ext": {"usable": cuda_ok, "why": cuda_why},
        "fastpeft_backends": _driver.backends(device),
        "peaks": peaks.to_dict(),
        "rows": [],
    }
    run = {"args": args, "device": device, "dtype": dtype, "impls": impls, "timer": timer, "peaks": peaks,
           "peft": peft_cls, "quick": quick, "pool": pool, "ref_dtype": torch.float32 if cuda else torch.float64}
    rows: list[Row] = []
    if specs:
        table = TablePrinter(columns())
        table.header()
        for spec in specs:
            record(run_case(run, spec), rows, table, payload, json_path)
        elem = torch.empty((), dtype=dtype).element_size()
        payload["summary"] = summary(payload["rows"], preset, shapes, cuda, peaks.bandwidth_gbps, elem)
        write_json(json_path, payload)
    if SERVE_MODE in args.modes:
        run_serve_section(run, payload, json_path)
    payload["complete"] = True
    write_json(json_path, payload)
    finish(args, payload, json_path, dtype, device)
    return 0


def finish(args, payload: dict, json_path: Path, dtype, device) -> None:
    """The pivots of the op rows, the targets, the serving summary, and the plot."""
    flat = payload["rows"]
    keys = ("mode", "shape", "scenario", "n_label", "rank")
    pivots = [("fastpeft", "vs_base", "fastpeft time / base time (1.00 = free adapters), by B:", None),
              ("fastpeft", "vs_peer", "fastpeft speed-up over peft (peft ms / fastpeft ms), by B:", None),
              ("fastpeft", "vs_padded", "fastpeft speed-up over padded_bmm, by B:", None),
              ("fastpeft", "vs_loop", "fastpeft speed-up over the PyTorch loop, by B:", None),
              ("fastpeft", "adapter_bw_pct", "decode: fastpeft's adapter term, % of copy bandwidth (estimate), by B:",
               "decode")]
    for impl, key, title, mode in pivots:
        rows = [r for r in flat if r["impl"] == impl and (mode is None or r["mode"] == mode)]
        if rows and any(r.get(key) is not None for r in rows):
            print()
            print_pivot(rows, row_keys=keys, col_key="B", value_key=key, title=title)
    others = [r for r in flat if r["impl"] in FAST_IMPLS[1:] and r.get("vs_default") is not None]
    if others:
        print()
        print_pivot(others, row_keys=("shape", "scenario", "n_label", "rank", "impl"), col_key="B",
                    value_key="vs_default", title="decode: ms(fastpeft default) / ms(forced kernel), by B (> 1: the "
                                                  "forced kernel is faster):")
    if payload.get("summary"):
        print_summary(payload["summary"], device.type)
    print_serve_summary(payload, device.type)
    print(f"\nwrote {json_path}")
    if not args.no_plot and flat:
        plotted = [dict(r, mix=r["scenario"] if r["scenario"] != "uniform" else "uniform n=B") for r in flat
                   if r["mode"] != "train" and r["rank"] == "16"
                   and (r["scenario"] != "uniform" or r["n_label"] == "all")]
        title = (f"Multi-adapter LoRA (rank 16) vs base linear: {payload['device']['name']}, {dtype_name(dtype)}")
        png = plot_ratio_to_base(plotted, json_path.with_suffix(".png"), title=title, panel_key="shape", x_key="B",
                                 style_key="mix")
        if png:
            print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
