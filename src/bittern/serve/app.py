"""The FastAPI application: OpenAI-compatible routes over a :class:`~bittern.serve.worker.GenerationWorker`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or
server-sent events), ``GET /health``, ``GET /metrics`` (Prometheus text) and the chat page at ``/``.
Every error is answered as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import MAX_TOP_LOGPROBS, SamplingParams, offset_seed
from ..tokenizer import Tokenizer
from .chat_template import ChatTemplateError, chat_stop_strings, render_chat
from .middleware import GuardMiddleware
from .schemas import APIError, ChatRequest, CompletionRequest, _Sampling, error_body, validation_message
from .worker import Event, GenerationWorker, Job, QueueFull


@dataclass
class ServeConfig:
    """Limits and identity of a server."""

    model_name: str = "bittern"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: the context length minus one
    max_tokens_limit: int = 4096  # also capped by the context
    default_max_tokens: int = 256  # chat completions without max_tokens (capped by the context)
    completion_default_max_tokens: int = 16  # /v1/completions without max_tokens, as OpenAI's legacy endpoint
    max_choices: int = 8  # n times the number of prompts
    max_queue: int = 64
    request_timeout_s: float = 600.0
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API ("*": any); none by default

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_limit", "default_max_tokens", "completion_default_max_tokens", "max_choices"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")


#: how often a non-streaming request checks that its client is still connected (seconds)
DISCONNECT_CHECK_S = 0.5


def _json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, jobs: list[Job], per_prompt: int) -> dict[str, Any]:
    """OpenAI usage; ``prompt_tokens_details.cached_tokens``: prompt tokens found in the KV cache, counted
    once per prompt like ``prompt_tokens`` (the most any of its ``per_prompt`` choices found)."""
    cached: dict[int, int] = {}
    for j in jobs:
        cached[j.index // per_prompt] = max(cached.get(j.index // per_prompt, 0), j.cached_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}


def _coalesce(events: list[Event]) -> list[Event]:
    """Merge consecutive text deltas of the same choice into one."""
    out: list[Event] = []
    for e in events:
        if e.kind == "delta" and out and out[-1].kind == "delta" and out[-1].index == e.index:
            merged = None if out[-1].logprobs is None and e.logprobs is None else (out[-1].logprobs or []) + (e.logprobs or [])
            out[-1] = Event("delta", text=out[-1].text + e.text, completion_tokens=e.completion_tokens, index=e.index,
                            logprobs=merged)
        else:
            out.append(e)
    return out


TokenLogprobs = list[tuple[str, float, list[tuple[str, float]], int]]


def _completion_logprobs(entries: TokenLogprobs, offset: int, top: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (``offset``: characters before the generated text)."""
    return {"tokens": [t for t, _, _, _ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
            # alternatives that decode to the same text (byte pieces of one character) keep the likeliest
            "top_logprobs": [{a: lp for a, lp in reversed(alts)} for _, _, alts, _ in entries] if top else None,
            "text_offset": [offset + o for _, _, _, o in entries]}


def _chat_logprobs(entries: TokenLogprobs) -> dict[str, Any]:
    """The chat completions ``logprobs`` object."""
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]} for t, lp, alts, _ in entries],
            "refusal": None}


def create_app(worker: GenerationWorker, tokenizer: Tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The application; its lifespan starts and stops ``worker``."""
    config = config or ServeConfig()
    context = worker.engine.max_len
    max_prompt = min(config.max_prompt_tokens or context - 1, context - 1)
    created = int(time.time())
    eos_id = tokenizer.eos_id

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="bittern", description="OpenAI-compatible server for BitNet b1.58 models", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # 405 names the allowed methods in Allow

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    # ------------------------------------------------------------------ request -> jobs

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(body: _Sampling, prompt_len: int, max_tokens: int | None, name: str, default: int) -> SamplingParams:
        """The request's sampling settings; ``name``: the field ``max_tokens`` came from; ``default``: the
        endpoint's number of tokens when none is asked for (capped by the context)."""
        if max_tokens is not None:
            if max_tokens < 1:
                raise APIError(400, f"{name} must be at least 1", param=name)
            limit = min(config.max_tokens_limit, context - 1)
            if max_tokens > limit:
                raise APIError(400, f"{name} is {max_tokens}; this server allows at most {limit}", param=name)
            if prompt_len + max_tokens > context:
                raise APIError(400, f"this model's context is {context} tokens; the prompt has {prompt_len} and {name} "
                                    f"asks for {max_tokens}", param=name, code="context_length_exceeded")
        else:
            max_tokens = max(1, min(default, context - prompt_len))
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"temperature must be between 0 and 2 (got {temperature:g})", param="temperature")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        params = SamplingParams(temperature=temperature, top_p=1.0 if body.top_p is None else float(body.top_p),
                                top_k=body.top_k or 0, min_p=float(body.min_p or 0.0),
                                repetition_penalty=1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
                                seed=body.seed, max_tokens=max_tokens)
        try:
            return params.validate()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None

    def check_stream_options(body: _Sampling) -> None:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def stop_list(body: _Sampling, extra: list[str]) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return [s for s in stop if s] + extra

    def make_jobs(body: _Sampling, prompts: list[list[int]], max_tokens: int | None, extra_stop: list[str],
                  param: str, max_tokens_name: str = "max_tokens", default_max_tokens: int | None = None,
                  logprobs: int | None = None) -> tuple[list[Job], asyncio.Queue]:
        n = 1 if body.n is None else body.n
        if n < 1:
            raise APIError(400, "n must be at least 1", param="n")
        if n * len(prompts) > config.max_choices:
            raise APIError(400, f"this request asks for {n * len(prompts)} completions (n x prompts); the limit is "
                                f"{config.max_choices}", param="n")
        stop = stop_list(body, extra_stop)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        eos = set() if body.ignore_eos or eos_id is None else {eos_id}
        jobs = []
        for p, prompt in enumerate(prompts):
            if not prompt:
                raise APIError(400, "the prompt is empty", param=param)
            if len(prompt) > max_prompt:
                raise APIError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most {max_prompt}",
                               param=param, code="context_length_exceeded")
            if any(not 0 <= t < tokenizer_vocab for t in prompt):
                raise APIError(400, f"the prompt holds token ids outside [0, {tokenizer_vocab})", param=param)
            base = sampling(body, len(prompt), max_tokens, max_tokens_name, default_max_tokens or config.default_max_tokens)
            base.logprobs = logprobs
            for i in range(n):
                params = SamplingParams(**{**base.__dict__, "seed": offset_seed(base.seed, i)})
                jobs.append(Job(list(prompt), params, loop, eos_ids=set(eos), stop=stop, queue=queue,
                                timeout_s=config.request_timeout_s, index=p * n + i))
        try:
            worker.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        return jobs, queue

    tokenizer_vocab = max(tokenizer.vocab_size, 1)

    async def encode(texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts``, computed off the event loop (the batch encoder releases the GIL: a 1 MB
        prompt takes ~0.7 s, during which the other requests' streams keep flowing)."""
        return await asyncio.to_thread(tokenizer.encode_batch, texts)

    def cancel_all(jobs: list[Job]) -> None:
        for job in jobs:
            worker.cancel(job)

    async def collect(request: Request, jobs: list[Job], queue: asyncio.Queue
                      ) -> tuple[list[str], list[str], int, list[TokenLogprobs]] | None:
        """Wait for every job; texts, finish reasons, completion tokens and the tokens' logprobs (when asked
        for), or None if the client left."""
        texts = [""] * len(jobs)
        logprobs: list[TokenLogprobs] = [[] for _ in jobs]
        reasons = [""] * len(jobs)
        completion = 0
        remaining = len(jobs)
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while remaining:
                # a client that went away is noticed within DISCONNECT_CHECK_S, whether or not tokens are flowing
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    event = None
                if loop.time() - checked >= DISCONNECT_CHECK_S or event is None:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return None
                if event is None:
                    continue
                if event.kind == "error":
                    raise APIError(event.status, event.text, type=event.error_type, code=event.code)
                texts[event.index] += event.text
                logprobs[event.index] += event.logprobs or []
                if event.kind == "done":
                    remaining -= 1
                    reasons[event.index] = event.finish_reason or "stop"
                    completion += event.completion_tokens
            return texts, reasons, completion, logprobs
        finally:
            cancel_all(jobs)

    def streaming(jobs: list[Job], queue: asyncio.Queue,
                  chunk: Callable[[int, str | None, str | None, TokenLogprobs | None], dict[str, Any]],
                  first: Callable[[int], dict[str, Any]] | None, usage_chunk: Callable[[int], dict[str, Any]] | None) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            completion = 0
            remaining = len(jobs)
            try:
                if first is not None:
                    yield "".join(_sse(first(job.index)) for job in jobs)
                while remaining:
                    # everything that is ready goes out in one write; a client that lags gets bigger chunks
                    batch = [await queue.get()]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                    out: list[str] = []
                    for event in _coalesce(batch):
                        if event.kind == "error":
                            out.append(_sse(error_body(event.text, event.error_type, None, event.code)))
                            remaining = 0
                            break
                        if event.kind == "delta":
                            out.append(_sse(chunk(event.index, event.text, None, event.logprobs)))
                        else:
                            remaining -= 1
                            completion += event.completion_tokens
                            out.append(_sse(chunk(event.index, None, event.finish_reason, None)))
                    else:
                        if not remaining and usage_chunk is not None:
                            out.append(_sse(usage_chunk(completion)))
                    if not remaining:
                        out.append("data: [DONE]\n\n")
                    yield "".join(out)
            finally:
                cancel_all(jobs)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        alive = worker.alive
        return JSONResponse({"status": "ok" if alive else "worker stopped", "model": config.model_name,
                             "active": worker.active, "queued": worker.queue_depth}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        gauges = {
            "queue_depth": ("Requests waiting for a KV-cache slot.", float(worker.queue_depth)),
            "active_requests": ("Sequences generating now.", float(worker.active)),
            "free_slots": ("Free KV-cache slots.", float(worker.free_slots)),
            "max_batch": ("KV-cache slots in all.", float(worker.capacity)),
        }
        store = getattr(worker.engine, "prefix_store", None)
        if store is not None:
            gauges["prompt_cache_bytes"] = ("Host memory holding keys and values of prompts whose slots were reused.",
                                            float(store.nbytes))
            gauges["prompt_cache_tokens"] = ("Tokens whose keys and values that memory holds.",
                                             float(len(store) * store.block))
        return PlainTextResponse(worker.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "bittern",
                "max_model_len": context}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        html = resources.files("bittern.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
        check_stream_options(body)
        if isinstance(body.prompt, str):
            texts: list[str | None] = [body.prompt]
            prompts = await encode(texts)
        elif body.prompt and isinstance(body.prompt[0], str):
            texts = list(body.prompt)
            prompts = await encode(texts)
        elif body.prompt and isinstance(body.prompt[0], int):
            texts, prompts = [None], [list(body.prompt)]
        else:
            texts, prompts = [None] * len(body.prompt), [list(p) for p in body.prompt]
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompts = [p if p or tokenizer.bos_id is None else [tokenizer.bos_id] for p in prompts]
        jobs, queue = make_jobs(body, prompts, body.max_tokens, [], "prompt",
                                default_max_tokens=config.completion_default_max_tokens, logprobs=body.logprobs)
        n = len(jobs) // len(prompts)
        prefix = ["" for _ in jobs]
        if body.echo:
            prefix = [(texts[j.index // n] if texts[j.index // n] is not None else tokenizer.decode(j.prompt)) for j in jobs]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)

        def choice(index: int, text: str | None, reason: str | None, logprobs: TokenLogprobs | None = None,
                   offset: int = 0) -> dict[str, Any]:
            lp = None
            if body.logprobs is not None and logprobs is not None:
                lp = _completion_logprobs(logprobs, offset, body.logprobs)
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": reason}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def chunk(index: int, text: str | None, reason: str | None, logprobs: TokenLogprobs | None = None
                      ) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                        "choices": [choice(index, text, reason, logprobs, len(prefix[index]))], **extra}

            def first(index: int) -> dict[str, Any]:
                return chunk(index, prefix[index], None)

            def usage(completion: int) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                        "choices": [], "usage": _usage(prompt_tokens, completion, jobs, n)}

            return streaming(jobs, queue, chunk, first if body.echo else None, usage if include_usage else None)
        result = await collect(request, jobs, queue)
        if result is None:
            return Response(status_code=499)
        outs, reasons, completion, logprobs = result
        return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                             "choices": [choice(i, prefix[i] + outs[i], reasons[i], logprobs[i], len(prefix[i]))
                                         for i in range(len(jobs))],
                             "usage": _usage(prompt_tokens, completion, jobs, n)})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        check_stream_options(body)
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        chat_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if not body.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list):
                parts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}]: only text content parts are supported (got {part.type!r})",
                                       param=f"messages.{i}.content")
                    parts.append(part.text)
                content = "".join(parts)
            else:
                content = m.content or ""
            messages.append({"role": m.role, "content": content})
        try:
            text = render_chat(messages, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = (await encode([text]))[0]
        if body.max_completion_tokens is not None:
            max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, name = body.max_tokens, "max_tokens"
        jobs, queue = make_jobs(body, [prompt], max_tokens, chat_stop_strings(tokenizer.chat_template), "messages", name,
                                logprobs=chat_logprobs)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def chunk_of(index: int, delta: dict[str, Any], reason: str | None, logprobs: TokenLogprobs | None = None
                         ) -> dict[str, Any]:
                lp = _chat_logprobs(logprobs) if chat_logprobs is not None and logprobs is not None else None
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                        "system_fingerprint": None,
                        "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}], **extra}

            def chunk(index: int, text: str | None, reason: str | None, logprobs: TokenLogprobs | None = None
                      ) -> dict[str, Any]:
                return chunk_of(index, {"content": text} if text is not None else {}, reason, logprobs)

            def first(index: int) -> dict[str, Any]:
                return chunk_of(index, {"role": "assistant", "content": ""}, None)

            def usage(completion: int) -> dict[str, Any]:
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                        "system_fingerprint": None, "choices": [], "usage": _usage(len(prompt), completion, jobs, len(jobs))}

            return streaming(jobs, queue, chunk, first, usage if include_usage else None)
        result = await collect(request, jobs, queue)
        if result is None:
            return Response(status_code=499)
        outs, reasons, completion, logprobs = result
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": config.model_name,
                             "system_fingerprint": None,
                             "choices": [{"index": i, "message": {"role": "assistant", "content": outs[i]},
                                          "logprobs": _chat_logprobs(logprobs[i]) if chat_logprobs is not None else None,
                                          "finish_reason": reasons[i]} for i in range(len(jobs))],
                             "usage": _usage(len(prompt), completion, jobs, len(jobs))})

    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes, metrics=worker.metrics)
    if config.cors_origins:  # outermost: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app
