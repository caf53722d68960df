"""fastpeft's benchmarks, run with `fastpeft bench <family> [options]` (or `python -m fastpeft bench <family>`);
`fastpeft bench <family> --help` lists a family's options. They ship with the package, so an installed wheel
runs them as a source checkout does; results go to benchmarks/results under the current directory (--out).

Each family is a module here (a package for the families with several sections) with a `main(argv)`; they all run
through driver.py. Importing this package imports none of them (nor torch): `FAMILIES` is the registry.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {  # the name `fastpeft bench` takes -> the module under fastpeft.bench
    "adalora": "adalora",
    "bottleneck": "bottleneck",
    "cpu": "cpu",
    "dora": "dora",
    "ia3": "ia3",
    "lora": "lora",
    "moe": "moe",
    "multi": "multi_adapter",
    "multi_adapter": "multi_adapter",
    "phm": "phm",
    "prefix": "prefix_attention",
    "prefix_attention": "prefix_attention",
    "qlora": "qlora",
    "serve": "serve",
}


def families() -> list[str]:
    """Every name `fastpeft bench` accepts, aliases included, sorted."""
    return sorted(FAMILIES)


def load(family: str) -> ModuleType:
    """The module of a family (or alias); KeyError for an unknown name."""
    return importlib.import_module(f"{__name__}.{FAMILIES[family]}")
