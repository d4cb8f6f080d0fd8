"""Serving pieces without a server: incremental detokenization, chat templates, error messages, the worker."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from bittern.batching import BatchGenerator
from bittern.configs import get_config
from bittern.model import Transformer
from bittern.sampling import SamplingParams
from bittern.serve.chat_template import ChatTemplateError, chat_stop_strings, render_chat
from bittern.serve.detokenize import IncrementalDecoder
from bittern.serve.schemas import validation_message
from bittern.serve.worker import GenerationWorker, Job, QueueFull
from bittern.tokenizer import train_bpe


class CharTokenizer:
    """Token i is the i-th string of a fixed table; the string "\\ufffd" stands for half a character."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("\ufffd\ufffd", "é")  # two halves make one character


def run_decoder(pieces: list[str], ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    dec = IncrementalDecoder(CharTokenizer(pieces), stop)
    deltas = [dec.push(i) for i in ids if not dec.stopped]
    if not dec.stopped:
        deltas.append(dec.flush())
    return deltas, dec.stopped


def test_decoder_releases_text_and_cuts_at_a_stop_string_split_over_tokens() -> None:
    pieces = ["Hello", " wor", "ld", "\nUs", "er:", " more"]
    deltas, stopped = run_decoder(pieces, [0, 1, 2, 3, 4, 5], ["\nUser:"])
    assert "".join(deltas) == "Hello world"
    # "\nUs" could start the stop string, so it is held back, then dropped when the stop completes
    assert deltas[:3] == ["Hello", " wor", "ld"] and deltas[3] == ""
    assert stopped


def test_decoder_releases_a_held_back_prefix_that_turns_out_not_to_be_a_stop() -> None:
    deltas, stopped = run_decoder(["a", "\nUs", "ual", "!"], [0, 1, 2, 3], ["\nUser:"])
    assert deltas[1] == "" and deltas[2] == "\nUsual" and "".join(deltas) == "a\nUsual!"


def test_decoder_holds_incomplete_characters_and_flushes_at_the_end() -> None:
    deltas, _ = run_decoder(["ca", "\ufffd", "\ufffd", "x"], [0, 1, 2, 3], [])
    assert deltas[:4] == ["ca", "", "é", "x"]
    deltas, _ = run_decoder(["ab", "c"], [0, 1], ["c"])
    assert "".join(deltas) == "ab"


def test_decoder_with_a_real_byte_level_tokenizer_round_trips() -> None:
    tok = train_bpe(["héllo wörld, naïve café"] * 20, vocab_size=300)
    ids = tok.encode("café naïve wörld héllo")
    dec = IncrementalDecoder(tok, [])
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == "café naïve wörld héllo"


def test_fallback_chat_format() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render_chat(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    assert render_chat(messages[:2], bos_token="<s>", add_generation_prompt=False) == "<s>System: Be brief.\n\nUser: Hi\n\n"
    assert chat_stop_strings(None) == ["\nUser:"] and chat_stop_strings("{{x}}") == []


CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_jinja_chat_template_renders_like_transformers() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(messages, CHATML, bos_token="<s>") == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(messages, CHATML, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    # trim_blocks / lstrip_blocks as transformers sets them, and tojson keeps non-ASCII
    template = "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n{{ m['content'] | tojson }}\n  {% endif %}\n{% endfor %}"
    assert render_chat([{"role": "user", "content": "é"}], template) == '"é"\n'
    with pytest.raises(ChatTemplateError, match="no tools"):
        render_chat([{"role": "tool", "content": "x"}], CHATML)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat(messages, "{% for %}")


def test_validation_messages_name_the_parameter() -> None:
    msg, param = validation_message([{"type": "int_type", "loc": ("body", "max_tokens"), "msg": "Input should be a valid integer", "input": "ten"}])
    assert param == "max_tokens" and "'ten'" in msg
    msg, param = validation_message([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])
    assert msg.startswith("malformed JSON body") and param is None
    msg, param = validation_message([{"type": "missing", "loc": ("body", "model"), "msg": "Field required", "input": {}}])
    assert param == "model" and "missing" in msg


class FakeEngine:
    """Emits token 7 forever for each request; counts steps."""

    max_len = 64

    def __init__(self, slots: int = 2, step_s: float = 0.0) -> None:
        self.slots, self.step_s, self.ids, self.live, self.steps = slots, step_s, 0, {}, 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.live)

    @property
    def active(self) -> int:
        return len(self.live)

    def add(self, prompt, params, eos_ids=None, user_data=None) -> int:
        self.ids += 1
        self.live[self.ids] = [params.max_tokens, 0]
        return self.ids

    def step(self):
        from bittern.batching import StepOutput

        time.sleep(self.step_s)
        self.steps += 1
        outs = []
        for rid, state in list(self.live.items()):
            state[1] += 1
            done = state[1] >= state[0]
            if done:
                del self.live[rid]
            outs.append(StepOutput(rid, 7, done, "length" if done else None))
        return outs

    def cancel(self, request_id: int) -> None:
        self.live.pop(request_id, None)


def collect(loop: asyncio.AbstractEventLoop, jobs: list[Job], timeout: float = 10.0) -> list:
    async def gather():
        events = []
        remaining = len(jobs)
        while remaining:
            e = await asyncio.wait_for(jobs[0].queue.get(), timeout)
            events.append(e)
            remaining -= e.kind != "delta"
        return events

    return loop.run_until_complete(gather())


def make_jobs(loop, n: int, max_tokens: int, timeout_s: float = 60.0) -> list[Job]:
    queue: asyncio.Queue = asyncio.Queue()
    return [Job([1, 2], SamplingParams(max_tokens=max_tokens), loop, queue=queue, index=i, timeout_s=timeout_s) for i in range(n)]


def test_worker_batches_queues_and_refuses_when_full() -> None:
    loop = asyncio.new_event_loop()
    engine = FakeEngine(slots=2, step_s=0.01)
    worker = GenerationWorker(engine, CharTokenizer([""] * 7 + ["x"]), max_queue=1)
    worker.start()
    try:
        jobs = make_jobs(loop, 3, max_tokens=5)
        worker.submit(jobs)  # 2 slots + 1 waiting
        with pytest.raises(QueueFull, match="busy"):
            worker.submit(make_jobs(loop, 1, 5))
        events = collect(loop, jobs)
        done = [e for e in events if e.kind == "done"]
        assert sorted(e.index for e in done) == [0, 1, 2]
        assert all(e.completion_tokens == 5 and e.finish_reason == "length" for e in done)
        texts = {i: "".join(e.text for e in events if e.index == i) for i in range(3)}
        assert texts == {0: "xxxxx", 1: "xxxxx", 2: "xxxxx"}
        # the first two ran together: 5 shared steps, then 5 for the third
        assert engine.steps == 10
        assert worker.metrics.rejected_queue_full == 1 and worker.metrics.generated_tokens == 15
    finally:
        worker.stop()
        loop.close()


def test_worker_times_out_and_cancels() -> None:
    loop = asyncio.new_event_loop()
    engine = FakeEngine(slots=1, step_s=0.01)
    worker = GenerationWorker(engine, CharTokenizer([""] * 7 + ["x"]), max_queue=4)
    worker.start()
    try:
        slow = make_jobs(loop, 1, max_tokens=10_000, timeout_s=0.2)
        worker.submit(slow)
        events = collect(loop, slow)
        assert events[-1].kind == "error" and events[-1].status == 504
        assert engine.active == 0 and worker.metrics.timed_out == 1
        gone = make_jobs(loop, 1, max_tokens=10_000)
        worker.submit(gone)
        deadline = time.time() + 5
        while engine.active == 0 and time.time() < deadline:
            time.sleep(0.005)
        worker.cancel(gone[0])
        while engine.active and time.time() < deadline:
            time.sleep(0.005)
        assert engine.active == 0 and worker.metrics.cancelled == 1
    finally:
        worker.stop()
        loop.close()


def test_worker_over_the_reference_batch_generator_frees_slots_on_cancel() -> None:
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).freeze()
    gen = BatchGenerator(model, max_batch=2, max_len=64)
    loop = asyncio.new_event_loop()
    worker = GenerationWorker(gen, CharTokenizer([chr(65 + i % 26) for i in range(512)]), max_queue=2)
    worker.start()
    try:
        jobs = make_jobs(loop, 2, max_tokens=8)
        worker.submit(jobs)
        events = collect(loop, jobs)
        assert sum(e.completion_tokens for e in events if e.kind == "done") == 16
        assert gen.free_slots == 2 and gen.active == 0
        long = make_jobs(loop, 1, max_tokens=60)
        worker.submit(long)
        while gen.active == 0:
            time.sleep(0.001)
        worker.cancel(long[0])
        deadline = time.time() + 5
        while gen.free_slots != 2 and time.time() < deadline:
            time.sleep(0.005)
        assert gen.free_slots == 2 and gen.active == 0
    finally:
        worker.stop()
        loop.close()


def test_worker_prefill_failure_reaches_only_the_new_jobs(monkeypatch) -> None:
    """The worker prefills admitted jobs together; when that pass fails, those jobs get a 500 and the
    job already generating goes on to the end."""
    torch.manual_seed(0)
    gen = BatchGenerator(Transformer(get_config("tiny")).freeze(), max_batch=3, max_len=64)
    real_step = gen.step
    monkeypatch.setattr(gen, "step", lambda: time.sleep(0.005) or real_step())
    loop = asyncio.new_event_loop()
    worker = GenerationWorker(gen, CharTokenizer([chr(65 + i % 26) for i in range(512)]), max_queue=2)
    worker.start()
    try:
        first = make_jobs(loop, 1, max_tokens=40)
        worker.submit(first)
        deadline = time.time() + 5
        while worker.metrics.generated_tokens == 0 and time.time() < deadline:
            time.sleep(0.002)

        def broken(prompts, slots):
            raise RuntimeError("native failure")

        monkeypatch.setattr(gen, "_prefill_many", broken)
        late = make_jobs(loop, 2, max_tokens=5)
        worker.submit(late)
        errors = collect(loop, late)
        assert [e.status for e in errors] == [500, 500] and all("prefill failed" in e.text for e in errors)
        events = collect(loop, first)
        assert events[-1].kind == "done" and events[-1].completion_tokens == 40
        assert gen.free_slots == 3 and gen.active == 0
    finally:
        worker.stop()
        loop.close()
