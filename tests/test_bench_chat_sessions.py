"""bench/chat_sessions.py end to end on the shipped default model: two servers (prompt cache off and on),
the same conversations, more cached prompt tokens with the cache."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench_script

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def test_prompt_cache_finds_more_of_the_follow_up_turns(tmp_path) -> None:
    bench = load_bench_script("chat_sessions")
    if bench.default_model() is None:
        pytest.skip("no default model installed")
    out = tmp_path / "chat.json"
    code = bench.main(["--conversations", "3", "--max-batch", "1", "--turns", "2", "--prompt-words", "60",
                       "--max-tokens", "4", "--cache-mb", "64", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["same_replies"]
    off, on = result["runs"]
    assert (off["cache_mb"], on["cache_mb"]) == (0, 64)
    assert off["followup_prompt_tokens"] == on["followup_prompt_tokens"] > 0
    assert on["followup_cached_tokens"] > off["followup_cached_tokens"]
    assert all(len(c["turns"]) == 2 and c["turns"][1]["prompt_tokens"] > c["turns"][0]["prompt_tokens"] for c in on["chats"])
