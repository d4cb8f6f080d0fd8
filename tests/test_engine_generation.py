"""Engine generation: seeded sampling, streaming, stop strings, batching, the BatchGenerator interface, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from bittern.cli import main
from bittern.configs import get_config
from bittern.demo import demo_text
from bittern.engine import Engine, EngineModel
from bittern.model import Transformer
from bittern.modelfile import save_packed
from bittern.sampling import SamplingParams
from bittern.tokenizer import train_bpe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny packed model with a BPE tokenizer of its vocabulary size."""
    d = tmp_path_factory.mktemp("engine_model")
    text = demo_text()[:60_000]
    tok = train_bpe([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=512)
    tok_file = tok.save(d / "tok")
    torch.manual_seed(0)
    cfg = get_config("tiny-2b4t").replace(vocab_size=tok.vocab_size)
    model = Transformer(cfg).freeze("1.6bit")
    save_packed(model, d / "model", layout="1.6bit", tokenizer_file=tok_file)
    return d / "model"


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir, head="f32", kv_dtype="f32")


def test_seeded_sampling_is_reproducible(engine) -> None:
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=123, max_tokens=30)
    a = list(engine.generate_ids("To be", p))
    b = list(engine.generate_ids("To be", p))
    c = list(engine.generate_ids("To be", SamplingParams(**{**p.__dict__, "seed": 124})))
    assert a == b and len(a) == 30
    assert a != c


def test_stream_concatenates_to_generate(engine) -> None:
    p = SamplingParams(temperature=0.8, seed=5, max_tokens=25)
    pieces = list(engine.stream("ROMEO:", p))
    result = engine.generate("ROMEO:", p)
    assert "".join(pieces) == result.text
    assert len(result.token_ids) == 25 and result.finish_reason == "length"
    assert result.stats.prompt_tokens > 0 and result.stats.generated_tokens == 25


def test_stop_string_cuts_text(engine) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=40)
    full = engine.generate("the", p).text
    assert len(full) > 4
    stop = full[2:4]
    cut = engine.generate("the", SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == "stop"
    assert "".join(engine.stream("the", SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))) == cut.text


def test_eos_ends_generation(engine) -> None:
    first = list(engine.generate_ids("the", SamplingParams(temperature=1.0, seed=1, max_tokens=8)))
    eos = first[3]
    got = list(engine.generate_ids("the", SamplingParams(temperature=1.0, seed=1, max_tokens=8), eos_ids={eos}))
    assert got == first[: first.index(eos) + 1] and len(got) < 8


def test_batched_generation_equals_one_by_one(engine) -> None:
    prompts = ["ROMEO:", "To be or not", "KING", "What say you, my lord? I"]
    params = [SamplingParams(max_tokens=12), SamplingParams(temperature=0.9, seed=3, max_tokens=7),
              SamplingParams(max_tokens=15, repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=20, seed=9, max_tokens=10)]
    batched = engine.generate_batch(prompts, params)
    single = [engine.generate(pr, pa) for pr, pa in zip(prompts, params)]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [len(b.token_ids) for b in batched] == [12, 7, 15, 10]


@pytest.mark.parametrize("prefill_chunk", [256, None])  # prompts carried in decode passes, or prefilled whole
def test_batch_generator_interface(engine, prefill_chunk) -> None:
    gen = engine.batch_generator(max_batch=2, max_len=64, prefill_chunk=prefill_chunk)
    ids = engine.encode("ROMEO:")
    a = gen.add(ids, SamplingParams(max_tokens=6))
    b = gen.add(ids, SamplingParams(max_tokens=50))
    assert gen.free_slots == 0 and gen.active == 2
    with pytest.raises(RuntimeError):
        gen.add(ids, SamplingParams())
    tokens = {a: [], b: []}
    for _ in range(3):
        for o in gen.step():
            tokens[o.request_id].append(o.token)
    gen.cancel(b)
    assert gen.active == 1 and gen.free_slots == 1
    while gen.active:
        for o in gen.step():
            tokens[o.request_id].append(o.token)
    assert tokens[a] == list(engine.generate_ids(ids, SamplingParams(max_tokens=6), eos_ids=set()))
    assert len(tokens[b]) == 3


def test_batch_generator_carries_prompts_in_decode_steps(engine, monkeypatch) -> None:
    """New prompts ride in the running requests' passes, at most ``prefill_chunk`` prompt tokens a step:
    the running request gets a token every step, the new one its first token in the step that ends its
    prompt, and both the same tokens as one by one."""
    gen = engine.batch_generator(max_batch=2, max_len=96, prefill_chunk=4)
    rows = []
    real = gen.model.run_rows
    monkeypatch.setattr(gen.model, "run_rows", lambda tokens, *a, **k: rows.append(len(tokens)) or real(tokens, *a, **k))
    short, long = engine.encode("KING"), engine.encode("What say you, my lord? I pray you, speak")
    assert len(short) <= 4 and len(long) > 9
    pa, pb = SamplingParams(max_tokens=14), SamplingParams(temperature=0.8, seed=2, max_tokens=6)
    a = gen.add(short, pa)
    out = {a: []}
    first = gen.step()
    assert [o.request_id for o in first] == [a] and rows == [len(short)]
    out[a] += [o.token for o in first]
    b = gen.add(long, pb)
    out[b] = []
    steps_to_first_b = 0
    while not out[b]:
        got = {o.request_id: o.token for o in gen.step()}
        steps_to_first_b += 1
        assert a in got  # the running request never waits for the prompt
        out[a].append(got[a])
        if b in got:
            out[b].append(got[b])
    assert steps_to_first_b == -(-len(long) // 4) and max(rows[1:]) == 1 + 4
    while gen.active:
        for o in gen.step():
            out[o.request_id].append(o.token)
    assert out[a] == list(engine.generate_ids(short, pa, eos_ids=set()))
    assert out[b] == list(engine.generate_ids(long, pb, eos_ids=set()))


@pytest.mark.parametrize("prefill_chunk", [256, 3, None])
def test_new_request_reuses_the_cached_prefix_of_a_finished_one(engine, prefill_chunk) -> None:
    """A prompt that continues a finished request's text goes to that request's slot and prefills only
    what the cache lacks; its tokens equal a fresh generation's. An unrelated prompt takes the slot
    released longest ago, leaving the useful cache alone."""
    gen = engine.batch_generator(max_batch=2, max_len=96, prefill_chunk=prefill_chunk)
    first = engine.encode("ROMEO: What say you")
    greedy = SamplingParams(max_tokens=6)

    def run(rid: int) -> list[int]:
        toks = []
        while rid in gen.requests:
            toks += [o.token for o in gen.step() if o.request_id == rid]
        return toks

    a = gen.add(first, greedy)
    slot_a = gen.requests[a].slot
    said = run(a)
    assert len(said) == 6
    other = gen.add(engine.encode("KING"), SamplingParams(max_tokens=3))
    assert gen.requests[other].slot != slot_a and gen.cached_prompt_tokens(other) == 0
    follow = first + said + engine.encode(" my lord")
    params = SamplingParams(temperature=0.7, seed=4, max_tokens=7)
    d = gen.add(follow, params)
    assert gen.requests[d].slot == slot_a
    assert gen.cached_prompt_tokens(d) == len(first) + 5  # the last generated token never ran
    got = run(d)
    assert got == list(engine.generate_ids(follow, params, eos_ids=set()))
    run(other)
    again = gen.add(first, greedy)  # the whole prompt is cached: its last token still runs, for the logits
    assert gen.cached_prompt_tokens(again) == len(first) - 1
    assert run(again) == said


@pytest.mark.parametrize("kv", ["f16", "int8"])
@pytest.mark.parametrize("prefill_chunk", [256, None])
def test_new_request_copies_the_prefix_a_running_request_holds(engine, kv, prefill_chunk) -> None:
    """A prompt that starts with what a running request's slot holds gets those rows copied into its own
    slot (keys, values and int8 scales): only the rest is prefilled, and both requests give the tokens
    they give alone."""
    eng = Engine(engine.model, engine.tokenizer, kv_dtype=kv)
    gen = eng.batch_generator(max_batch=2, max_len=96, prefill_chunk=prefill_chunk)
    shared = eng.encode("ROMEO: What say you, my lord? I pray you")
    pa, pb = SamplingParams(max_tokens=12), SamplingParams(temperature=0.8, seed=5, max_tokens=6)
    a = gen.add(shared, pa)
    out = {a: []}
    for _ in range(3):
        out[a] += [o.token for o in gen.step()]
    longer = shared + eng.encode(" and tell me")
    b = gen.add(longer, pb)
    assert gen.cached_prompt_tokens(b) == len(shared) and gen.requests[b].slot != gen.requests[a].slot
    out[b] = []
    while gen.active:
        for o in gen.step():
            out[o.request_id].append(o.token)
    assert out[a] == list(eng.generate_ids(shared, pa, eos_ids=set()))
    assert out[b] == list(eng.generate_ids(longer, pb, eos_ids=set()))


def test_requests_arriving_together_prefill_a_shared_prefix_once(engine, monkeypatch) -> None:
    """Three new prompts with one 40-token prefix: the first prefills it, the others wait a step, copy it
    and run only their own tokens; every request gives the tokens it gives alone, and its first output
    says how many prompt tokens were found in the cache."""
    gen = engine.batch_generator(max_batch=3, max_len=96)
    rows = []
    real = gen.model.run_rows
    monkeypatch.setattr(gen.model, "run_rows", lambda tokens, *a, **k: rows.append(len(tokens)) or real(tokens, *a, **k))
    shared = torch.randint(1, engine.model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [shared + [7], shared + [8, 9], shared + [10, 11, 12]]
    params = [SamplingParams(max_tokens=5), SamplingParams(temperature=0.9, seed=1, max_tokens=4), SamplingParams(max_tokens=3)]
    ids = [gen.add(p, q) for p, q in zip(prompts, params)]
    out = {i: [] for i in ids}
    cached = {}
    while gen.active:
        for o in gen.step():
            out[o.request_id].append(o.token)
            if o.cached_prompt_tokens is not None:
                cached[o.request_id] = o.cached_prompt_tokens
    assert rows[:2] == [41, 1 + 2 + 3]  # step 2: the first request's next token and the others' own tokens
    assert cached == {ids[0]: 0, ids[1]: 40, ids[2]: 40}
    for i, p, q in zip(ids, prompts, params):
        assert out[i] == list(engine.generate_ids(p, q, eos_ids=set()))


def test_request_cancelled_mid_prompt_leaves_a_usable_prefix(engine) -> None:
    """A request cancelled while its prompt is being carried in (3 tokens a step) leaves the prefilled
    part in its slot; the same prompt sent again continues from there and gets a fresh run's tokens."""
    gen = engine.batch_generator(max_batch=1, max_len=96, prefill_chunk=3)
    prompt = engine.encode("What say you, my lord? I pray you, speak")
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=5)
    first = gen.add(prompt, params)
    assert gen.step() == [] and gen.step() == []  # 6 prompt tokens in, no token yet
    gen.cancel(first)
    again = gen.add(prompt, params)
    assert gen.cached_prompt_tokens(again) == 6
    tokens = []
    while gen.active:
        tokens += [o.token for o in gen.step()]
    assert tokens == list(engine.generate_ids(prompt, params, eos_ids=set()))


def test_failed_batch_step_releases_its_requests(engine, monkeypatch) -> None:
    gen = engine.batch_generator(max_batch=2, max_len=64)
    ids = engine.encode("ROMEO:")
    gen.add(ids, SamplingParams(max_tokens=5))
    gen.step()
    gen.add(ids, SamplingParams(max_tokens=5))

    def broken(*args, **kwargs):
        raise RuntimeError("native failure")

    monkeypatch.setattr(gen.model, "run_rows", broken)
    with pytest.raises(RuntimeError, match="native failure"):
        gen.step()
    assert gen.free_slots == 2 and gen.active == 0
    monkeypatch.undo()
    c = gen.add(ids, SamplingParams(max_tokens=5))
    tokens = []
    while gen.active:
        tokens += [o.token for o in gen.step() if o.request_id == c]
    assert tokens == list(engine.generate_ids(ids, SamplingParams(max_tokens=5), eos_ids=set()))


def test_bad_inputs_raise_clear_errors(engine) -> None:
    from bittern.errors import UsageError

    with pytest.raises(UsageError, match="context"):
        list(engine.generate_ids(list(range(1, 300)), SamplingParams()))
    with pytest.raises(UsageError, match="max_tokens"):
        list(engine.generate_ids("hi", SamplingParams(max_tokens=0)))
    with pytest.raises(UsageError, match="UTF-8"):
        engine.encode("bad \udcff byte")
    with pytest.raises(UsageError, match="vocabulary"):
        engine.encode([1, 99999])


def test_perplexity_is_finite_and_consistent(engine) -> None:
    ids = engine.encode(demo_text()[:1500])
    ppl = engine.perplexity(ids, window=64)
    assert 1.0 < ppl < 2 * engine.model.config.vocab_size


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The CLI sets the process's kernel threads (``--threads``); put them back after each test."""
    from bittern.kernels import native

    before = native.get_threads() if native.available() else None
    yield
    if before is not None:
        native.set_threads(before)


def test_cli_generate_streams_and_reports(model_dir, capsys) -> None:
    rc = main(["generate", "--model", str(model_dir), "ROMEO:", "--max-tokens", "8", "--threads", "1", "--seed", "1",
               "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40", "--min-p", "0.05", "--repeat-penalty", "1.1",
               "--stop", "zzzz"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")
    assert "tok/s" in err and "peak RSS" in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/model", "hi"], "no such model directory"),
    (["generate", "MODEL", "hi", "--max-tokens", "0"], "--max-tokens must be a positive"),
    (["generate", "MODEL", "hi", "--max-tokens", "-3"], "--max-tokens must be a positive"),
    (["generate", "MODEL", "bad \udcff prompt"], "not valid UTF-8"),
    (["generate", "MODEL", "LONG"], "context"),
    (["generate", "MODEL", "hi", "--top-p", "0"], "top_p"),
    (["generate", "MODEL", "hi", "--threads", "100000"], "--threads must be between 1 and 256"),
    (["generate", "MODEL", "hi", "--stop", "bad \udcff"], "--stop string is not valid UTF-8"),
    (["generate", "MODEL", "hi", "--ids"], "--ids: give the prompt as comma-separated token ids"),
    (["generate", "MODEL", "hi", "--temperature", "nan"], "temperature"),
    (["chat", "--model", "MODEL", "--system", "bad \udcff"], "--system prompt is not valid UTF-8"),
    (["chat", "--model", "MODEL", "--system", "LONG"], "the system prompt takes"),
    (["model", "create", "--config", "tiny", "--random", "/dev/null/x"], "/dev/null/x"),
])
def test_cli_bad_input_one_line_error(model_dir, capsys, argv, message) -> None:
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    if argv[0] == "generate" and argv[1] == str(model_dir):
        argv = ["generate", "--model", *argv[1:]]
    argv = ["the " * 400 if a == "LONG" else a for a in argv]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "the the" not in out  # nothing generated or echoed


def test_cli_model_create_and_generate_ids(tmp_path, capsys) -> None:
    out_dir = tmp_path / "rand"
    assert main(["model", "create", "--config", "tiny", "--random", str(out_dir), "--layout", "2bit-r4"]) == 0
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["layout"] == "2bit-r4" and meta["model"]["name"] == "tiny"
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "1,2,3", "--max-tokens", "5", "--head", "f32"]) == 0
    out, _ = capsys.readouterr()
    assert len(out.split()) == 5 and all(0 <= int(t) < 512 for t in out.split())
    for flag in ("--mmap", "--no-mmap"):  # weights left in the file mapping or copied: the same greedy tokens
        assert main(["generate", "--model", str(out_dir), "1,2,3", "--max-tokens", "5", "--head", "f32", flag]) == 0
        assert capsys.readouterr()[0] == out
    assert main(["model", "create", "--config", "nope", "--random", str(tmp_path / "x")]) == 2
    assert "unknown config" in capsys.readouterr().err


def test_cli_chat_reset_and_history(model_dir, capsys, monkeypatch) -> None:
    lines = iter(["hello there", "/reset", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc = main(["chat", "--model", str(model_dir), "--max-tokens", "5", "--seed", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "history cleared" in err
    assert err.count("[prefill") == 2


def test_cli_without_model_uses_default_or_says_so(model_dir, capsys, monkeypatch) -> None:
    import bittern.train as train

    monkeypatch.setattr(train, "default_model_path", lambda: None)
    assert main(["generate", "hi"]) == 2
    assert "no model given" in capsys.readouterr().err
    monkeypatch.setattr(train, "default_model_path", lambda: model_dir)
    assert main(["generate", "ROMEO:", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_follow_up_prompt_reuses_the_cached_prefix(model_dir) -> None:
    """A chat turn re-sends the history: only the new tokens are prefilled, and the tokens are unchanged."""
    warm = Engine.load(model_dir, head="f32", kv_dtype="f32")
    first = list(range(5, 30))
    p = SamplingParams(max_tokens=12)
    reply = list(warm.generate_ids(first, p, eos_ids=set()))
    assert warm.last_stats.reused_tokens == 0
    follow = first + reply + [7, 8, 9, 10]
    again = list(warm.generate_ids(follow, p, eos_ids=set()))
    # every token fed back through decode is reused (the last sampled reply token never was)
    assert warm.last_stats.reused_tokens == len(first) + len(reply) - 1
    cold = Engine.load(model_dir, head="f32", kv_dtype="f32")
    assert again == list(cold.generate_ids(follow, p, eos_ids=set()))
    assert cold.last_stats.reused_tokens == 0
    # a diverging prompt reuses only the common prefix; an interrupted generation keeps what is complete
    it = warm.generate_ids(first[:10] + [99, 98], p, eos_ids=set())
    next(it), next(it)
    it.close()
    assert warm.last_stats.reused_tokens == 10
    assert list(warm.generate_ids(first[:10] + [99, 98, 97], p, eos_ids=set())) == list(
        cold.generate_ids(first[:10] + [99, 98, 97], p, eos_ids=set()))
    assert warm.last_stats.reused_tokens == 12


def test_cli_chat_second_turn_reuses_the_history(model_dir, capsys, monkeypatch) -> None:
    lines = iter(["hello there", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "5", "--seed", "2"]) == 0
    err = capsys.readouterr().err
    reports = [line for line in err.splitlines() if line.startswith("[prefill")]
    assert len(reports) == 2 and "reused from the cache" not in reports[0] and "reused from the cache" in reports[1]


def test_generate_batch_stops_at_stop_strings_while_decoding(engine) -> None:
    """generate_batch stops a request at its stop string as generate does (same text, ids and reason,
    not max_tokens decoded and cut afterwards), and fills each result's stats."""
    greedy = SamplingParams(max_tokens=40)
    full = engine.generate("the", greedy)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop) == 3
    params = SamplingParams(max_tokens=40, stop=[stop])
    alone = engine.generate("the", params)
    batch = engine.generate_batch(["the", "ROMEO:"], [params, greedy])
    assert (batch[0].text, batch[0].token_ids, batch[0].finish_reason) == (alone.text, alone.token_ids, "stop")
    assert len(batch[0].token_ids) < 40
    assert batch[1].token_ids == engine.generate("ROMEO:", greedy).token_ids
    for result, prompt in zip(batch, ["the", "ROMEO:"]):
        st = result.stats
        assert st.prompt_tokens == len(engine.encode(prompt)) and st.generated_tokens >= len(result.token_ids) > 0
        assert st.prefill_seconds > 0 and st.decode_seconds >= 0


def test_batch_and_single_generation_both_run_to_the_end_of_the_context(engine) -> None:
    ids = engine.encode("the")[:1]
    params = SamplingParams(max_tokens=10_000)
    alone = list(engine.generate_ids(ids, params, eos_ids=set()))
    gen = engine.batch_generator(max_batch=1)
    rid = gen.add(ids, params, set())
    batched = []
    while gen.active:
        batched += [o.token for o in gen.step() if o.request_id == rid]
    assert len(alone) == engine.context and batched == alone


def test_sampling_params_take_one_stop_string_and_refuse_non_finite_values() -> None:
    assert SamplingParams(stop="ab").stop == ["ab"]
    for bad in (dict(temperature=float("nan")), dict(repetition_penalty=float("nan")), dict(repetition_penalty=float("inf")),
                dict(seed=1 << 64), dict(seed=-(1 << 63) - 1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
    SamplingParams(seed=(1 << 64) - 1).validate()


def test_engine_api_refuses_bad_options_at_load(model_dir, engine) -> None:
    with pytest.raises(ValueError, match="KV-cache dtype"):
        Engine.load(model_dir, kv_dtype="bogus")
    with pytest.raises(ValueError, match="threads"):
        Engine.load(model_dir, threads=100_000)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        engine.perplexity([1])


def test_cli_stop_string_escapes_and_chat_skips_undecodable_lines(model_dir, capsys, monkeypatch) -> None:
    """``--stop "\\n"`` (a shell user's newline) stops at a newline; a chat line that is not UTF-8 is
    refused with a notice and the session goes on; a reply keeps room in the context."""
    from bittern.commands.generate import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\\n") == "a\\n" and unescape(r"\q") == r"\q"
    base = ["generate", "KING HENRY:", "--max-tokens", "40"]  # the shipped model writes verse, with blank lines
    assert main(base) == 0
    full = capsys.readouterr().out
    assert "\n\n" in full[len("KING HENRY:"):].rstrip("\n"), "greedy text has no blank line to stop at"
    assert main(base + ["--stop", r"\n\n"]) == 0
    cut = capsys.readouterr().out
    assert cut == full[: full.index("\n\n", len("KING HENRY:"))] + "\n"
    lines = iter(["hello", "bad \udcff line", "again " * 20, "more " * 20, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "100", "--seed", "2", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "not valid UTF-8; not sent" in err and err.count("[prefill") == 3
    prompts = [int(line.split("[prefill ")[1].split()[0]) for line in err.splitlines() if "[prefill" in line]
    assert all(n <= 256 - 100 for n in prompts), prompts  # old turns were left out to keep 100 tokens free


def test_cli_output_into_a_closed_pipe_ends_quietly(model_dir) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "bittern", "generate", "--model", str(model_dir), "ROMEO:",
                             "--max-tokens", "200", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(3)
    proc.stdout.close()  # as `| head -c 3` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err
