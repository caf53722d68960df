"""The GPU tier's pytest plugin (`pytest -p fastpeft.bench.gpu_check.tier_plugin`): the tests check correctness, so
every fastpeft autotuner there tries only plan.GPU.tier_configs configs (the largest and the smallest tile its
pruning leaves), each timed briefly: a cold Triton cache then compiles a fraction of the catalogue and the tier fits
gpu-check's budget. Imports nothing at load time (the tests' conftest sets TRITON_INTERPRET first on a CPU)."""
from __future__ import annotations

SETTINGS: dict = {}  # what the autotuners were given, for the tier's record


def pytest_configure(config) -> None:
    from .context import quick_autotune
    from .plan import GPU

    SETTINGS.update(quick_autotune(GPU.autotune_bench, GPU.tier_configs))


def pytest_report_header(config) -> str:
    return f"gpu-check tier: autotune {SETTINGS.get('autotune_bench')}, {SETTINGS.get('configs_tried')}"
