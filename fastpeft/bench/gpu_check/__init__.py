"""`make gpu-check` (`python -m fastpeft.bench.gpu_check`): the one command a lent GPU runs first, at most 8 minutes
on an H100/H200 with every Triton compile and autotune and the CUDA C++ build included (plan.py: the budget, the
time guard, the autotune limits).

    make gpu-check                    # the GPU: results into benchmarks/results, fastpeft/data/strategies.json set
    make gpu-check OUT=DIR            # results into DIR (with a copy of the strategy table to bring back)
    make gpu-check DRY_RUN=1          # the same code on the CPU: Triton interpreter, tiny sizes, a temp dir
    python -m fastpeft.bench.gpu_check --skip-tests --autotune-configs 0 --out DIR   # a rerun on a warm cache
    FASTPEFT_GIT_COMMIT=<sha> make gpu-check      # the commit to record where the tree has no .git

In order (each section's cases checked against a reference, then timed: CUDA events through
triton.testing.do_bench, median; the dry run a wall-clock median):
1. tier.py      the GPU test tier: pytest -m gpu on the files with the marker, in a subprocess (tier_plugin.py:
                two autotune configs per key there), counts and wall time; a failure is recorded, the run goes on
2. run.py       the ceilings: device-to-device copy GB/s and cuBLAS bf16 GEMM TFLOP/s (roofline.measure_peaks)
3. linear.py    LoRA (M 1..16384 x three Llama-8B linears x r 16, 64 x dropout 0, 0.05), DoRA and IA3 (pruned
                grids): base (F.linear), fastpeft "fused" and "cublas" (the strategy pinned), PEFT's layer, forward
                and forward+backward, bf16
4. multi.py     multi-LoRA decode and prefill with 64 distinct rank-16 adapters
5. prefix.py    prefix attention vs SDPA without the prefix
6. train.py     one training step of a ~1B random Llama, LoRA r 16 on every projection: fastpeft (both pins) vs
                PEFT from the same A and B: tokens/s, step memory, loss and gradient parity against float32
7. targets.py   issue 15's targets (recorded, not asserted) and the strategy table: per op and row bucket the
                faster strategy (targets.RULE), written by fastpeft.ops.strategy.write_table on a real GPU
8. summary.py   gpu-check-<device>-<date>.json (device, versions, commit, command, raw rows, targets, the table),
                .md, -<section>.png, -gpu-tests.log (and -strategies.json on a GPU); the markdown printed last
context.py holds what the sections share (the pins, the families' Run, the guarded case loop, the autotune limits).
"""
