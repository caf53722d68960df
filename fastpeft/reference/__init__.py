"""Pure-PyTorch implementations of every fastpeft op: the CPU kernels and the test oracles.

Nothing here imports triton or anything above this package.
"""
