"""What fastpeft's serving needs from transformers' continuous batching, checked in one place.

The engine runs on transformers' own continuous-batching manager (`model.init_continuous_batching()`): its
scheduler, paged KV cache and model runner. It attaches to three names of it, all present from transformers 5.17
to 5.23; `check_manager` says clearly which one is missing on another version:

    manager._generation_step()                   one scheduler step (the forward of the packed batch); wrapped per
                                                 instance to route each packed token to its request's adapter
    manager.batch_processor.inputs_and_outputs   .requests_in_batch (FutureRequestState: .state.request_id,
                                                 .query_length, .has_new_token) and .num_q_tokens: which request
                                                 owns each packed token of the step, in order
    manager.batch_processor.model_runner._sample(scores, output_ids)
                                                 the sampler; replaced per instance by one with per-request
                                                 temperature, top_p and seed

Everything else goes through public API: `init_continuous_batching`, `start`, `stop`, `add_request`,
`cancel_request`, `get_result`, `ContinuousBatchingConfig`.
"""
from __future__ import annotations

import dataclasses

from ..errors import FastPEFTError


class ServeError(FastPEFTError):
    """Serving cannot run (missing dependency, transformers API it needs, bad engine setting)."""


def cb_config(**fields):
    """A transformers ContinuousBatchingConfig with the fields this version has (`page_size` was `block_size`
    before 5.18); fields it lacks are dropped, except the ones isolation depends on."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            raise ServeError(_too_old("transformers.ContinuousBatchingConfig")) from None
    known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    if "page_size" in fields and "page_size" not in known and "block_size" in known:
        fields["block_size"] = fields.pop("page_size")
    for needed in ("allow_block_sharing", "use_async_batching"):
        if needed not in known:  # prefix sharing across adapters would mix their KV caches: never run without it
            raise ServeError(_too_old(f"ContinuousBatchingConfig.{needed}"))
    return ContinuousBatchingConfig(**{k: v for k, v in fields.items() if k in known and v is not None})


def check_model(model) -> None:
    if not callable(getattr(model, "init_continuous_batching", None)):
        raise ServeError(f"fastpeft serve: {type(model).__name__} has no init_continuous_batching(); serve a "
                         "transformers causal LM (AutoModelForCausalLM) with transformers >= 5.17.")


def check_manager(manager) -> None:
    """The manager has the entry points the engine wraps (checked before it starts)."""
    for name in ("_generation_step", "add_request", "cancel_request", "get_result", "start", "stop"):
        if not callable(getattr(manager, name, None)):
            raise ServeError(_too_old(f"ContinuousBatchingManager.{name}"))


def check_processor(processor) -> None:
    """The batch processor (created by the manager's thread) exposes the step's requests and the sampler."""
    io = getattr(processor, "inputs_and_outputs", None)
    runner = getattr(processor, "model_runner", None)
    if io is None or not hasattr(io, "requests_in_batch") or not hasattr(io, "num_q_tokens"):
        raise ServeError(_too_old("ContinuousBatchProcessor.inputs_and_outputs.requests_in_batch / num_q_tokens "
                                  "(synchronous batching)"))
    if runner is None or not callable(getattr(runner, "_sample", None)):
        raise ServeError(_too_old("ContinuousBatchProcessor.model_runner._sample"))


def _too_old(name: str) -> str:
    import transformers

    return (f"fastpeft serve: transformers {transformers.__version__} lacks {name}, which fastpeft's serving "
            "engine routes adapters through (fastpeft/serve/compat.py); install transformers 5.17 to 5.23.")
