"""What each registered op supports, for dispatch and for `fastpeft info`."""
from __future__ import annotations

import torch

OPS: dict[str, dict] = {}


def describe(name: str, *, dtypes: tuple[torch.dtype, ...], cuda: bool = False, doc: str = "",
             note: str = "") -> None:
    """Record an op: the dtypes its Triton kernels take, whether a CUDA C++ kernel exists, and a note on any
    shape rule of its own dispatch (shown by `fastpeft info`)."""
    OPS[name] = {"dtypes": dtypes, "cuda": cuda, "doc": doc, "note": note}
