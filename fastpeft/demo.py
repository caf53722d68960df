"""`fastpeft demo`: the whole LoRA workflow on a tiny model, on the CPU, in well under a minute, with no downloads.

1. Build a tiny Llama-architecture model from fastpeft/data/tiny_llama.json (random weights).
2. Add LoRA to every linear layer (plus trainable copies of the embeddings and the output head).
3. Train it on fastpeft/data/lighthouse.txt, byte by byte, with a progress bar showing the loss.
4. Merge the adapter into the base weights and check the outputs did not change.
5. Generate a continuation of a prompt.
6. Time one training step (forward + backward + optimizer) with fastpeft and with PEFT on the same model.

The base model is random, not pretrained: LoRA here learns the text's bytes from scratch through its low-rank
updates and the trainable embeddings/head, which is enough to see the loss fall and the sample turn English-like.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from importlib import resources

import torch

import fastpeft as fp
from fastpeft.modules import LoRALinear

ADAPTER = "default"
PROMPT = "The keeper "


class ByteTokenizer:
    """Bytes 0-255 are tokens 0-255; then BOS, EOS and PAD."""

    bos, eos, pad = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return ([self.bos] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def read_data(name: str) -> str:
    """A file shipped in fastpeft/data."""
    return resources.files("fastpeft").joinpath("data", name).read_text(encoding="utf-8")


def build_model(seed: int):
    """The tiny random-init Llama from fastpeft/data/tiny_llama.json, in eval mode, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**json.loads(read_data("tiny_llama.json")))
    if config.vocab_size != ByteTokenizer.vocab_size:
        raise ValueError(f"tiny_llama.json: vocab_size is {config.vocab_size}; the byte tokenizer needs "
                         f"{ByteTokenizer.vocab_size}.")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def lora_settings(r: int = 16) -> dict:
    """The adapter used for both fastpeft and PEFT: LoRA on all linears, embeddings and head trained in full."""
    return {"r": r, "alpha": 2 * r, "target_modules": "all-linear", "modules_to_save": ["embed_tokens", "lm_head"]}


def windows(ids: torch.Tensor, length: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` windows of `length` tokens: random starts with a generator, else evenly spaced."""
    last = len(ids) - length
    if generator is None:
        starts = torch.linspace(0, last, count).long()
    else:
        starts = torch.randint(0, last + 1, (count,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@torch.no_grad()
def eval_loss(model, batch: torch.Tensor) -> float:
    return loss_of(model, batch).item()


def train(model, ids: torch.Tensor, *, steps: int, batch: int, length: int, lr: float, seed: int,
          quiet: bool = False) -> None:
    """AdamW on the trainable parameters; a tqdm bar shows the (smoothed) training loss."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)  # linear warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    smooth = None
    with tqdm(range(steps), desc="training", unit="step", disable=quiet) as bar:
        for _ in bar:
            loss = loss_of(model, windows(ids, length, batch, gen))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
            bar.set_postfix(loss=f"{smooth:.3f}")
    model.eval()


@torch.no_grad()
def generate(model, tok: ByteTokenizer, prompt: str, new_tokens: int, seed: int) -> str:
    """A sampled continuation of `prompt` (temperature 0.7, top-k 20; seeded)."""
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
                         temperature=0.7, top_k=20, pad_token_id=tok.pad, eos_token_id=tok.eos)
    return tok.decode(out[0, ids.shape[1]:])


def step_times(models: dict, batch: torch.Tensor, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) per model, steps interleaved."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + reps):
        for k, m in models.items():
            m.train()
            t0 = time.perf_counter()
            loss_of(m, batch).backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peft_model(seed: int):
    """(the same base model with the same adapter through PEFT, None), or (None, why PEFT cannot be used)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        return None, f"peft is not installed ({exc}); pip install peft to compare"
    s = lora_settings()
    try:
        config = LoraConfig(r=s["r"], lora_alpha=s["alpha"], target_modules=s["target_modules"],
                            modules_to_save=s["modules_to_save"], lora_dropout=0.0)
        with warnings.catch_warnings():  # PEFT calls transformers APIs that transformers has deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(build_model(seed), config), None
    except Exception as exc:
        return None, f"peft failed to add the adapter ({type(exc).__name__}: {exc})"


def run(*, steps: int, seed: int, quick: bool) -> int:
    """The demo; returns the exit status (1 when the loss did not fall or the merge changed the outputs)."""
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    text = read_data("lighthouse.txt")
    ids = torch.tensor(tok.encode(text))
    length, batch = 128, 8
    eval_batch = windows(ids, length, 16)

    model = build_model(seed)
    cfg = model.config
    print(f"model: tiny Llama ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size} "
          f"bytes+specials), random init, from fastpeft/data/tiny_llama.json")
    fp.add_adapter(model, ADAPTER, fp.LoRAConfig(**lora_settings()))
    trainable, total = fp.trainable_parameters(model)
    n_lora = sum(1 for m in model.modules() if isinstance(m, LoRALinear))
    print(f"adapter: LoRA r={lora_settings()['r']} on {n_lora} linear layers + embeddings/head trained in full; "
          f"trainable {trainable:,} of {total:,} parameters")
    print(f"data: fastpeft/data/lighthouse.txt, {len(text.encode()):,} bytes; {steps} steps of {batch} x {length} "
          f"tokens")

    before = eval_loss(model, eval_batch)
    t0 = time.perf_counter()
    train(model, ids, steps=steps, batch=batch, length=length, lr=3e-3, seed=seed)
    elapsed = time.perf_counter() - t0
    after = eval_loss(model, eval_batch)
    fell = after < before
    print(f"loss on 16 fixed windows of the text: {before:.3f} -> {after:.3f} "
          f"({'fell' if fell else 'did NOT fall'}; {elapsed:.1f} s for {steps} steps)")

    with torch.no_grad():
        unmerged = model(input_ids=eval_batch).logits
        fp.merge_adapter(model, ADAPTER)
        merged = model(input_ids=eval_batch).logits
    diff = (merged - unmerged).abs().max().item()
    matched = diff <= 1e-3 * max(1.0, unmerged.abs().max().item())
    print(f"merge: max |merged - unmerged| logit = {diff:.2e} ({'match' if matched else 'MISMATCH'})")

    sample = generate(model, tok, PROMPT, 80 if quick else 200, seed)
    print(f"sample: {PROMPT}{sample}".rstrip().replace("\n", "\n        "))

    reps = 3 if quick else 10
    models = {"fastpeft": fp.add_adapter(build_model(seed), ADAPTER, fp.LoRAConfig(**lora_settings()))}
    peft, why = peft_model(seed)
    if peft is not None:
        models["peft"] = peft
    times = step_times(models, windows(ids, length, batch), reps)
    line = (f"training step on cpu ({batch} x {length} tokens, median of {reps}): "
            f"fastpeft {times['fastpeft'] * 1e3:.1f} ms")
    if peft is not None:
        line += f", peft {times['peft'] * 1e3:.1f} ms (peft / fastpeft = {times['peft'] / times['fastpeft']:.2f}x)"
    print(line)
    if peft is None:
        print(f"peft: skipped, {why}")
    backend = fp.ops.explain("cpu").get("lora_linear", "?")
    print(f"fastpeft backend here: lora_linear -> {backend}")

    if not (fell and matched):
        print("demo FAILED: " + ("the loss did not fall" if not fell else "merging changed the outputs"))
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="training steps (default: 500, or 40 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the adapter, data and sampling")
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")


def main(args: argparse.Namespace) -> int:
    steps = args.steps if args.steps is not None else (40 if args.quick else 500)
    if steps < 1:
        raise SystemExit("fastpeft demo: --steps must be at least 1")
    return run(steps=steps, seed=args.seed, quick=args.quick)
