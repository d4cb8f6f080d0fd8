"""The OpenAI wire format: request bodies (validated with pydantic, strict types) and error bodies.

Unknown fields are accepted and ignored, as the OpenAI API does for fields a server does not use;
fields that would change the answer but are not implemented (``tools``, penalties
other than 0, ...) are refused with a 400 that names them. Besides the OpenAI fields, requests take
``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos`` (as vLLM does).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictFloat, StrictInt]


class APIError(Exception):
    """An error answered in the OpenAI format ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body of the error."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` as the OpenAI API writes it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields shared by both generation endpoints."""

    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    user: Optional[StrictStr] = None
    # extensions
    top_k: Optional[StrictInt] = None
    min_p: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    ignore_eos: Optional[StrictBool] = False


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    echo: Optional[StrictBool] = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class ContentPart(_Body):
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: Optional[StrictStr] = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter for pydantic/FastAPI validation errors."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # pydantic names the member of a Union it tried ("int", "list[str]", "function-after[...]"): drop those
    tags = {"str", "int", "float", "bool", "none", "dict", "list"}
    param = ".".join(p for p in loc if p not in tags and "[" not in p) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        return f"malformed JSON body: {ctx.get('error', first.get('msg', 'cannot parse'))}", None
    if first.get("type") == "missing":
        if param is None:
            return "the request body is empty: send a JSON object", None
        return f"missing required parameter: {param!r}", param
    if first.get("type") == "model_attributes_type" or (not loc and "dict" in first.get("msg", "")):
        return "the request body must be a JSON object", None
    got = first.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"invalid type or value for {param!r}: {first.get('msg', 'invalid')} (got {shown})", param
