"""What a benchmark compares against may be missing here (PEFT, transformers, a CUDA build): import it, or drop
the implementation with a note that the result file keeps."""
from __future__ import annotations

import importlib


def load(module: str, name: str):
    """(module.name, None) or (None, why it cannot be imported)."""
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def importable_impls(impls: list[str], modules: dict[str, str], required: str, notes: list[str],
                     where: str) -> list[str] | None:
    """`impls` without those whose module (modules[impl]) fails to import, each dropped with a note (printed);
    None when the `required` impl's module fails: the section cannot run."""
    kept = list(impls)
    for impl, module in modules.items():
        if impl not in kept:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            notes.append(f"{where}: {module} unavailable ({type(exc).__name__}: {exc})")
            print(f"NOTE: {notes[-1]}", flush=True)
            if impl == required:
                return None
            kept.remove(impl)
    return kept
