"""The OpenAI Chat Completions request and response shapes the server speaks.

Requests are validated with pydantic. What happens to each field OpenAI defines:

- implemented: ``model``, ``messages`` (text and ``image_url`` parts; ``image_url.detail`` is checked
  and otherwise has no effect: every image is processed as the model's processor does), ``max_tokens``
  / ``max_completion_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``stream``,
  ``stream_options.include_usage``, ``logprobs`` / ``top_logprobs`` (:mod:`~interleaf.serving.logprobs`),
  ``response_format`` ``{"type": "text"}``;
- refused with a 400 naming them (:data:`UNSUPPORTED_FIELDS`), since ignoring them would change
  what the client gets: ``response_format`` ``json_object`` / ``json_schema`` (no constrained
  decoding), ``tools`` and the other function-calling fields, ``logit_bias``, the penalties, audio,
  ``prediction``, ``web_search_options``, ``moderation``; each is accepted at its neutral value
  (absent, null, empty, 0, ``tool_choice`` ``"none"`` or ``"auto"`` without tools, ``modalities: ["text"]``);
- accepted and ignored (:data:`IGNORED_FIELDS`): bookkeeping that does not change an answer
  (``user``, ``metadata``, ``store``, ``service_tier``, ...);
- any other field is refused with a 400 naming it, as OpenAI does.

A temperature below :data:`MIN_SAMPLING_TEMPERATURE` decodes greedily. Every error leaves the server
as OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` (:func:`error_body`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Below this, a temperature is greedy decoding: dividing the logits by it overflows to inf (and
# sampling fails on NaN probabilities) long before it differs from greedy in practice.
MIN_SAMPLING_TEMPERATURE = 1e-4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None


IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "reasoning_effort", "verbosity",
})
"""OpenAI fields accepted and ignored: they do not change an answer."""

UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "frequency_penalty",
                      "presence_penalty", "audio", "modalities", "prediction", "web_search_options", "moderation")
"""OpenAI fields this server does not implement: a 400 unless at their neutral value."""

_NEUTRAL = {"tool_choice": ("none", "auto"), "modalities": (["text"],)}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by unknown_fields() and unsupported_fields()
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float) -> float:
        return 0.0 if value < MIN_SAMPLING_TEMPERATURE else value

    def unknown_fields(self) -> list[str]:
        """The request's fields that OpenAI's Chat Completions does not define (sorted)."""
        return sorted(k for k in (self.model_extra or {}) if k not in IGNORED_FIELDS and k not in UNSUPPORTED_FIELDS)

    def unsupported_fields(self) -> list[str]:
        """The :data:`UNSUPPORTED_FIELDS` the request sets to something other than their neutral value."""
        extra = self.model_extra or {}
        return [k for k in UNSUPPORTED_FIELDS
                if k in extra and extra[k] not in (None, [], {}, 0, False) and extra[k] not in _NEUTRAL.get(k, ())]

    def top_count(self) -> int | None:
        """None without ``logprobs``; else how many alternatives each token reports (``top_logprobs``, 0 if absent)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """A pydantic error -> (one readable message, the OpenAI ``param`` path of the first problem)."""
    problems = []
    first_param = None
    for e in error.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
        param = ""
        for part in loc:
            param += f"[{part}]" if part.isdigit() else (f".{part}" if param else part)
        first_param = first_param or param or None
        problems.append(f"{param or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(problems), first_param


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chunk(id: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
