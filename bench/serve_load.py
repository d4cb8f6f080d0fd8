"""Load test of ``bittern serve`` on loopback: 1, 8 and 32 concurrent streaming clients.

Starts the server as a subprocess on 127.0.0.1 (a free port), drives it with asyncio + httpx streaming
chat... completions (``ignore_eos`` so every request generates exactly ``--max-tokens``), and reports for
each concurrency level: aggregate generated tokens per second, p50/p99 time to first token, p50/p99
inter-token latency (time between streamed chunks) and errors. Every loop is bounded in request count
and in time (``--level-seconds``), and the server is stopped at the end.

    python bench/serve_load.py                      # the trained default model, else a random "demo" model
    python bench/serve_load.py --config demo        # random "demo"-config weights, built in a temp dir
    python bench/serve_load.py --config 700M --layers 4 --engine fast
    python bench/serve_load.py --model runs/demo    # a packed model directory with a tokenizer

Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_random_model(directory: Path, config: str, layers: int | None = None) -> Path:
    """A packed model with random weights and a BPE tokenizer trained on the demo text."""
    import torch

    from bittern.configs import get_config
    from bittern.demo import demo_text
    from bittern.model import Transformer
    from bittern.modelfile import save_packed
    from bittern.tokenizer import train_bpe

    cfg = get_config(config, **({"num_layers": layers} if layers else {}))
    tok = train_bpe([demo_text()[:300_000]], vocab_size=min(cfg.vocab_size, 8192))
    tok.save(directory / "tok")
    torch.manual_seed(0)
    model = Transformer(cfg.replace(vocab_size=tok.vocab_size)).freeze()
    return save_packed(model, directory / f"{config}-random", tokenizer_file=directory / "tok" / "tokenizer.json",
                       meta={"weights": "random", "purpose": "serve load test"})


def default_model() -> Path | None:
    try:
        from bittern.train import default_model_path
    except ImportError:
        return None
    path = default_model_path()
    return Path(path) if path is not None and Path(path).exists() else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def request_shape(i: int, max_tokens: int, spread: float, prompt_words: int) -> tuple[str, int]:
    """Request ``i``'s user message and token count: ``prompt_words`` words of the demo text (from an
    offset that depends on ``i``) before the question, and ``max_tokens`` scaled by a factor in
    ``[1 - spread, 1 + spread]`` (deterministic in ``i``), so requests end, and new ones arrive, at
    different steps."""
    text = f"Tell me a story about the number {i}."
    if prompt_words > 0:
        from bittern.demo import demo_text

        words = demo_text()[:400_000].split()
        start = (i * 7919) % max(1, len(words) - prompt_words)
        text = " ".join(words[start : start + prompt_words]) + "\n\n" + text
    u = ((i * 2654435761) % 2**32) / 2**32
    return text, max(1, round(max_tokens * (1 - spread + 2 * spread * u)))


async def one_request(client, url: str, model: str, i: int, max_tokens: int, spread: float = 0.0,
                      prompt_words: int = 0) -> dict:
    content, max_tokens = request_shape(i, max_tokens, spread, prompt_words)
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    error = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                        break
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", []):
                        if choice["delta"].get("content"):
                            chunk_times.append(time.perf_counter())
    except Exception as e:  # counted, reported
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error is None and tokens != max_tokens:
        error = f"expected {max_tokens} tokens, got {tokens}"
    return {"start": start, "end": end, "ttft": (chunk_times[0] - start) if chunk_times else None,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])], "tokens": tokens, "error": error}


async def run_level(url: str, model: str, clients: int, requests_per_client: int, max_tokens: int, seconds: float,
                    spread: float = 0.0, prompt_words: int = 0) -> dict:
    import httpx

    deadline = time.perf_counter() + seconds
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker(w: int) -> None:
            for r in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                results.append(await one_request(client, url, model, w * 1000 + r, max_tokens, spread, prompt_words))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if r["error"]][:3], "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall, "ttft_p50_ms": 1000 * percentile(ttft, 0.5), "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
            "itl_p50_ms": 1000 * percentile(itl, 0.5), "itl_p99_ms": 1000 * percentile(itl, 0.99)}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not become healthy within {timeout:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server subprocess (terminate; kill after 30 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="packed model directory (default: the trained default model, else a random 'demo' model)")
    p.add_argument("--config", help="build a random model of this named config (default when no trained default model "
                                    "exists: demo)")
    p.add_argument("--layers", type=int, help="override the random model's number of layers")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level (default: 1,8,32)")
    p.add_argument("--requests-per-client", default="8,4,2", help="requests each client sends, per level (default: 8,4,2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--max-batch", type=int, default=32, help="server KV-cache slots (default: 32)")
    p.add_argument("--spread", type=float, default=0.0,
                   help="vary each request's token count by up to this fraction, so requests end and arrive at "
                        "different steps (default: 0, all the same)")
    p.add_argument("--prompt-words", type=int, default=0,
                   help="words of demo text before each request's question (default: 0, a one-line prompt)")
    p.add_argument("--prefill-chunk", type=int, help="the server's --prefill-chunk (default: the server's)")
    p.add_argument("--engine", default="auto", choices=["auto", "fast", "reference"], help="server engine (default: auto)")
    p.add_argument("--level-seconds", type=float, default=60.0, help="no new requests after this long in a level (default: 60)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if not 0 <= args.spread < 1 or args.prompt_words < 0:
        p.error("--spread must be in [0, 1) and --prompt-words >= 0")
    levels = [int(x) for x in args.levels.split(",")]
    per_client = [int(x) for x in args.requests_per_client.split(",")]
    if len(per_client) != len(levels):
        p.error("--requests-per-client needs one count per level")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        elif args.config is None and args.layers is None and default_model() is not None:
            model = default_model()
        else:
            args.config = args.config or "demo"
            model = build_random_model(Path(tmp), args.config, args.layers)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        name = "bench"
        cmd = [sys.executable, "-m", "bittern", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(max(levels) * 2), "--served-model-name", name,
               "--engine", args.engine, "--log-level", "warning"]
        if args.prefill_chunk is not None:
            cmd += ["--prefill-chunk", str(args.prefill_chunk)]
        env = {k: v for k, v in os.environ.items() if k != "BITTERN_API_KEY"}
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_healthy(url, proc, 120)
            asyncio.run(run_level(url, name, 1, 2, args.max_tokens, 30))  # warm-up
            rows = []
            for clients, k in zip(levels, per_client):
                row = asyncio.run(run_level(url, name, clients, k, args.max_tokens, args.level_seconds, args.spread,
                                            args.prompt_words))
                rows.append(row)
                print(f"{clients:>3} clients: {row['requests']:>3} requests, {row['tokens']:>5} tokens in {row['wall_s']:6.1f} s "
                      f"= {row['tok_per_s']:7.1f} tok/s | TTFT p50 {row['ttft_p50_ms']:7.1f} ms p99 {row['ttft_p99_ms']:7.1f} ms | "
                      f"ITL p50 {row['itl_p50_ms']:6.1f} ms p99 {row['itl_p99_ms']:6.1f} ms | errors {row['errors']}", flush=True)
                for e in row["error_samples"]:
                    print(f"    error: {e}")
        finally:
            stop_server(proc)
    base = rows[0]["tok_per_s"]
    for row in rows:
        row["speedup_vs_first"] = row["tok_per_s"] / base if base else float("nan")
    print(f"\naggregate throughput, {levels[-1]} clients vs {levels[0]}: {rows[-1]['speedup_vs_first']:.2f}x")
    result = {"model": f"random {args.config}" + (f" ({args.layers} layers)" if args.layers else "") if args.config else str(model), "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "engine": args.engine, "spread": args.spread,
              "prompt_words": args.prompt_words, "prefill_chunk": args.prefill_chunk, "levels": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
