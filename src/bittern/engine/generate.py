"""Generation on the engine: one sequence (streaming), many at once, and a continuous-batching generator.

:class:`Engine` couples an :class:`~bittern.engine.model.EngineModel` with a tokenizer and offers
``generate`` / ``stream`` (text), ``generate_ids`` (token ids) and ``generate_batch`` (many prompts,
decode steps for the whole batch through one GEMM per layer). :class:`EngineBatchGenerator` offers the
same ``add`` / ``step`` / ``cancel`` interface as :class:`bittern.batching.BatchGenerator`, so the
server can run on the engine.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..batching import BatchGenerator, SeenTokens
from ..errors import UsageError
from ..prefix_store import PrefixStore
from ..sampling import SamplingParams, make_generator, sample_next
from .kvcache import KV_DTYPES, EngineKVCache
from .model import EngineModel


#: prompt tokens a batched step carries along with the running requests' rows (the GEMM is near its
#: best speed from ~128 rows; a step of 256 prompt rows takes ~1.5 s at 2B4T shape on two threads)
DEFAULT_PREFILL_CHUNK = 256


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: the most threads the kernels' pool runs
MAX_THREADS = 256


def set_threads(n: int | None) -> int:
    """Use ``n`` CPU threads for kernels and torch ops (None or 0: all cores); returns the number in use."""
    n = n or os.cpu_count() or 1
    if not 0 < n <= MAX_THREADS:
        raise ValueError(f"threads must be between 1 and {MAX_THREADS} (got {n})")
    torch.set_num_threads(n)
    try:
        from ..kernels import native  # type: ignore[attr-defined]

        if hasattr(native, "set_threads"):
            native.set_threads(n)
    except ImportError:
        pass
    return n


@dataclass
class GenerationStats:
    """Timings of one generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    reused_tokens: int = 0
    """Prompt tokens whose keys and values were still in the cache from the previous call (not recomputed)."""

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens run through the model per second (reused ones excluded)."""
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second after the first (each costs one decode step)."""
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class GenerationResult:
    """What :meth:`Engine.generate` returns."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class _TextStream:
    """Incremental detokenisation with stop strings: emits only text that is final."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        self.text = text
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        text = self.text
        limit = len(text)
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                limit = min(limit, cut)
                self.stopped = True
        if not self.stopped and not final:
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        limit = min(limit, len(text) - n)
                        break
        out = text[self.emitted : limit] if limit > self.emitted else ""
        self.emitted = max(self.emitted, limit)
        return out

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.text = self.tok.decode(self.ids)
        return self._release(final=True)


class Engine:
    """Fast generation from a packed model on CPU."""

    def __init__(self, model: EngineModel, tokenizer: Any | None = None, kv_dtype: str = "f16") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kv_dtype = kv_dtype
        self.last_stats = GenerationStats()
        self._cache: EngineKVCache | None = None
        self._cached: list[int] = []  # ids whose keys/values fill positions 0.. of the single-sequence cache

    @classmethod
    def load(cls, path: str | os.PathLike, head: str = "auto", kv_dtype: str = "f16", threads: int | None = None,
             backend: str | None = None, mmap_weights: bool | None = None) -> "Engine":
        """Open a packed model directory with its tokenizer when it has one (``mmap_weights``: see
        :meth:`EngineModel.load`)."""
        from pathlib import Path

        from ..modelfile import read_config

        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV-cache dtype {kv_dtype!r}; choose one of {sorted(KV_DTYPES)}")
        if threads is not None:
            set_threads(threads)
        model = EngineModel.load(path, head=head, backend=backend, mmap_weights=mmap_weights)
        tokenizer = None
        meta = read_config(path)
        if meta.get("tokenizer"):
            from ..tokenizer import load_tokenizer

            tokenizer = load_tokenizer(Path(path) / meta["tokenizer"])
        return cls(model, tokenizer, kv_dtype)

    # ------------------------------------------------------------------ helpers

    @property
    def context(self) -> int:
        """The model's context length in tokens."""
        return self.model.config.max_seq_len

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text needs a tokenizer; ids are checked against the vocabulary)."""
        if isinstance(prompt, (bytes, bytearray)):
            try:
                prompt = bytes(prompt).decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"the prompt is not valid UTF-8 ({e})") from None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError("this model has no tokenizer: pass token ids instead of text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UsageError(f"the prompt is not valid UTF-8 ({e.reason} at position {e.start})") from None
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise UsageError("the prompt is empty: give at least one token")
        V = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{V - 1})")
        return ids

    def check_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids of ``prompt`` after checking it and ``params`` (clear :class:`UsageError` otherwise)."""
        ids = self.encode(prompt)
        self._check(ids, params)
        return ids

    def _check(self, ids: list[int], params: SamplingParams) -> None:
        try:
            params.validate()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if len(ids) >= self.context:
            raise UsageError(f"the prompt has {len(ids)} tokens but the model's context is {self.context} "
                             f"(at most {self.context - 1} prompt tokens)")

    def eos_ids(self) -> set[int]:
        """End-of-sequence ids of the tokenizer (empty without one)."""
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            return {self.tokenizer.eos_id}
        return set()

    def _get_cache(self) -> EngineKVCache:
        """The single-sequence cache, sized to the whole context (its pages become resident only as they fill)."""
        c = self._cache
        if c is None or c.dtype_name != self.kv_dtype:
            c = self._cache = self.model.new_cache(1, self.context, self.kv_dtype)
            self._cached = []
        return c

    def reset_cache(self) -> None:
        """Forget the cached prefix (the next call prefills its whole prompt)."""
        self._cached = []

    # ------------------------------------------------------------------ single sequence

    def generate_ids(self, prompt: str | list[int], params: SamplingParams | None = None,
                     eos_ids: set[int] | None = None) -> Iterator[int]:
        """Yield new token ids after ``prompt`` until max tokens, an EOS id or the end of the context."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self._check(ids, params)
        eos = self.eos_ids() if eos_ids is None else set(eos_ids)
        return self._generate(ids, params, eos)

    def _generate(self, ids: list[int], params: SamplingParams, eos: set[int]) -> Iterator[int]:
        """Prefill (reusing the longest prefix still cached from the previous call, as a chat needs), then decode."""
        length = min(self.context, len(ids) + params.max_tokens)
        cache = self._get_cache()
        reuse = 0
        for a, b in zip(self._cached, ids[:-1]):  # at least the last prompt token is run, for its logits
            if a != b:
                break
            reuse += 1
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids), reused_tokens=reuse)
        generator = make_generator(params.seed)
        penalty = params.repetition_penalty != 1.0
        seen = SeenTokens(ids, params.max_tokens) if penalty else None
        self._cached = cached = ids[:reuse]  # stays valid if the prefill is interrupted
        t0 = time.perf_counter()
        logits = self.model.prefill(ids[reuse:], cache, 0, reuse)
        stats.prefill_seconds = time.perf_counter() - t0
        cached.extend(ids[reuse:])
        pos = len(ids)
        slots = [0]
        t1 = time.perf_counter()
        for n in range(params.max_tokens):
            token = int(sample_next(logits, params, generator, seen.view() if seen else None)[0])
            stats.generated_tokens = n + 1
            stats.decode_seconds = time.perf_counter() - t1
            yield token
            if token in eos or pos >= length or n + 1 >= params.max_tokens:
                return
            if seen is not None:
                seen.add(token)
            if n == 0:
                t1 = time.perf_counter()
            logits = self.model.decode([token], cache, slots, [pos])
            cached.append(token)  # only once its keys/values are complete in every layer
            pos += 1

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield pieces of generated text as they become final (stop strings and EOS honoured)."""
        if self.tokenizer is None:
            raise UsageError("this model has no tokenizer: use generate_ids")
        params = params or SamplingParams()
        text = _TextStream(self.tokenizer, params.stop)
        it = self.generate_ids(self.check_prompt(prompt, params), params)
        try:
            for token in it:
                if token in self.eos_ids():
                    break
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    break
            tail = text.finish()
            if tail:
                yield tail
        finally:
            if hasattr(it, "close"):
                it.close()

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> GenerationResult:
        """Generate a whole continuation: text (with a tokenizer), ids, finish reason and timings."""
        params = params or SamplingParams()
        ids: list[int] = []
        eos = self.eos_ids()
        reason = "length"
        stream = _TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        for token in self.generate_ids(prompt, params, eos):
            if token in eos:
                reason = "stop"
                break
            ids.append(token)
            if stream is not None:
                stream.push(token)
                if stream.stopped:
                    reason = "stop"
                    break
        text = ""
        if stream is not None:
            stream.finish()
            text = stream.text[: stream.emitted] if stream.stopped else stream.text
        return GenerationResult(text, ids, reason, self.last_stats)

    # ------------------------------------------------------------------ many sequences

    def batch_generator(self, max_batch: int = 8, max_len: int | None = None,
                        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                        prefix_store_bytes: int = 0) -> "EngineBatchGenerator":
        """A continuous-batching generator (``add`` / ``step`` / ``cancel``) over this engine; each step
        carries up to ``prefill_chunk`` prompt tokens of new requests with the running requests' rows
        (None: whole prompts, in a pass before the step's). ``prefix_store_bytes``: host memory for the
        keys and values of prompts whose slots were reused (:class:`bittern.prefix_store.PrefixStore`;
        0: none)."""
        return EngineBatchGenerator(self, max_batch, max_len, prefill_chunk, prefix_store_bytes)

    def generate_batch(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                       ) -> list[GenerationResult]:
        """Generate for many prompts at once; each decode step runs the whole batch through one GEMM per layer."""
        if not prompts:
            return []
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams per prompt (or one for all)")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, plist):
            self._check(ids, p)
        longest = max(len(ids) + p.max_tokens for ids, p in zip(encoded, plist))
        gen = self.batch_generator(len(prompts), min(self.context, longest + 1))
        eos = self.eos_ids()
        t0 = time.perf_counter()
        rid = [gen.add(ids, p, eos) for ids, p in zip(encoded, plist)]
        out: dict[int, list[int]] = {r: [] for r in rid}
        reasons: dict[int, str] = {}
        stats = {r: GenerationStats(prompt_tokens=len(ids)) for r, ids in zip(rid, encoded)}
        first: dict[int, float] = {}
        texts = {r: _TextStream(self.tokenizer, p.stop) for r, p in zip(rid, plist)} if self.tokenizer is not None else {}
        while gen.active:
            outputs = gen.step()
            now = time.perf_counter()
            for o in outputs:
                r = o.request_id
                st = stats[r]
                st.generated_tokens += 1
                if r not in first:
                    first[r] = now
                    st.prefill_seconds = now - t0
                    st.reused_tokens = o.cached_prompt_tokens or 0
                st.decode_seconds = now - first[r]
                if o.finished and o.finish_reason == "stop" and o.token in eos:
                    reasons[r] = "stop"
                    continue
                out[r].append(o.token)
                if o.finished:
                    reasons[r] = o.finish_reason or "length"
                if r in texts:
                    texts[r].push(o.token)
                    if texts[r].stopped and not o.finished:  # a stop string: this request is done
                        gen.cancel(r)
                        reasons[r] = "stop"
        results = []
        for r in rid:
            text = ""
            if r in texts:
                stream = texts[r]
                stream.finish()
                text = stream.text[: stream.emitted] if stream.stopped else stream.text
                if stream.stopped:
                    reasons[r] = "stop"
            results.append(GenerationResult(text, out[r], reasons.get(r, "length"), stats[r]))
        return results

    # ------------------------------------------------------------------ scoring

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits ``[T, vocab]`` for every position of ``ids`` (one prefill)."""
        cache = self.model.new_cache(1, len(ids), self.kv_dtype)
        return self.model.prefill(ids, cache, 0, 0, all_logits=True).clone()

    def perplexity(self, ids: list[int], window: int | None = None) -> float:
        """Perplexity of ``ids`` in consecutive windows of ``window`` tokens (default: the context)."""
        if len(ids) < 2:
            raise ValueError(f"perplexity needs at least 2 tokens (got {len(ids)})")
        window = min(window or self.context, self.context)
        total, count = 0.0, 0
        for a in range(0, len(ids) - 1, window):
            chunk = ids[a : a + window + 1]
            if len(chunk) < 2:
                break
            logits = self.logits(chunk[:-1])
            target = torch.tensor(chunk[1:])
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(chunk) - 1
        return float(torch.exp(torch.tensor(total / count)))


class EngineBatchGenerator(BatchGenerator):
    """Continuous batching on the engine: :class:`bittern.batching.BatchGenerator` over the engine's model."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, prefix_store_bytes: int = 0) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 (or None)")
        if prefix_store_bytes < 0:
            raise ValueError(f"prefix_store_bytes must be >= 0 (got {prefix_store_bytes})")
        self.engine = engine
        super().__init__(engine.model, max_batch, max_len)
        self.prefill_chunk = prefill_chunk if engine.model.use_fast_path else None
        self.reuse_prefix = engine.model.use_fast_path  # there a cached key is the same bits whichever pass made it
        if self.reuse_prefix and prefix_store_bytes > 0:
            self.prefix_store = PrefixStore(prefix_store_bytes)

    def _new_cache(self) -> Any:
        return self.model.new_cache(self.max_batch, self.max_len, self.engine.kv_dtype)

    def _prefill_many(self, prompts: list[list[int]], slots: list[int], starts: list[int]) -> torch.Tensor:
        return self.model.prefill_batch(prompts, self.cache, slots, starts)

    def _forward_rows(self, tokens: list[int], slots: list[int], positions: list[int], logit_rows: list[int]) -> torch.Tensor:
        return self.model.run_rows(tokens, self.cache, slots, positions, logit_rows)

    def _decode(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        return self.model.decode(tokens, self.cache, slots, positions)
