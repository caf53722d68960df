"""Serving many adapters from one base model on transformers' continuous batching (`fastpeft serve`).

    import fastpeft as fp
    answers = fp.serve.generate_many(model, [(prompt_ids, "math"), (prompt_ids, None)], max_new_tokens=32)

engine.py: the engine (one continuous-batching manager, per-token adapter routing, hot load/unload);
server.py: the OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn, pydantic).
Importing this package needs neither.
"""
from .engine import Engine, Output, Rejected
from .offline import generate_many
from .sampling import SamplingParams

__all__ = ["Engine", "Output", "Rejected", "SamplingParams", "generate_many"]
