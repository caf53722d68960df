"""`python -m fastpeft.bench.gpu_check [--dry-run] [--out DIR]` (make gpu-check [DRY_RUN=1] [OUT=DIR])."""
from __future__ import annotations

import os
import sys

INTERPRET = ("1", "true", "on", "yes")


def main() -> int:
    if "--dry-run" in sys.argv[1:] and os.environ.get("TRITON_INTERPRET", "0").lower() not in INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            # Triton defines its own @jit library functions, and fastpeft its kernels, as interpreter functions only
            # when the variable is set before they are defined; `python -m` has imported fastpeft (and with it
            # triton) before this line: start again with the variable set.
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "fastpeft.bench.gpu_check", *sys.argv[1:]])
    from .run import main as run
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
