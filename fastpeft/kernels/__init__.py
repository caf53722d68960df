"""Triton kernels, one file per op family, with plain launchers. Imported lazily by fastpeft.ops.

Nothing here imports fastpeft.reference or anything above this package; imports inside are relative so
that tests can load a second, compiled (not interpreted) copy of this package for ahead-of-time checks.
"""
