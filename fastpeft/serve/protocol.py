"""The OpenAI-compatible request bodies the server takes, checked strictly: a wrong type or value is a 400 that names
the field (`BadRequest`). Needs pydantic (the `serve` extra)."""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError


class BadRequest(Exception):
    """A request the server answers with `status` and an OpenAI-style error naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


Number = Union[StrictInt, StrictFloat]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    n: StrictInt = Field(default=1, ge=1, le=1)
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens tokens
    return_token_ids: StrictBool = False  # vLLM's extension: each choice also carries its generated token ids

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise BadRequest(400, "stop: pass up to 4 non-empty strings.", "stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr = Field(min_length=1)
    path: StrictStr = Field(min_length=1)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """The body `raw` as `model`, or BadRequest(400) naming the first wrong field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the request body is not valid JSON ({exc}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise BadRequest(400, f"the request body is a JSON {type(body).__name__}; send a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"] or ("body",)
        field = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:]
                                      if isinstance(p, int) or p in Message.model_fields)
        given = "" if error["type"] == "missing" else f" (got {json.dumps(error.get('input'))[:80]})"
        raise BadRequest(400, f"{field}: {error['msg']}{given}.", field) from None
