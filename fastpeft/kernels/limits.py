"""What the Triton kernels take: dtypes, activation codes, widths, ranks, head dims. Imports torch only.

The one place these limits are written: the kernels (fastpeft/kernels/*) are built for them and the ops
(fastpeft/ops/*) dispatch by them. Importing this module never imports triton, so the ops read it while
`import fastpeft` keeps every Triton kernel unloaded (tests/test_import.py).
"""
from __future__ import annotations

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the input dtypes every kernel takes

# The non-linearities the kernels compute in float32 (kernels/_activation.py), by AdapterHub's names, as the
# constexpr code they take. The fused bottleneck kernels take every code; the wide bottleneck path runs the codes
# below EPILOGUE_ACTIVATIONS in the LoRA GEMM's epilogue and forms the others in PyTorch before that GEMM.
ACTIVATIONS = {"linear": 0, "relu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3, "swish": 4, "silu": 4,
               "tanh": 5, "sigmoid": 6, "leakyrelu": 7, "leaky_relu": 7}
EPILOGUE_ACTIVATIONS = 6

FUSED_SHRINK_MAX_RANK = 64  # LoRA GEMM: the widest rank whose shrink x Aᵀ fits one rank block of the K loop
BOTTLENECK_MAX_WIDTH = 256  # fused bottleneck: the widest bottleneck whose (BLOCK_M x M_PAD) tiles stay in registers
MULTI_LORA_DECODE_MAX_RANK = 256  # multi-adapter LoRA decode kernel: T (BLOCK_R floats) held in registers
ATTENTION_HEAD_DIMS = (64, 80, 96, 128)  # prefix attention (padded to BLOCK_D = 64 or 128)
ATTENTION_DECODE_MAX_ROWS = 64  # split-K decode: GQA group x L_q rows at most in the packed query tile
UPDATE_MAX_RANK = 64  # the cuBLAS-base strategy's adapter kernel (kernels/lora_update.py): S (BLOCK_M x 64) in registers
