"""One implementation's measurement in a case: its outputs checked against the reference, then its median time over
the input pool; a failure (out of memory, an error) becomes the row's note instead of ending the run."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .checks import max_rel_err, tolerance
from .devices import failure_note, free_memory
from .driver import Run
from .inputs import InputPool
from .timing import time_ms


def check_and_time(run: Run, label: str, step: Callable[[Any], list], check: tuple[Any, list] | None,
                   pool: InputPool, grad_mode: Callable) -> tuple[float | None, float | None, str]:
    """(ms, rel_err, note) of step, one implementation's call on a pool item -> its outputs, under grad_mode().

    With check = (inputs, reference outputs): the outputs on those inputs against the reference first (note
    "MISMATCH" above the dtype's tolerance); then time_ms over the pool's items in turn. An exception becomes the
    note ("OOM: ..." or "error: ..."). `label` names the row in the printed warnings."""
    ms, err, note = None, None, ""
    limit = tolerance(run.dtype)
    try:
        with grad_mode():
            if check is not None:
                err = max_rel_err(step(check[0]), check[1])
                if not err <= limit:  # also true for nan
                    note = "MISMATCH"
                    print(f"  WARNING: {label}: rel_err {err:.2e} exceeds {limit}", flush=True)
            ms = time_ms(lambda: step(pool.next()), run.device, run.timer)
    except Exception as exc:
        note = failure_note(exc)
        print(f"  {label}: {note}", flush=True)
        free_memory(run.device)
    return ms, err, note
