"""What gpu-check measures and how long it may take: the GPU plan, the dry-run plan, the time budget.

The budget (issue 15: at most 8 minutes on the GPU, every Triton compile and autotune and the CUDA C++ build
included): the clock starts once the imports are done (STARTUP_S before it); the GPU test tier gets at most
TIER_S (its process is killed there and the cut recorded); every later section gets, when it starts,

    deadline = now + (time left - FINISH_S) x share / (sum of the shares of this and the later sections)

so a section that finishes early leaves its time to the later ones and one that overruns shrinks them. A section
checks its deadline before every case and records the cases it skipped ("skipped": the time guard).

Compiles dominate a cold run (about a second per Triton config on the GPU host, some 200 kernel variants x configs
in the sections): autotune tries at most `autotune_configs` configs per key in the sections (5 of the GEMMs' 10,
evenly spaced from the largest tile to the smallest) and `tier_configs` in the test tier, each timed with
do_bench(warmup=5, rep=25) (context.quick_autotune). `--autotune-configs 0` tries them all (a rerun on a warm cache).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..timing import TimerConfig

TOTAL_S = 470.0  # the whole run on the GPU: 8 minutes less a margin
STARTUP_S = 15.0  # python, torch, triton, transformers and peft imports before the clock starts
FINISH_S = 15.0  # the strategy table, the summary and the plots, after the last section
SHARES = {"peaks": 2, "lora": 30, "dora": 9, "ia3": 7, "multi_lora": 10, "prefix_attention": 8, "train_step": 22,
          "lora_4bit": 7, "qlora": 6, "serve": 15, "moe": 6}
SECTIONS = tuple(SHARES)

M_GRID = (16384, 4096, 256, 16, 1)  # largest first: the time guard cuts the small-M cases of a section first


@dataclass(frozen=True)
class Plan:
    """The sizes of every section (one per run kind) and the budget; times in seconds."""
    dtype: str
    total_s: float
    tier_s: float
    timer: TimerConfig
    peaks: dict  # measure_peaks keywords (matmul_n, copy_bytes); {} for its CUDA defaults
    lora: dict  # shapes (K, N), m, blocks: (r, dropout) in the order they run
    dora: dict  # shapes, m, ranks
    ia3: dict  # cases (K, N, ia3 mode), m
    multi: dict  # shapes, adapters (distinct, rank 16), decode batch, prefill batch x length
    prefix: dict  # lengths, prefix lengths, modes, tokens per call, heads, kv heads, head dim
    train: dict  # the Llama's dims, batch, seq, LoRA rank, alpha, targets
    lora_4bit: dict  # shapes (K, N), m, ranks of the 4-bit layer
    qlora: dict  # fastpeft bench qlora's model dims and token shapes (batch x seq)
    autotune_bench: dict = field(default_factory=dict)  # triton.testing.do_bench keywords for autotune
    autotune_configs: int = 0  # the configs autotune tries per key in the sections (0: all its pruning leaves)
    tier_configs: int = 0  # the same in the GPU test tier (correctness only: two tiles are enough)
    serve: dict = field(default_factory=dict)  # the serving engine's model dims, adapter counts, rank, popularity,
    # requests, prompt and generated lengths (gpu_check/serving.py)
    moe: dict = field(default_factory=dict)  # fastpeft bench moe's experts layers (family, E, H, I, top-k), tokens,
    # rank (gpu_check/moe.py)


LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 32000}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

GPU = Plan(
    dtype="bf16", total_s=TOTAL_S - STARTUP_S, tier_s=180.0,
    timer=TimerConfig(warmup_ms=5.0, rep_ms=40.0, warmup_calls=1),
    peaks={},
    lora={"shapes": [(4096, 4096), (4096, 14336), (14336, 4096)], "m": list(M_GRID),
          "blocks": [(16, 0.0), (64, 0.0), (16, 0.05), (64, 0.05)]},
    dora={"shapes": [(4096, 4096), (4096, 14336)], "m": list(M_GRID), "ranks": [16]},
    ia3={"cases": [(4096, 4096, "out"), (14336, 4096, "in")], "m": list(M_GRID)},
    multi={"shapes": [(4096, 4096), (4096, 14336), (14336, 4096)], "adapters": 64, "decode_batch": 64,
           "prefill_batch": 64, "prefill_len": 64, "pool": {"min_copies": 3, "max_copies": 8}},
    prefix={"lengths": [1024, 4096], "prefix_lengths": [30], "modes": ["fwd+bwd", "decode", "fwd"], "tokens": 16384,
            "heads": 32, "kv_heads": 32, "head_dim": 128},
    train={**LLAMA_1B, "batch": 4, "seq": 512, "r": 16, "alpha": 32, "targets": TARGET_MODULES, "rep_ms": 300.0,
           "min_s": 20.0},
    lora_4bit={"shapes": [(4096, 4096), (4096, 14336)], "m": list(M_GRID), "ranks": [16]},
    qlora={"dims": {"hidden": 2048, "layers": 4, "heads": 16, "intermediate": 5632, "vocab": 32000, "reps": 5,
                    "rank": 16}, "tokens": ["4x512", "16x1"]},
    autotune_bench={"warmup": 5, "rep": 25}, autotune_configs=5, tier_configs=2,
    serve={"dims": {**LLAMA_1B, "layers": 8}, "adapters": [0, 64], "popularity": ["uniform", "zipf"], "rank": 16,
           "requests": 64, "prompt_len": 128, "gen_len": 64},
    moe={"layers": {"mixtral": ("mixtral", 8, 4096, 14336, 2), "qwen3_moe": ("qwen3_moe", 128, 2048, 768, 8)},
         "tokens": 4096, "rank": 16},
)

DRY = Plan(  # the same code on the CPU: Triton interpreter, tiny sizes, a wall-clock timer
    dtype="bf16", total_s=240.0, tier_s=90.0,
    timer=TimerConfig(warmup_ms=0.0, rep_ms=0.0, warmup_calls=0, min_reps=1, max_reps=1),
    peaks={"matmul_n": 128, "copy_bytes": 2**20},
    lora={"shapes": [(64, 64)], "m": [16, 1], "blocks": [(4, 0.0), (4, 0.05)]},
    dora={"shapes": [(64, 64)], "m": [16, 1], "ranks": [4]},
    ia3={"cases": [(64, 64, "out"), (64, 64, "in")], "m": [16, 1]},
    multi={"shapes": [(64, 64)], "adapters": 4, "decode_batch": 4, "prefill_batch": 4, "prefill_len": 4,
           "pool": {"min_copies": 1, "max_copies": 1}},
    prefix={"lengths": [16], "prefix_lengths": [4], "modes": ["fwd+bwd", "decode", "fwd"], "tokens": 32, "heads": 2,
            "kv_heads": 2, "head_dim": 64},
    train={"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "batch": 2,
           "seq": 8, "r": 4, "alpha": 8, "targets": ["q_proj", "down_proj"], "rep_ms": 0.0,
           "min_s": 0.0},  # two LoRA layers per block: the interpreter is slow
    lora_4bit={"shapes": [(64, 96)], "m": [16, 1], "ranks": [4]},
    qlora={"dims": {"hidden": 64, "layers": 1, "heads": 4, "intermediate": 128, "vocab": 128, "reps": 1, "rank": 4},
           "tokens": ["1x4"]},
    autotune_bench={"warmup": 5, "rep": 25}, autotune_configs=5, tier_configs=2,  # one config under the interpreter
    serve={"dims": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128},
           "adapters": [0, 4], "popularity": ["uniform", "zipf"], "rank": 4, "requests": 6, "prompt_len": 8,
           "gen_len": 4},
    moe={"layers": {"mixtral": ("mixtral", 4, 64, 96, 2), "qwen3_moe": ("qwen3_moe", 8, 32, 24, 4)}, "tokens": 8,
         "rank": 4},
)


class Budget:
    """The run's clock: `left()` seconds of plan.total_s; `deadline(section)` by the shares (module docstring)."""

    def __init__(self, total_s: float, start: float | None = None):
        self.total_s = total_s
        self.start = time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def deadline(self, section: str) -> float:
        """monotonic() time by which `section` should be done."""
        later = SECTIONS[SECTIONS.index(section):]
        share = SHARES[section] / sum(SHARES[s] for s in later)
        return time.monotonic() + max(0.0, (self.left() - FINISH_S) * share)


class Guard:
    """A section's time guard: `expired()` once its deadline has passed; the cases it skipped, by name."""

    def __init__(self, budget: Budget, section: str):
        self.section = section
        self.started = time.monotonic()
        self.deadline = budget.deadline(section)
        self.allowed_s = self.deadline - self.started
        self.skipped: list[str] = []

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def skip(self, case: str) -> None:
        if not self.skipped:
            print(f"  time guard: {self.section} is past its {self.allowed_s:.0f} s; skipping its remaining cases",
                  flush=True)
        self.skipped.append(case)

    def record(self) -> dict:
        """What the JSON keeps about the guard: the time allowed and taken, the cases skipped."""
        return {"allowed_s": round(self.allowed_s, 1), "wall_s": round(time.monotonic() - self.started, 1),
                "skipped": self.skipped}
