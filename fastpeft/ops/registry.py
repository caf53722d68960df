"""What each registered op supports, for dispatch and for `fastpeft info`."""
from __future__ import annotations

import torch

OPS: dict[str, dict] = {}


def describe(name: str, *, dtypes: tuple[torch.dtype, ...], cuda: bool = False, doc: str = "") -> None:
    """Record an op: the dtypes its Triton kernels take and whether a CUDA C++ kernel exists."""
    OPS[name] = {"dtypes": dtypes, "cuda": cuda, "doc": doc}
