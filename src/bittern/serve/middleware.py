"""ASGI guard in front of the app: API key, request body size, and per-endpoint request counts.

Plain ASGI (not ``BaseHTTPMiddleware``) so that streamed responses and client disconnects pass through
untouched. Refusals are written in the OpenAI error format.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

from .metrics import Metrics
from .schemas import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health", "/", "/index.html", "/favicon.ico"})
KNOWN_ENDPOINTS = frozenset({"/health", "/", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})


async def send_error(send: Send, status: int, message: str, type: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Write a complete JSON error response."""
    body = json.dumps(error_body(message, type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class GuardMiddleware:
    """Checks the API key (except on :data:`PUBLIC_PATHS`), caps the body at ``max_body_bytes``, counts requests."""

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status_seen: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send, path)
        finally:
            self.metrics.count_request(endpoint, status_seen[0] if status_seen else 499)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and path not in PUBLIC_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                           else "incorrect API key provided")
                await send_error(send, 401, message, "invalid_request_error", "invalid_api_key",
                                 [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(send, 400, "invalid Content-Length header", "invalid_request_error")
                return
            if declared > self.max_body_bytes:
                await send_error(send, 413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes",
                                 "invalid_request_error", "request_too_large")
                return
        # read the body here (bounded), then replay it to the app
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                 "invalid_request_error", "request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.lstrip().startswith(b"{") and not _is_json(headers.get(b"content-type", b"")):
            # a JSON object sent without its content type (``curl -d`` says form data): read it as JSON
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
