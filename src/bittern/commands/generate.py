"""``bittern generate``, ``bittern chat`` and ``bittern model create``: the inference engine from the shell."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import UsageError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="packed model directory (default: the model shipped with bittern, if any)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, 1 to 256 (default: all cores)")
    p.add_argument("--head", default="auto", choices=["auto", "int8", "int6", "int5", "bf16", "f16", "f32"],
                   help="LM head / tied embedding precision in memory (default auto: int6 with per-row scales "
                        "when the hidden size is a multiple of 128, else int8)")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="--mmap keeps the ternary weights in the file mapping; --no-mmap copies them into memory "
                        "on huge pages (faster decode); default: copy when they take at most half the free memory")
    p.add_argument("--kv", default="f16", choices=["f16", "bf16", "f32", "int8"], help="KV-cache precision (default: f16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible sampling)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); \\n, \\t, \\r and \\\\ are read as escapes, as llama.cpp does")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a packed model (streams; prints speed and memory)")
    p.add_argument("prompt", help="the prompt text ('-' reads it from standard input)")
    _add_engine_args(p)
    p.add_argument("--ids", action="store_true", help="the prompt is comma-separated token ids (models without tokenizer)")
    p.set_defaults(handler=run_generate)

    c = sub.add_parser("chat", help="interactive chat with a packed model (/reset, /exit; Ctrl-C stops a reply)")
    _add_engine_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(handler=run_chat)

    m = sub.add_parser("model", help="model files: create random-weight models for benchmarks")
    msub = m.add_subparsers(dest="model_command", metavar="ACTION")
    mc = msub.add_parser("create", help="write a random-weight packed model of a named shape (streaming)")
    mc.add_argument("--config", required=True, help="named shape from bittern.configs.CONFIGS (e.g. 2B4T, 70B)")
    mc.add_argument("--random", required=True, metavar="OUT", help="output model directory")
    mc.add_argument("--layout", default="1.67bit-lut",
                    help="packed layout: 1.67bit-lut (default: lookup-table GEMV, the fastest decode), 2bit-r4 "
                         "(fastest prefill) or 1.6bit-r4 (smallest)")
    mc.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="float tensors' dtype")
    mc.add_argument("--seed", type=int, default=0, help="random seed")
    mc.add_argument("--max-seq-len", type=int, default=None, help="override the context length")
    mc.set_defaults(handler=run_model_create)
    m.set_defaults(handler=lambda args: _model_help(m))


def _model_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def resolve_model(path: str | None) -> Path:
    """The model directory to use: ``path``, else the default model when bittern ships one."""
    if path:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{p}: no such model directory")
        return p
    try:
        from ..train import default_model_path  # type: ignore[attr-defined]
    except ImportError:
        default_model_path = None
    found = default_model_path() if default_model_path is not None else None
    if found is None:
        raise UsageError("no model given and no default model installed: pass --model DIR "
                         "(make one with `bittern demo --out DIR` or `bittern model create`)")
    return Path(found)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    """``text`` with the backslash escapes a shell user types for control characters (``\\n``, ``\\t``,
    ``\\r``, ``\\\\``, ``\\0``, quotes) replaced; any other backslash is kept."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid UTF-8 (undecodable byte at position {e.start})") from None


def _params(args: argparse.Namespace, default_temperature: float):
    from ..sampling import SamplingParams

    for stop in args.stop:
        _check_utf8(stop, "a --stop string")
    if args.max_tokens <= 0:
        raise UsageError(f"--max-tokens must be a positive number of tokens (got {args.max_tokens})")
    params = SamplingParams(temperature=default_temperature if args.temperature is None else args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repeat_penalty, seed=args.seed, max_tokens=args.max_tokens,
                            stop=[unescape(stop) for stop in args.stop])
    try:
        return params.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _load(args: argparse.Namespace):
    from ..engine import Engine

    from ..engine.generate import MAX_THREADS

    if args.threads is not None and not 0 < args.threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS} (got {args.threads})")
    return Engine.load(resolve_model(args.model), head=args.head, kv_dtype=args.kv, threads=args.threads,
                       mmap_weights=args.mmap)


def _report(engine) -> None:
    from ..engine import peak_rss_bytes

    file = sys.stderr
    st = engine.last_stats
    if not st.generated_tokens:  # interrupted while the prompt was running
        print(f"\n[stopped before the first token | peak RSS {peak_rss_bytes() / 2**20:.0f} MiB]", file=file)
        return
    reused = f" ({st.reused_tokens} reused from the cache)" if st.reused_tokens else ""
    # the first token comes from the prefill's logits: a decode rate needs at least two
    rate = f", {st.decode_tok_s:.1f} tok/s" if st.generated_tokens > 1 else ""
    print(f"\n[prefill {st.prompt_tokens} tok{reused}, {st.prefill_tok_s:.1f} tok/s | decode {st.generated_tokens} tok"
          f"{rate} | peak RSS {peak_rss_bytes() / 2**20:.0f} MiB]", file=file)


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"the prompt on standard input is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    else:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"the prompt is not valid UTF-8 (undecodable byte at position {e.start})") from None
    params = _params(args, 0.0)
    engine = _load(args)
    if args.ids or engine.tokenizer is None:
        try:
            ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise UsageError("--ids: give the prompt as comma-separated token ids" if args.ids else
                             "this model has no tokenizer: give the prompt as comma-separated token ids") from None
        out = sys.stdout
        try:
            for token in engine.generate_ids(engine.check_prompt(ids, params), params):
                out.write(f"{token} ")
                out.flush()
        except KeyboardInterrupt:
            out.write("[stopped]")
        out.write("\n")
    else:
        ids = engine.check_prompt(prompt, params)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        try:
            for piece in engine.stream(ids, params):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n[stopped]")
        sys.stdout.write("\n")
    _report(engine)
    return 0


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[str]]:
    """Prompt text for ``messages`` (the tokenizer's chat template when it has one) and extra stop strings."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                    bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
            return text, []
        except Exception as e:  # a broken template: say so and fall back to plain text
            print(f"(chat template unusable: {e}; using a plain format)", file=sys.stderr)
    lines = []
    for m in messages:
        lines.append(f"{m['role'].capitalize()}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:", ["\nUser:", "\nSystem:"]


def run_chat(args: argparse.Namespace) -> int:
    params = _params(args, 0.7)
    if args.system:
        _check_utf8(args.system, "the --system prompt")
    engine = _load(args)
    if engine.tokenizer is None:
        raise UsageError("this model has no tokenizer, so it cannot chat")
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
        n = len(engine.tokenizer.encode(render_chat(engine.tokenizer, history + [{"role": "user", "content": ""}])[0]))
        if n >= engine.context:
            raise UsageError(f"the system prompt takes {n} tokens; the model's context is {engine.context}")
    base = list(history)
    # what a reply may always use: old turns are left out to keep this much of the context free
    reply_room = max(1, min(params.max_tokens, engine.context // 2))
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print("bittern chat: /reset clears the history, /exit quits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            print("(that line is not valid UTF-8; not sent)", file=sys.stderr)
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        text, stops = render_chat(engine.tokenizer, history)
        turn = params.__class__(**{**params.__dict__, "stop": list(params.stop) + stops})
        ids = engine.tokenizer.encode(text)
        room = engine.context - reply_room
        while len(ids) > room and len(history) > len(base) + 1:  # drop the oldest turns that do not fit
            history.pop(len(base))
            text, stops = render_chat(engine.tokenizer, history)
            ids = engine.tokenizer.encode(text)
        if len(ids) >= engine.context:
            history.pop()
            print(f"(message too long: {len(ids)} tokens; the context is {engine.context})", file=sys.stderr)
            continue
        turn.max_tokens = max(1, min(turn.max_tokens, engine.context - len(ids)))
        reply = []
        try:
            for piece in engine.stream(ids, turn):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})
        _report(engine)


#: the longest context ``model create`` writes (the RoPE tables alone take 1 KB per position at head size 128)
MAX_CONTEXT = 1 << 20


def _count(n: float) -> str:
    """``n`` with a k / M / G suffix: 1.90M, 2.41G."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def run_model_create(args: argparse.Namespace) -> int:
    from ..configs import get_config
    from ..engine.create import create_random_model

    try:
        cfg = get_config(args.config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.max_seq_len is not None:
        if not 0 < args.max_seq_len <= MAX_CONTEXT:
            raise UsageError(f"--max-seq-len must be between 1 and {MAX_CONTEXT} (got {args.max_seq_len})")
        cfg = cfg.replace(max_seq_len=args.max_seq_len)
    from ..pack import get_layout

    lay = get_layout(args.layout)
    out = Path(args.random)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)  # fails here, in one line, when it cannot be made
    est = cfg.num_linear_params() * lay.bits_per_weight / 8 + cfg.num_embedding_params() * 2
    print(f"writing random {cfg.name} model ({_count(cfg.num_params())} params, ~{_count(est)}B) to {out}", file=sys.stderr)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done / total - last[0] >= 0.05 or done == total:
            last[0] = done / total
            print(f"\r  {100 * done / total:5.1f}%", end="", file=sys.stderr, flush=True)

    create_random_model(args.random, cfg, layout=args.layout, dtype=args.dtype, seed=args.seed, progress=progress)
    print(f"\nwrote {args.random}", file=sys.stderr)
    return 0
