"""The server end to end: a real uvicorn server on loopback, a tiny random packed model with a BPE
tokenizer trained here, driven by the official ``openai`` client and by raw HTTP; the chat page in
headless Chromium when it is installed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bittern.configs import get_config  # noqa: E402
from bittern.demo import demo_text  # noqa: E402
from bittern.generate import generate_ids  # noqa: E402
from bittern.model import Transformer  # noqa: E402
from bittern.modelfile import load_packed, save_packed  # noqa: E402
from bittern.sampling import SamplingParams  # noqa: E402
from bittern.serve import ServeConfig, ServerThread, build_app  # noqa: E402
from bittern.tokenizer import load_tokenizer, train_bpe  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny-test"
MAX_BATCH = 4
MAX_QUEUE = 2


class Throttled:
    """Wraps an engine and sleeps a little per step, so streams last long enough to be interrupted."""

    def __init__(self, engine, delay_s: float = 0.004) -> None:
        self.inner, self.delay_s = engine, delay_s
        self.max_len = engine.max_len
        self.hold = threading.Event()  # while set, steps produce nothing: admitted requests stay active

    free_slots = property(lambda self: self.inner.free_slots)
    active = property(lambda self: self.inner.active)

    def add(self, *args, **kwargs):
        return self.inner.add(*args, **kwargs)

    def step(self):
        time.sleep(self.delay_s)
        return [] if self.hold.is_set() else self.inner.step()

    def cancel(self, request_id: int) -> None:
        self.inner.cancel(request_id)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_model")
    tok = train_bpe([demo_text()[:200_000]], vocab_size=512)
    tok.save(root / "tok")
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_seq_len=256)
    save_packed(Transformer(cfg), root / "model", tokenizer_file=root / "tok" / "tokenizer.json", meta={"test": True})
    return root / "model"


@pytest.fixture(scope="module")
def server(model_dir):
    engines = []

    def wrap(engine):
        engines.append(Throttled(engine))
        return engines[-1]

    config = ServeConfig(model_name=MODEL, api_key=KEY, max_queue=MAX_QUEUE, max_body_bytes=64 * 1024,
                         max_tokens_limit=200)
    app = build_app(model_dir, config, max_batch=MAX_BATCH, engine="reference", engine_wrapper=wrap)
    with ServerThread(app) as srv:
        srv.engine, srv.throttle = engines[0].inner, engines[0]
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server, method: str, path: str, key: str | None = KEY, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


def metrics(server) -> dict[str, float]:
    out = {}
    for line in raw(server, "GET", "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = metrics(server)
        if (m["bittern_active_requests"] == 0 and m["bittern_queue_depth"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.02)


def reference_text(model_dir: Path, prompt: str, max_tokens: int) -> tuple[str, int]:
    tok = load_tokenizer(model_dir / "tokenizer.json")
    ids = list(generate_ids(load_packed(model_dir), tok.encode(prompt), SamplingParams(max_tokens=max_tokens), tok.eos_id))
    return tok.decode(ids), len(ids)


# ---------------------------------------------------------------------------------------- API


def test_models_and_health(server, client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = raw(server, "GET", "/health", key=None)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_matches_reference_generation(server, client, model_dir) -> None:
    prompt = "ROMEO: What light"
    expected, n_tokens = reference_text(model_dir, prompt, 24)
    assert expected  # the random model says something
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == expected
    tok = load_tokenizer(model_dir / "tokenizer.json")
    assert out.usage.prompt_tokens == len(tok.encode(prompt))
    assert out.usage.completion_tokens == n_tokens
    assert out.choices[0].finish_reason == ("length" if n_tokens == 24 else "stop")


def test_completion_streaming_equals_non_streaming(server, client) -> None:
    kw = dict(model=MODEL, prompt="To be, or not", max_tokens=30, temperature=0)
    full = client.completions.create(**kw)
    stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == full.choices[0].text
    assert reasons == [full.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_chat_non_streaming_and_streaming(server, client) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.object == "chat.completion" and full.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_long_non_streaming_request_returns_everything(server, client) -> None:
    out = client.completions.create(model=MODEL, prompt="Slowly", max_tokens=150, temperature=0.5, seed=1,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 150 and out.choices[0].finish_reason == "length"
    assert out.choices[0].text


def test_stop_strings_cut_the_output(server, client) -> None:
    kw = dict(model=MODEL, prompt="KING HENRY", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.index(stop)
    out = client.completions.create(**kw, stop=[stop])
    assert out.choices[0].text == full[:cut]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True) if c.choices)
    assert streamed == full[:cut]


def test_sampling_is_seeded_and_n_gives_several_choices(server, client) -> None:
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=16, temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw, seed=7, n=3)
    b = client.completions.create(**kw, seed=7, n=3)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice has its own seed
    assert a.usage.completion_tokens == 48


def test_concurrent_requests_share_decode_steps(server, client) -> None:
    before = metrics(server)
    results: list = [None] * MAX_BATCH

    def go(i: int) -> None:
        results[i] = client.completions.create(model=MODEL, prompt=f"Request {i}", max_tokens=40, temperature=0,
                                               extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(MAX_BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = wait_idle(server)
    assert all(r.usage.completion_tokens == 40 for r in results)
    tokens = after["bittern_generation_tokens_total"] - before["bittern_generation_tokens_total"]
    steps = after["bittern_decode_steps_total"] - before["bittern_decode_steps_total"]
    assert tokens == 40 * MAX_BATCH
    assert steps < tokens  # sequences advanced together: fewer forward steps than tokens


# ---------------------------------------------------------------------------------------- bad input


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param != "__any__":
        assert body["error"]["param"] == param
    return body["error"]


def test_malformed_json_and_wrong_types_are_400(server) -> None:
    err = assert_openai_error(raw(server, "POST", "/v1/completions", content=b'{"model": "tiny-test", "prompt": ',
                                  headers={"Content-Type": "application/json"}), 400)
    assert "malformed JSON" in err["message"]
    err = assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "ten"}), 400, "max_tokens")
    assert "ten" in err["message"]
    assert_openai_error(raw(server, "POST", "/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400)
    assert_openai_error(raw(server, "POST", "/v1/chat/completions", json={"model": MODEL}), 400, "messages")
    assert_openai_error(raw(server, "POST", "/v1/chat/completions", json=[1, 2]), 400)
    assert_openai_error(raw(server, "POST", "/v1/chat/completions",
                            json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 5}), 400, "temperature")
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": "yes"}), 400, "stream")


def test_limits_are_enforced(server, client) -> None:
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100_000}), 400, "max_tokens")
    long_prompt = list(range(1, 300))
    err = assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": long_prompt}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": [99999]}), 400, "prompt")
    big = {"model": MODEL, "prompt": "x" * 100_000}
    err = assert_openai_error(raw(server, "POST", "/v1/completions", json=big), 413)
    assert "limit" in err["message"]
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 50}), 400, "n")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    assert_openai_error(raw(server, "GET", "/nope"), 404)


def test_api_key_is_required_except_for_health_and_the_page(server) -> None:
    assert_openai_error(raw(server, "GET", "/v1/models", key=None), 401)
    err = assert_openai_error(raw(server, "GET", "/v1/models", key="wrong"), 401)
    assert err["code"] == "invalid_api_key"
    assert_openai_error(raw(server, "GET", "/metrics", key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert raw(server, "GET", "/health", key=None).status_code == 200
    page = raw(server, "GET", "/", key=None)
    assert page.status_code == 200 and "bittern chat" in page.text and "getReader" in page.text


def test_bad_requests_do_not_disturb_a_running_stream(server, client) -> None:
    kw = dict(model=MODEL, prompt="Good night", max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**kw).choices[0].text
    stream = client.completions.create(**kw, stream=True)
    pieces = []
    for i, chunk in enumerate(stream):
        pieces.extend(c.text for c in chunk.choices)
        if i in (2, 5):
            assert raw(server, "POST", "/v1/completions", content=b"{{{", headers={"Content-Type": "application/json"}).status_code == 400
            assert raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": 3}).status_code == 400
    assert "".join(pieces) == expected


def test_client_disconnect_mid_stream_frees_the_slot(server) -> None:
    before = wait_idle(server)
    body = {"model": MODEL, "prompt": "Long story", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept open: leaving this generator early closes the connection
            events = 0
            while events < 3:
                events += next(lines).startswith("data: {")
            assert metrics(server)["bittern_active_requests"] == 1
            lines.close()  # the client goes away mid-stream
    after = wait_idle(server)
    assert after["bittern_active_requests"] == 0
    assert after["bittern_free_slots"] == MAX_BATCH and server.engine.free_slots == MAX_BATCH
    assert after["bittern_requests_cancelled_total"] == before["bittern_requests_cancelled_total"] + 1
    # far fewer than the 200 requested tokens were generated
    assert after["bittern_generation_tokens_total"] - before["bittern_generation_tokens_total"] < 150


def test_client_disconnect_while_waiting_for_a_non_streaming_answer(server) -> None:
    before = wait_idle(server)
    server.throttle.hold.set()  # the answer never comes while held
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(30, read=0.5),
                       json={"model": MODEL, "prompt": "Wait", "max_tokens": 100})
        deadline = time.time() + 20
        while metrics(server)["bittern_requests_cancelled_total"] == before["bittern_requests_cancelled_total"]:
            assert time.time() < deadline, "the abandoned request was not cancelled"
            time.sleep(0.05)
    finally:
        server.throttle.hold.clear()
    after = wait_idle(server)
    assert after["bittern_active_requests"] == 0 and server.engine.free_slots == MAX_BATCH
    assert after["bittern_generation_tokens_total"] == before["bittern_generation_tokens_total"]


def test_client_disconnect_while_tokens_flow_to_a_non_streaming_answer(server) -> None:
    """A non-streaming client that goes away while its tokens are being generated is noticed too."""
    before = wait_idle(server)
    server.throttle.delay_s = 0.02  # 200 tokens would take ~4 s
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=httpx.Timeout(30, read=0.5),
                       json={"model": MODEL, "prompt": "Gone", "max_tokens": 200, "ignore_eos": True})
        after = wait_idle(server)
    finally:
        server.throttle.delay_s = 0.004
    assert after["bittern_requests_cancelled_total"] == before["bittern_requests_cancelled_total"] + 1
    assert after["bittern_generation_tokens_total"] - before["bittern_generation_tokens_total"] < 150
    assert server.engine.free_slots == MAX_BATCH


def test_openai_edge_cases(server, client) -> None:
    c = "/v1/completions"
    for stream in (False, True):  # refused before any stream starts
        assert_openai_error(raw(server, "POST", c, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": 1 << 64,
                                                         "stream": stream}), 400, "seed")
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2, seed=(1 << 64) - 1)  # choice 2 wraps
    assert len(r.choices) == 2
    assert_openai_error(raw(server, "POST", c, json={"model": MODEL, "prompt": "Hi", "stream_options": {"include_usage": True}}),
                        400, "stream_options")
    assert raw(server, "POST", c, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "suffix": ""}).status_code == 200
    r = client.completions.create(model=MODEL, prompt="Hi", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16  # the legacy endpoint's default, as OpenAI's
    nan = b'{"model": "%s", "prompt": "Hi", "max_tokens": 3, "repetition_penalty": NaN}' % MODEL.encode()
    assert_openai_error(raw(server, "POST", c, content=nan, headers={"Content-Type": "application/json"}), 400,
                        "repetition_penalty")
    assert_openai_error(raw(server, "POST", "/v1/chat/completions",
                            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 250}),
                        400, "max_completion_tokens")
    err = assert_openai_error(raw(server, "POST", c, content=b""), 400)
    assert "empty" in err["message"]
    # a JSON object without its content type (curl -d) is read as JSON
    r = raw(server, "POST", c, content=json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    r = raw(server, "DELETE", "/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert raw(server, "HEAD", "/health", key=None).status_code == 200
    assert raw(server, "HEAD", "/", key=None).status_code == 200


def test_cors_origins_let_a_page_elsewhere_call_the_api(model_dir) -> None:
    config = ServeConfig(model_name=MODEL, api_key=KEY, cors_origins=("http://localhost:3000",))
    with ServerThread(build_app(model_dir, config, max_batch=1, engine="reference")) as srv:
        pre = httpx.options(srv.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.get(srv.url + "/v1/models", timeout=10, headers={"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(srv.url + "/v1/models", timeout=10, headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 401  # the key is still required


def test_logprobs_of_the_generated_tokens(server, client, model_dir) -> None:
    """logprobs (completions) and logprobs/top_logprobs (chat): one entry per token of the returned text,
    the first equal to the model's log-softmax at the prompt's last position, the greedy choice the most
    likely alternative; the same streamed; tokens after a stop string are not reported."""
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.tokens) == 12
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(12)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # (alternatives decoding to the same text share one key, the likeliest kept)
        assert value <= 0 and 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-5)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    model = load_packed(model_dir)
    ids = tok.encode("ROMEO:")
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
    first = tok.encode(lp.tokens[0])
    assert len(first) == 1 and lp.token_logprobs[0] == pytest.approx(float(expected[first[0]]), abs=1e-4)
    streamed = [ch for ch in client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0,
                                                       logprobs=3, stream=True, extra_body={"ignore_eos": True})]
    tokens = [t for ch in streamed for choice in ch.choices if choice.logprobs for t in choice.logprobs.tokens]
    assert tokens == lp.tokens
    cut = c.text[len(c.text) // 2 :][:3]
    stopped = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=0,
                                        stop=[cut], extra_body={"ignore_eos": True}).choices[0]
    assert "".join(stopped.logprobs.tokens) == stopped.text == c.text[: c.text.index(cut)]
    assert stopped.logprobs.top_logprobs is None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(x.token for x in content) == chat.choices[0].message.content
    assert all(len(x.top_logprobs) == 2 and bytes(x.bytes).decode() == x.token for x in content)
    assert_openai_error(raw(server, "POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "top_logprobs")
    assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 50}),
                        400, "logprobs")


def test_full_queue_answers_429(server) -> None:
    wait_idle(server)
    body = {"model": MODEL, "prompt": "Busy", "max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}
    http = httpx.Client(timeout=30)
    streams = []
    server.throttle.hold.set()  # nothing finishes while the queue fills
    try:
        for _ in range(MAX_BATCH + MAX_QUEUE):
            s = http.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            resp = s.__enter__()
            streams.append(s)
            assert resp.status_code == 200
        err = assert_openai_error(raw(server, "POST", "/v1/completions", json={**body, "stream": False}), 429)
        assert err["code"] == "queue_full" and "busy" in err["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).completions.create(
                model=MODEL, prompt="x", max_tokens=5)
        m = metrics(server)
        assert m["bittern_queue_depth"] == MAX_QUEUE and m["bittern_active_requests"] == MAX_BATCH
        assert m["bittern_requests_rejected_total"] >= 2
    finally:
        server.throttle.hold.clear()
        for s in streams:
            s.__exit__(None, None, None)
        http.close()
    after = wait_idle(server)
    assert after["bittern_active_requests"] == 0 and after["bittern_free_slots"] == MAX_BATCH


def test_metrics_are_prometheus_text(server, client) -> None:
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=3, temperature=0)
    text = raw(server, "GET", "/metrics").text
    assert "# TYPE bittern_generation_tokens_total counter" in text
    assert 'bittern_requests_total{endpoint="/v1/completions",status="200"}' in text
    m = metrics(server)
    assert m["bittern_generation_tokens_total"] >= 3 and m["bittern_max_batch"] == MAX_BATCH
    assert m["bittern_generation_tokens_per_second"] > 0


# ---------------------------------------------------------------------------------------- CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter importing torch: ~10-20 s on a busy 2-core machine
def test_cli_serve_starts_and_answers(model_dir) -> None:
    port = free_port()
    env = {**os.environ, "BITTERN_API_KEY": "cli-key"}
    proc = subprocess.Popen([sys.executable, "-m", "bittern", "serve", "--model", str(model_dir), "--port", str(port),
                             "--engine", "reference", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        assert [m.id for m in c.models.list().data] == [model_dir.name]
        out = c.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_errors_are_one_line(capsys, tmp_path) -> None:
    from bittern.cli import main

    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "no such model directory" in err and "Traceback" not in err
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--prompt-cache-mb", "-1"]) == 2
    assert "--prompt-cache-mb" in capsys.readouterr().err


def test_fast_engine_server_carries_prompts_in_steps(model_dir) -> None:
    """The fast engine behind the server, prompts carried 3 tokens a step: concurrent streams all finish,
    each with the tokens one request alone gets."""
    engines = []
    app = build_app(model_dir, ServeConfig(model_name=MODEL), max_batch=3, engine="fast", prefill_chunk=3,
                    engine_wrapper=lambda e: engines.append(e) or e)
    assert engines[0].prefill_chunk == 3 and engines[0].reuse_prefix  # the native path, not the torch fallback
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        prompts = ["to be or not to be, that is the question", "ROMEO:", "what light through yonder window breaks"]

        def one(p: str) -> str:
            out = c.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
            return out.choices[0].text

        alone = [one(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(one, prompts))
        assert together == alone and all(alone)
        scored = c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0, logprobs=1).choices[0]
        assert "".join(scored.logprobs.tokens) == scored.text == alone[0]  # logprobs on the fast engine too
        # a second chat turn resends the first: its prompt is found in the KV cache (usage reports it)
        msgs = [{"role": "user", "content": "to be or not to be, that is the question"}]
        r1 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
        msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "and then?"}]
        r2 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        assert r1.usage.prompt_tokens // 2 < cached < r2.usage.prompt_tokens
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        total = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("bittern_prompt_tokens_cached_total")]
        assert len(total) == 1 and total[0] >= cached
        # two choices of a prompt sent twice: both find it cached, usage counts it once
        for _ in range(2):
            r = c.completions.create(model=MODEL, prompt="what light through yonder window breaks", n=2,
                                     max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1



def test_fast_engine_server_keeps_reused_slots_prompts_in_host_memory(model_dir) -> None:
    """One slot and a prompt cache: a conversation whose slot another request took still finds its
    earlier turn (whole 32-token blocks) in host memory; usage and /metrics report it, and the reply
    equals a server's without the cache."""
    words = " ".join(demo_text()[1000:3000].split()[:40])
    msgs = [{"role": "user", "content": words}]

    def conversation(cache_bytes: int) -> tuple[list[str], int, str]:
        app = build_app(model_dir, ServeConfig(model_name=MODEL), max_batch=1, engine="fast",
                        prompt_cache_bytes=cache_bytes)
        with ServerThread(app) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            r1 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
            c.completions.create(model=MODEL, prompt="KING:", max_tokens=3, temperature=0)  # takes the slot
            follow = msgs + [{"role": "assistant", "content": r1.choices[0].message.content},
                             {"role": "user", "content": "and then?"}]
            r2 = c.chat.completions.create(model=MODEL, messages=follow, max_tokens=6, temperature=0)
            metrics = httpx.get(srv.url + "/metrics", timeout=10).text
            assert r1.usage.prompt_tokens > 64
            return ([r1.choices[0].message.content, r2.choices[0].message.content],
                    r2.usage.prompt_tokens_details.cached_tokens, metrics)

    texts, cached, metrics = conversation(64 << 20)
    texts_off, cached_off, metrics_off = conversation(0)
    assert texts == texts_off
    assert cached_off == 0 and cached >= 64 and cached % 32 == 0
    stored = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("bittern_prompt_cache_bytes")]
    assert len(stored) == 1 and stored[0] > 0
    assert "bittern_prompt_cache_bytes" not in metrics_off


# ---------------------------------------------------------------------------------------- the chat page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _playwright_missing() -> bool:
    try:
        import playwright.sync_api  # noqa: F401  (only checking that it imports)
    except ImportError:
        return True
    return False


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
@pytest.mark.skipif(_playwright_missing(), reason="playwright is not installed (pip install playwright)")
def test_chat_page_streams_a_reply_in_headless_chromium(server, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    # $BITTERN_ARTIFACTS_DIR keeps the screenshot somewhere stable (pytest prunes old tmp dirs)
    shot = Path(os.environ.get("BITTERN_ARTIFACTS_DIR") or tmp_path) / "chat_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.add_init_script(f"localStorage.setItem('bittern-api-key', {json.dumps(KEY)})")
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('model:')", timeout=20_000)
            page.fill("#max-tokens", "40")
            page.fill("#temperature", "0")
            page.fill("#prompt", "Hello, who are you?")
            page.click("#send")
            reply = page.locator(".msg.assistant").first
            page.wait_for_function("(() => { const m = document.querySelector('.msg.assistant');"
                                   " return m && m.dataset.state === 'done'; })()", timeout=30_000)
            assert page.locator(".msg.user").first.inner_text() == "Hello, who are you?"
            text = reply.inner_text()
            chunks = int(reply.get_attribute("data-chunks"))
            assert text.strip() and chunks > 1, (text, chunks)  # arrived in several streamed pieces
            assert page.locator(".msg.error").count() == 0
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
    print(f"\nchat page screenshot: {shot}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
@pytest.mark.skipif(_playwright_missing(), reason="playwright is not installed (pip install playwright)")
def test_chat_page_leaves_out_old_turns_when_the_history_outgrows_the_context(server) -> None:
    """A conversation longer than the context keeps going: the page resends the history without its
    oldest exchanges (and says so) instead of failing with context_length_exceeded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.add_init_script(f"localStorage.setItem('bittern-api-key', {json.dumps(KEY)})")
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('model:')", timeout=20_000)
            page.fill("#max-tokens", "120")
            page.fill("#temperature", "1")
            for turn in range(6):
                page.fill("#prompt", f"Tell me more, part {turn}.")
                page.click("#send")
                page.wait_for_function(f"document.querySelectorAll('.msg.assistant[data-state=\"done\"]').length === {turn + 1}"
                                       " || document.querySelector('.msg.error') !== null", timeout=60_000)
                assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").first.inner_text()
                if page.locator(".msg.note").count():
                    break
            assert "left out to fit the model's context" in page.locator(".msg.note").first.inner_text()
        finally:
            browser.close()
