"""Triton kernels, one file per op family, with plain launchers. Imported lazily by fastpeft.ops.

`limits.py` is the exception: the triton-free table of what the kernels take (dtypes, activation codes, widths,
ranks, head dims), which the ops dispatch by and `import fastpeft` loads. Helpers two families share live in the
`_`-prefixed files (`_compat.py`, `_tiles.py`, `_activation.py`). Nothing here imports fastpeft.reference or
anything above this package; imports inside are relative so that tests can load a second, compiled (not
interpreted) copy of this package for ahead-of-time checks.
"""
