"""The multi-adapter op section's cases (which batch rows use which adapter) and their cost model.

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
Quick preset: shapes 256x256, 256x688, 688x256 (the same 4:2:1 block), decode B 1, 4, 16, prefill B 4, 16, L 8.

Cost model (e bytes per element, M = B·L tokens, M_a tokens of adapter a, r_a its rank, U the distinct adapters
of the batch; base: no adapter terms):
    flops   fwd 2·M·N·K + Σ_a 2·M_a·r_a·(K + N);   train fwd + 2·M·N·K + Σ_a 4·M_a·r_a·(K + N)
    bytes   fwd e·(M·K + N·K + M·N + Σ_{a in U} r_a·(K + N))   x, W, y once, each distinct adapter's A and B once
            train fwd + e·(M·N + N·K + M·K + ad) + e·(M·K + ad), ad = Σ_{a in U} r_a·(K + N) (read dY, W, x, A, B;
            write dX, dA, dB)
% of roofline = 100 · max(flops / peak matmul, bytes / peak bandwidth) / time (peaks measured in the run).
"""
from __future__ import annotations

import torch

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
