"""Quantized models the tests load: a transformers model folder loaded in bitsandbytes 4-bit."""
from __future__ import annotations

import warnings

import torch
import transformers


def load_4bit(folder, *, compute_dtype: torch.dtype = torch.float32, double_quant: bool = False, **kwargs):
    """The model saved in `folder`, loaded in bitsandbytes 4-bit NF4 (`kwargs`: from_pretrained's, e.g. dtype,
    device_map)."""
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=double_quant,
                                                   bnb_4bit_compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, **kwargs)
