"""Tier 3, the static performance gate: every Triton kernel compiled ahead of time for sm_80 and sm_90, for every
config autotune may pick, and what the compiler reports and emits held to the rules of DESIGN.md.

- zero spill bytes (ptxas -v) in every bfloat16/float16 config on both architectures (float32 rows are reported in
  the table, not gated: their "ieee"/tf32 dots have no wgmma path and float32 tiles are twice the registers);
- shared memory within each architecture's per-block limit;
- tensor-core instructions in every half-precision matrix kernel; on sm_90, wgmma (not serialised for lack of
  registers) for every dot whose tile has >= 64 rows, and a GEMM main loop that keeps at least one wgmma group in
  flight (wgmma.wait_group >= 1 inside the loop), except the loops listed in LOOP_EXCEPTIONS with their reason;
- what autotune picks is what is gated: besides the catalogue, every config autotune may pick when the linear ops
  run at model shapes (tests/aot.representative_launches) is compiled, on both architectures.
The rows are written to build/aot-report.json; benchmarks/results/static-gate.json is the committed table
(`make static-gate` regenerates it), and must match what this compiler produces.
"""
from __future__ import annotations

import json

import pytest

from tests.aot import ELEMENTWISE_KERNELS, ROOT, STATIC_GATE, gate_table, kernels_defined, run_in_subprocesses

pytest.importorskip("triton")

# Loops that wait for every wgmma group each iteration by construction, by (kernel, constexpr switch of the
# variant, or None: every variant) -> why. The gate still holds these variants to no spills.
_SOFTMAX = ("flash-attention loop: S = QKᵀ feeds the softmax (and dP feeds dS) in the same iteration, so triton "
            "waits for every group after that dot; the accumulating dot (P·V, dQ, dK/dV) is issued last and runs "
            "while the next tiles are waited for. Keeping S of the next block in flight needs warp specialisation")
LOOP_EXCEPTIONS: dict[tuple[str, str | None], str] = {
    ("lora_reduce_kernel", "DROPOUT"): "dA = (S ⊙ s)ᵀ drop(X): the dropout mask is applied to the X tile in "
    "registers each step, and that operand cannot stay in flight",
    ("prefix_attention_fwd_kernel", None): _SOFTMAX,
    ("prefix_attention_bwd_dq_kernel", None): _SOFTMAX,
    ("prefix_attention_bwd_dkdv_kernel", None): _SOFTMAX,
    ("prefix_attention_decode_kernel", None): _SOFTMAX,
}
# Variants whose wgmma ptxas serialises by construction (C7515: "non-wgmma instructions defining accumulator
# registers"), by (kernel, constexpr switch): the gate still holds them to no spills and wgmma in flight.
SERIALIZED_EXCEPTIONS = {
    ("lora_gemm_kernel", "IN_SCALE"): "IA3's input scale (and DoRA's dY column scale) multiplies the x tile in "
    "registers each K step, so the A operand is formed in registers; IA3 runs the cuBLAS-base strategy unless a "
    "measured strategy table picks fused",
    ("lora_shrink_kernel", "DROPOUT"): "T = drop(x) Aᵀ: the mask is applied to the x tile in registers",
    ("lora_reduce_kernel", None): "dA, dB = (S ⊙ s)ᵀ X: the scaled float32 S is rounded to the input dtype in "
    "registers each step as the left operand (and with dropout the mask is applied to the X tile in registers)",
}
# The config key that is the dot's row count, where it is not BLOCK_M: transposed products (Sᵀ = Uᵀ Xᵀ), whose
# rows are the rank block.
DOT_ROWS = {"multi_lora_shrink_kernel": "BLOCK_R", "multi_lora_reduce_kernel": "BLOCK_R",
            "lora_reduce_kernel": "BLOCK_R"}


@pytest.fixture(scope="module")
def rows():
    rows = run_in_subprocesses()
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "aot-report.json").write_text(json.dumps(rows, indent=1))
    return rows


def _where(row) -> str:
    return f"{row['kernel']} ({row['variant']}, {row['dtype']}, {row['arch']}, {row['config']})"


def _half(row) -> bool:
    return row["dtype"] in ("bfloat16", "float16")


def _excepted(row, exceptions) -> bool:
    _, _, flags = json.loads(row["variant_key"])
    return any(kernel == row["kernel"] and (flag is None or flags.get(flag)) for kernel, flag in exceptions)


def _dot_rows(row) -> int:
    key = DOT_ROWS.get(row["kernel"], "BLOCK_M")
    return row["config"].get(key) or json.loads(row["variant_key"])[2].get(key) or 0


def test_every_kernel_is_compiled(rows):
    assert kernels_defined() <= {row["kernel"] for row in rows}, "add the missing kernels to tests/aot.CATALOG"


def test_no_spills_in_half_precision(rows):
    spilled = [f"{_where(r)}: {r['spill_stores']} B stored / {r['spill_loads']} B loaded, {r['registers']} registers"
               for r in rows if _half(r) and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, "\n".join(spilled)


def test_shared_memory_fits_each_architecture(rows):
    from fastpeft.kernels._tiles import SHARED_PER_BLOCK
    from tests.aot import ARCHS

    too_big = [f"{_where(r)}: {r['shared_bytes']} B > {SHARED_PER_BLOCK[ARCHS[r['arch']]]} B" for r in rows
               if r["shared_bytes"] > SHARED_PER_BLOCK[ARCHS[r["arch"]]]]
    assert not too_big, "\n".join(too_big)


def test_half_precision_matrix_kernels_use_tensor_cores(rows):
    missing = [_where(r) for r in rows if _half(r) and r["kernel"] not in ELEMENTWISE_KERNELS
               and not (r["mma_sync"] or r["wgmma"])]
    assert not missing, "\n".join(missing)


def test_tall_tiles_use_wgmma_on_hopper(rows):
    """On sm_90 a dot with a >= 64-row tile (BLOCK_M of the config, DOT_ROWS' key for transposed products)
    compiles to wgmma, never serialised."""
    bad = [_where(r) + (": serialised (registers)" if r["wgmma_serialized"] else ": no wgmma") for r in rows
           if r["arch"] == "sm90" and _half(r) and r["kernel"] not in ELEMENTWISE_KERNELS
           and _dot_rows(r) >= 64
           and (not r["wgmma"] or (r["wgmma_serialized"] and not _excepted(r, SERIALIZED_EXCEPTIONS)))]
    assert not bad, "\n".join(bad)


def test_main_loops_keep_a_wgmma_group_in_flight(rows):
    """On sm_90, in every kernel with a wgmma loop, the best loop (the main K loop) keeps >= 1 group in flight."""
    waiting = [f"{_where(r)}: wait_group depths per loop {r['loop_wgmma_waits']}" for r in rows
               if r["arch"] == "sm90" and _half(r) and r["loop_wgmma_waits"] and max(r["loop_wgmma_waits"]) < 1
               and not _excepted(r, LOOP_EXCEPTIONS)]
    assert not waiting, "\n".join(waiting)


def test_hopper_gemm_moves_tiles_with_tma(rows):
    """The linear ops' GEMM has a Hopper path (kernels/lora_tma.py) that autotune reaches on sm_90 for the forward,
    dX with the dropout mask and the column-scaled forward (DoRA, IA3): its operand tiles arrive by TMA bulk
    tensor copies and feed unserialised wgmma; sm_80 keeps the pointer GEMM (cp.async, mma.sync)."""
    hopper = [r for r in rows if r["kernel"] == "lora_gemm_tma_kernel"]
    assert hopper and all(r["arch"] == "sm90" for r in hopper)
    bad = [_where(r) for r in hopper if _half(r) and not (r["tma"] and r["wgmma"] and not r["wgmma_serialized"])]
    assert not bad, "\n".join(bad)
    flags = [json.loads(r["variant_key"])[2] for r in hopper if r["family"] == "model_shapes"]
    assert any(f["MASK_LORA"] for f in flags) and any(f["OUT_SCALE"] and f["WRITE_Z"] for f in flags)
    assert any(f["W_NK"] for f in flags) and any(not f["W_NK"] for f in flags)  # nn.Linear's W and dX's
    ampere = {r["kernel"] for r in rows if r["arch"] == "sm80" and r["family"] == "lora" and _half(r)}
    assert "lora_gemm_kernel" in ampere and all(r["cp_async"] for r in rows if r["arch"] == "sm80"
                                                 and r["kernel"] == "lora_gemm_kernel" and _half(r))


def test_model_shapes_reach_every_linear_path(rows):
    """The launches at model shapes (both strategies, LoRA/DoRA/IA3, dropout, rank blocks 16 and 64) include the
    paths a fixed catalogue missed before, so the rules above hold for what autotune really picks."""
    reached = [json.loads(r["variant_key"]) for r in rows if r["arch"] == "sm90"]
    has = lambda kernel, **flags: any(k == kernel and all(f.get(n) == v for n, v in flags.items())  # noqa: E731
                                      for k, _, f in reached)
    assert has("lora_gemm_kernel", FUSED_SHRINK=True, MASK_LORA=True), "dX with fused shrink and the dropout mask"
    assert has("lora_gemm_kernel", BLOCK_R=64) and has("lora_shrink_kernel", BLOCK_R=64)
    assert has("lora_update_kernel", MASK_OUT=True) and has("lora_update_kernel", MASK_IN=True, OUT_SCALE=True)
    assert any(r["family"] == "model_shapes" for r in rows)


def test_committed_table_is_current(rows):
    """benchmarks/results/static-gate.json is what this compiler emits (same triton and ptxas versions)."""
    committed = json.loads(STATIC_GATE.read_text())
    fresh = gate_table(rows)
    if committed["versions"] != fresh["versions"]:
        pytest.skip(f"the committed table was made with {committed['versions']}, this is {fresh['versions']}")
    canonical = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    stale = sorted(set(map(canonical, fresh["rows"])) ^ set(map(canonical, committed["rows"])))
    assert not stale, (f"benchmarks/results/static-gate.json is stale ({len(stale)} rows differ): run "
                       f"`make static-gate` and commit it. First: {stale[:3]}")
