"""Offline batch jobs on the serving engine: `fp.serve.generate_many(model, [(prompt, adapter), ...])`."""
from __future__ import annotations

import threading
from collections.abc import Sequence

from .engine import Engine, Output
from .sampling import SamplingParams


def generate_many(model, jobs: Sequence[tuple], *, max_new_tokens: int = 16, tokenizer=None,
                  sampling: SamplingParams | None = None, **engine_options) -> list:
    """Generate for every (prompt, adapter) job on transformers' continuous batching, each request with its own
    adapter (None or "__base__": none), all in flight together. A prompt is a list of token ids, or a string when
    `tokenizer` is given (then the answers are strings, special tokens skipped). Greedy unless `sampling` says
    otherwise. Returns the generated tokens (or texts) in the order of `jobs`; raises the first request's error.
    `engine_options` go to Engine (max_batch_tokens, kv_cache_tokens, ...)."""
    jobs = list(jobs)
    outputs: list[Output | None] = [None] * len(jobs)
    done = threading.Event()
    remaining = [len(jobs)]
    lock = threading.Lock()
    engine_options.setdefault("max_queue", max(len(jobs), 1))

    def keep(i: int):
        def on_output(output: Output) -> None:
            if output.finished:
                outputs[i] = output
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
        return on_output

    with Engine(model, **engine_options) as engine:
        for i, job in enumerate(jobs):
            prompt, adapter = job
            if isinstance(prompt, str) and tokenizer is None:
                raise TypeError(f"generate_many: job {i} has a text prompt; pass tokenizer=... or token ids.")
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if isinstance(prompt, str) else prompt
            params = SamplingParams(**{**(sampling.__dict__ if sampling else {}), "max_tokens": max_new_tokens,
                                       "generator": None})
            engine.submit(list(ids), adapter, params, keep(i))
        if jobs:
            done.wait()
    for i, output in enumerate(outputs):
        if output.error:
            raise RuntimeError(f"generate_many: job {i} ({jobs[i][1]!r}) failed: {output.error}")
    if tokenizer is not None:
        return [tokenizer.decode(o.tokens, skip_special_tokens=True) for o in outputs]
    return [o.tokens for o in outputs]
