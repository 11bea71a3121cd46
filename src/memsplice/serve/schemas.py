"""Request and response bodies of the server: the OpenAI chat schema and the memory API.

Requests are parsed from raw JSON in strict mode (a string is not an integer, a number is not a string), so a
wrong type is a 400 that names the field, never a silent coercion. Fields of the OpenAI schema that memsplice does
not implement are accepted only at their neutral value (e.g. n=1, no tools, no logprobs); anything else is refused
with a message naming the field, rather than ignored. Unknown extra fields are ignored, as OpenAI clients send
provider-specific ones.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# -- errors ----------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        return APIError(
            400,
            f"the request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}",
            code="invalid_json",
        )
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{msg}", code="invalid_value", param=param)


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


# -- chat completions ------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content parts of type {self.type!r} are not supported; send text")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    user: str | None = None
    """The memory scope of the request (or the scope header)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict | None = None
    memory: bool = True
    """memsplice extension: false runs the bare reasoner for this request (nothing read or written)."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        refuse = []
        if self.n not in (None, 1):
            refuse.append("n (only 1 completion per request)")
        if self.logprobs:
            refuse.append("logprobs")
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            refuse.append("tools/functions")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            refuse.append("response_format (only text)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                refuse.append(name)
        if refuse:
            raise ValueError(f"not supported by memsplice: {', '.join(refuse)}")
        return self


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(cid: str, model: str, text: str, finish_reason: str, usage: dict, extra: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "system_fingerprint": None,
        "memsplice": extra,
    }


def chat_chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict,
    finish_reason: str | None = None,
    usage: dict | None = None,
    extra: dict | None = None,
    choices: bool = True,
) -> dict:
    chunk = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if choices
        else [],
        "system_fingerprint": None,
    }
    if usage is not None:
        chunk["usage"] = usage
    if extra is not None:
        chunk["memsplice"] = extra
    return chunk


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- memory API ------------------------------------------------------------------------------------------------
MEMORY_ROLES = ("user", "assistant", "system", "note")


class MemoryTurn(_Strict):
    role: Literal["user", "assistant", "system", "note"] = "user"
    content: str = Field(min_length=1)


class AddTurnsRequest(_Strict):
    turns: list[MemoryTurn] = Field(min_length=1)


class AddTextRequest(_Strict):
    text: str = Field(min_length=1)
    role: Literal["user", "assistant", "system", "note"] = "note"
