"""Many multi-turn chats against ``bittern serve`` with fewer KV-cache slots than conversations.

Each of ``--conversations`` clients holds a chat of ``--turns`` turns: its first user message is
``--prompt-words`` words of the demo text (from its own offset), each later turn resends the whole
history plus a short question, as OpenAI clients do. The clients run at once against a server with
``--max-batch`` slots, so a conversation's slot has usually been taken by another one before its next
turn. The same chats are run against a server with ``--prompt-cache-mb 0`` (only what sits in the slots
is reused) and with each size in ``--cache-mb`` (host memory keeps the prefixes of reused slots), in
alternating rounds; the table compares follow-up turns' time to first token, the prompt tokens found
cached (``usage.prompt_tokens_details.cached_tokens``) and the wall time. Generation is seeded and the
engine is bit-exact, so every configuration sees the same conversations (checked).

    python bench/chat_sessions.py --model DIR --conversations 12 --max-batch 4 --json runs/chat.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_random_model, default_model, free_port, percentile, stop_server, wait_healthy  # noqa: E402

QUESTIONS = ["Go on.", "And what happened next?", "Say more about that.", "Why?", "Tell me the rest."]


def first_message(i: int, words: int) -> str:
    from bittern.demo import demo_text

    text = demo_text()[:400_000].split()
    start = (i * 7919) % max(1, len(text) - words)
    return " ".join(text[start : start + words])


async def chat(client, url: str, model: str, i: int, turns: int, words: int, max_tokens: int) -> dict:
    """One conversation; per turn: time to first token, prompt and cached tokens, and the reply."""
    messages = [{"role": "user", "content": first_message(i, words)}]
    rows = []
    for t in range(turns):
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.8,
                "seed": 1000 * i + t, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = None
        reply = []
        usage = None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        first = first or time.perf_counter()
                        reply.append(piece)
        if usage is None or first is None:
            raise RuntimeError("a reply without tokens or usage")
        text = "".join(reply)
        rows.append({"turn": t, "ttft_s": first - start, "total_s": time.perf_counter() - start,
                     "prompt_tokens": usage["prompt_tokens"],
                     "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), "reply": text})
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": QUESTIONS[(i + t) % len(QUESTIONS)]}]
    return {"conversation": i, "turns": rows}


async def run_all(url: str, model: str, conversations: int, turns: int, words: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=conversations + 4, max_keepalive_connections=conversations + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        chats = await asyncio.gather(*(chat(client, url, model, i, turns, words, max_tokens) for i in range(conversations)))
        return list(chats), time.perf_counter() - t0


def serve_and_run(model: Path, cache_mb: float, args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bittern", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.conversations * 2), "--served-model-name", "bench",
           "--engine", "fast", "--log-level", "warning", "--prompt-cache-mb", f"{cache_mb:g}"]
    env = {k: v for k, v in os.environ.items() if k != "BITTERN_API_KEY"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_healthy(url, proc, 120)
        chats, wall = asyncio.run(run_all(url, "bench", args.conversations, args.turns, args.prompt_words, args.max_tokens))
    finally:
        stop_server(proc)
    later = [r for c in chats for r in c["turns"] if r["turn"] > 0]
    return {"cache_mb": cache_mb, "wall_s": wall, "chats": chats,
            "followup_ttft_p50_s": percentile([r["ttft_s"] for r in later], 0.5),
            "followup_ttft_p90_s": percentile([r["ttft_s"] for r in later], 0.9),
            "followup_prompt_tokens": sum(r["prompt_tokens"] for r in later),
            "followup_cached_tokens": sum(r["cached_tokens"] for r in later),
            "first_turn_ttft_p50_s": percentile([c["turns"][0]["ttft_s"] for c in chats], 0.5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="packed model directory (default: the trained default model, else a random 'demo' model)")
    p.add_argument("--config", help="build a random model of this named config instead")
    p.add_argument("--conversations", type=int, default=12, help="concurrent chats (default: 12)")
    p.add_argument("--turns", type=int, default=3, help="turns per chat (default: 3)")
    p.add_argument("--prompt-words", type=int, default=150, help="words in each chat's first message (default: 150)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per reply (default: 24)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's KV-cache slots (default: 4)")
    p.add_argument("--cache-mb", default="1024", help="prompt-cache sizes to compare with 0, comma-separated (default: 1024)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of all configurations (default: 1)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.conversations, args.turns, args.max_tokens, args.max_batch, args.rounds) < 1 or args.prompt_words < 1:
        p.error("counts must be at least 1")
    sizes = [0.0] + [float(x) for x in args.cache_mb.split(",") if float(x) > 0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        elif args.config is None and default_model() is not None:
            model = default_model()
        else:
            model = build_random_model(Path(tmp), args.config or "demo")
        runs = [serve_and_run(model, mb, args) for _ in range(args.rounds) for mb in sizes]
    replies = {json.dumps([[r["reply"] for r in c["turns"]] for c in run["chats"]]) for run in runs}
    same = len(replies) == 1
    print(f"{args.conversations} chats x {args.turns} turns, {args.max_batch} slots, model {model}")
    print(f"{'prompt cache':>12} | {'wall s':>7} | {'follow-up TTFT p50 / p90 s':>27} | {'cached / prompt tokens':>24} | first-turn TTFT p50 s")
    for run in runs:
        print(f"{run['cache_mb']:>9g} MB | {run['wall_s']:7.1f} | {run['followup_ttft_p50_s']:12.2f} / {run['followup_ttft_p90_s']:<12.2f} | "
              f"{run['followup_cached_tokens']:>10} / {run['followup_prompt_tokens']:<11} | {run['first_turn_ttft_p50_s']:.2f}")
    print(f"same replies in every configuration: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "conversations": args.conversations, "turns": args.turns,
                                               "max_batch": args.max_batch, "prompt_words": args.prompt_words,
                                               "max_tokens": args.max_tokens, "same_replies": same, "runs": runs}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
