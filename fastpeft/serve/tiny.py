"""A tiny model to serve with no download: `python -m fastpeft.serve.tiny DIR` writes, all random but seeded,

    DIR/                  a Llama-architecture model (fastpeft/data/tiny_llama.json unless overridden) and a
                          byte-level tokenizer with a chat template (tokens 0-255 are bytes; <s> </s> <pad> follow)
    DIR/adapters/NAME     LoRA adapters (fastpeft format) with non-zero weights, so each answers differently

then `fastpeft serve --model DIR --adapter a=DIR/adapters/a --adapter b=DIR/adapters/b` serves them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def byte_tokenizer():
    """A transformers fast tokenizer whose tokens 0-255 are the bytes, then <s> (256), </s> (257), <pad> (258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in _byte_symbols().items()}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(seed: int = 0, **overrides):
    """The tiny random Llama (fastpeft/data/tiny_llama.json, with `overrides`), float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = json.loads(resources.files("fastpeft").joinpath("data", "tiny_llama.json").read_text(encoding="utf-8"))
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def save_lora(model, directory: str, name: str, seed: int, r: int = 8, **options) -> str:
    """Add a LoRA adapter with random non-zero weights to `model`, save it to `directory`, delete it again."""
    import torch

    import fastpeft as fp

    fp.add_adapter(model, name, fp.LoRAConfig(r=r, alpha=2 * r, target_modules="all-linear", **options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(f"lora_B.{name}") or pname.endswith(f"lora_A.{name}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    fp.save_adapter(model, directory, name)
    fp.delete_adapter(model, name)
    return directory


def write(directory: str, adapters=("a", "b"), seed: int = 0, **overrides) -> str:
    """Write the model, its tokenizer and `adapters` (LoRA, r=8) under `directory`; returns it."""
    model = build_model(seed, **overrides)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    for i, name in enumerate(adapters):
        save_lora(model, os.path.join(directory, "adapters", name), name, seed=seed + 1 + i)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpeft.serve.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--adapters", default="a,b", help="comma-separated adapter names (default a,b)")
    args = parser.parse_args(argv)
    names = [n for n in args.adapters.split(",") if n]
    write(args.directory, names)
    flags = " ".join(f"--adapter {n}={os.path.join(args.directory, 'adapters', n)}" for n in names)
    print(f"wrote {args.directory}; serve it with: fastpeft serve --model {args.directory} {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
