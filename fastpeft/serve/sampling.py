"""Per-request sampling for the continuous-batching step: greedy, or temperature / top-p with the request's own seed.

transformers' continuous batching shares one sampling configuration across all requests; a server takes
`temperature`, `top_p` and `seed` per request. `Sampler` replaces the model runner's `_sample` for one manager: the
step's logits come one row per request that gets a new token, in the order of the step's requests, and each row is
decided by its request's `SamplingParams`. Greedy rows take the argmax of the float32 logits, exactly as offline
`model.generate(do_sample=False)` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request picks its tokens. temperature 0 (the default) is greedy; `seed` makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row of float32 logits (V,)."""
        if self.greedy:
            return int(torch.argmax(logits))
        if self.generator is None:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(int(self.seed))
            else:
                self.generator.seed()
        probs = torch.softmax(logits.detach().float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p (at least one)
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, 0) - sorted_probs
            sorted_probs[before >= self.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Sampler:
    """The `_sample(scores, output_ids)` of a model runner, per request: `rows` (set before each step) holds the
    SamplingParams of the step's requests that get a token, in order: the first logits rows (the rows after them,
    of requests whose prompt is still being prefilled in chunks, are not read by the manager)."""

    def __init__(self):
        self.rows: list[SamplingParams] = []

    def __call__(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        logits = scores.reshape(-1, scores.shape[-1])  # [1, num_logits, vocab] -> [num_logits, vocab]
        n = logits.shape[0]
        if n < len(self.rows):  # one row per request of the step; those of requests still prefilling come last
            raise RuntimeError(f"fastpeft serve: the step produced {n} logits rows for {len(self.rows)} requests "
                               "waiting for a token; the continuous-batching API changed (fastpeft/serve/compat.py).")
        next_tokens = torch.argmax(logits, dim=-1)
        sampled = [i for i, p in enumerate(self.rows) if not p.greedy]
        if sampled:
            next_tokens = next_tokens.cpu()
            for i in sampled:
                next_tokens[i] = self.rows[i].pick(logits[i])
        output_ids[0, :n].copy_(next_tokens.to(output_ids.device, output_ids.dtype))
