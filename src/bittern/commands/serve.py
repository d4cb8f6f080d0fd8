"""``bittern serve``: an OpenAI-compatible HTTP server (continuous batching) for a packed model."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a packed model over an OpenAI-compatible HTTP API (with a chat page at /)")
    p.add_argument("--model", help="packed model directory (default: the trained default model, if any)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and the chat page "
                                     "(default: $BITTERN_API_KEY, else no key)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or '*') call the API from a browser; "
                        "repeatable (default: none, same origin only)")
    p.add_argument("--served-model-name", help="model id clients must send (default: the model directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together, i.e. KV-cache slots (default: 8)")
    p.add_argument("--prefill-chunk", type=int,
                   help="prompt tokens of new requests each decode step carries along (fast engine; default: 256)")
    p.add_argument("--prompt-cache-mb", type=float, default=1024,
                   help="MiB of host memory keeping the KV of prompts whose slots were reused, so a returning "
                        "conversation skips its prefill (fast engine; 0: off; default: 1024)")
    p.add_argument("--max-len", type=int, help="KV-cache length per sequence (default: the model's context)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429 (default: 64)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted (default: 4096)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the context minus one)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included (default: 600)")
    p.add_argument("--engine", default="auto", choices=["auto", "fast", "reference"],
                   help="generation engine (default: auto, the fast one when available)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from ..serve import ServeConfig, build_app, default_model_path, run_server
    except ImportError as e:  # the server's extra is not installed
        from ..errors import UsageError

        raise UsageError(f"the server needs FastAPI and uvicorn ({e}): pip install 'bittern[serve]'") from None

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535 (got {args.port})")
    model = Path(args.model) if args.model else default_model_path()
    api_key = args.api_key or os.environ.get("BITTERN_API_KEY") or None
    config = ServeConfig(model_name=args.served_model_name or model.resolve().name, api_key=api_key,
                         max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, request_timeout_s=args.timeout,
                         cors_origins=tuple(args.cors_origin))
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be at least 1 (got {args.prefill_chunk})")
    if args.prompt_cache_mb < 0:
        raise ValueError(f"--prompt-cache-mb must be >= 0 (got {args.prompt_cache_mb:g})")
    app = build_app(model, config, max_batch=args.max_batch, max_len=args.max_len, engine=args.engine,
                    prefill_chunk=args.prefill_chunk, prompt_cache_bytes=int(args.prompt_cache_mb * (1 << 20)))
    print(f"bittern serve: {model} as {config.model_name!r} on http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1, {args.max_batch} slots{', API key required' if api_key else ''})", flush=True)
    run_server(app, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level)
    return 0
