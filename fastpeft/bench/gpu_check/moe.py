"""The mixture-of-experts section: `fastpeft bench moe` (fastpeft/bench/moe.py) on one experts layer of each shape
in the plan (Mixtral: E 8, H 4096, I 14336, top-2; Qwen3-MoE: E 128, H 2048, I 768, top-8 on the GPU), forward and
forward+backward of the experts module alone: the base module without adapter, fastpeft's LoRAExperts (the segment
kernels, slot = expert) and PEFT's target_parameters (W_e + s·B_e A_e materialised per call), on shared weights,
fastpeft checked against PEFT. Its targets (targets.py): moe_vs_base and moe_vs_peft.
"""
from __future__ import annotations

import importlib.util

from .. import moe
from .context import Check


def run_moe(check: Check) -> None:
    plan = check.plan.moe
    missing = [m for m in ("peft", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        check.note(f"moe: skipped, {', '.join(missing)} not installed here")
        check.section("moe", {**plan, "skipped": f"{', '.join(missing)} not installed"})
        return
    run = check.run_for("moe", moe.IMPLS)
    layers = plan["layers"]
    config = {**plan, "impls": list(moe.IMPLS), "alpha": "2r", "targets": moe.TARGETS,
              "peft": "peft LoraConfig(target_parameters=...) (ParamWrapper)"}
    check.run_cases("moe", config, list(layers),
                    lambda name: moe.run_layer(run, name, layers[name], plan["tokens"], plan["rank"]), str,
                    moe.columns())
