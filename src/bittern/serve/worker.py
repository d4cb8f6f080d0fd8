"""The generation worker: one background thread drives a continuous-batching engine for all requests.

Requests become :class:`Job` objects (one per returned choice). :meth:`GenerationWorker.submit` puts
them in a bounded waiting queue (:class:`QueueFull` when it is full); between decode steps the worker
thread cancels jobs whose clients went away or whose time ran out, admits waiting jobs into free KV
cache slots and prefills their prompts together where the engine prefills whole prompts
(``prefill_pending``; the fast engine instead carries them in its steps' passes), then runs one
:meth:`Engine.step` that advances every active job by one token in a single batched forward pass. Text deltas and the final result go back to the asyncio side
through each job's :class:`asyncio.Queue` (``loop.call_soon_threadsafe``); the jobs of one request
may share a queue, their events tagged with the job's ``index``.

The engine is anything with the :class:`Engine` interface: :class:`bittern.batching.BatchGenerator`
(the reference) or a faster engine with the same ``add/step/cancel``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from ..sampling import SamplingParams
from .detokenize import Decoder, IncrementalDecoder
from .metrics import Metrics

log = logging.getLogger("bittern.serve")


class StepResult(Protocol):
    """One token an engine produced for one request."""

    request_id: int
    token: int
    finished: bool
    finish_reason: str | None


class Engine(Protocol):
    """A continuous-batching generator: requests join with :meth:`add`, advance together in :meth:`step`.

    An engine may also have ``prefill_pending()`` (prefill every request added since its last call, in
    one pass); the worker calls it after admitting jobs, so a failure there reaches only those jobs. A
    step result may carry ``cached_prompt_tokens`` with a request's first token (reported in usage).
    """

    max_len: int

    @property
    def free_slots(self) -> int: ...

    @property
    def active(self) -> int: ...

    def add(self, prompt: list[int], params: SamplingParams, eos_ids: set[int] | None = None, user_data: Any = None) -> int: ...

    def step(self) -> Sequence[StepResult]: ...

    def cancel(self, request_id: int) -> None: ...


class QueueFull(Exception):
    """The waiting queue cannot take these jobs now (answer 429)."""


@dataclass
class Event:
    """A message from the worker to a request handler."""

    kind: str  # "delta" (text), "done" (finish_reason, token counts) or "error" (status, message)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    index: int = 0  # the job's choice index within its request
    #: with logprobs asked for: the tokens whose text this event completes, each
    #: ``(token text, log-probability, [(alternative text, log-probability), ...], offset in the text)``
    logprobs: list[tuple[str, float, list[tuple[str, float]], int]] | None = None


@dataclass(eq=False)
class Job:
    """One sequence to generate (one choice of one request)."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    eos_ids: set[int] = field(default_factory=set)
    stop: list[str] = field(default_factory=list)
    timeout_s: float = 600.0
    index: int = 0
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    engine_id: int | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine found in its KV cache
    closed: bool = False
    decoder: IncrementalDecoder | None = None
    #: logprobs not yet sent: (number of decoder ids up to the token, log-probability, alternatives)
    pending_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    text_len: int = 0  # length of the text of the tokens whose logprobs were sent

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the handler's event loop now (callable from any thread)."""
        _deliver(self.loop, [(self, event)])


def _put_all(items: list[tuple[Job, Event]]) -> None:
    for job, event in items:
        event.index = job.index
        job.queue.put_nowait(event)


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[Job, Event]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


class GenerationWorker:
    """Owns an engine and the thread that drives it; the only code that touches the engine."""

    def __init__(self, engine: Engine, tokenizer: Decoder, max_queue: int = 64, metrics: Metrics | None = None) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._cancels: list[Job] = []
        self._running: dict[int, Job] = {}
        self._outbox: list[tuple[Job, Event]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active = 0
        self.free_slots = engine.free_slots
        self.capacity = engine.free_slots

    # ------------------------------------------------------------------ called from request handlers

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a KV-cache slot."""
        return len(self._pending)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (all or none); raise :class:`QueueFull` when they do not fit."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue + self.free_slots:
                self.metrics.add(rejected_queue_full=1)
                raise QueueFull(f"the server is busy: {len(self._pending)} requests are waiting for a slot "
                                f"(queue limit {self.max_queue}); retry later")
            self._pending.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (its client went away): drop it from the queue or free its slot."""
        with self._cond:
            if job.closed:
                return
            job.closed = True
            self.metrics.add(cancelled=1)
            try:
                self._pending.remove(job)
            except ValueError:
                self._cancels.append(job)
            self._cond.notify()

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="bittern-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; waiting and running jobs end with a 503 error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._cancels or self._running):
                    self._cond.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
            for job in cancels:
                self._drop(job)
            with self._cond:
                admit = [self._pending.popleft() for _ in range(min(self.engine.free_slots, len(self._pending)))]
                # what submit() compares the queue with: the admitted jobs hold their slots from now on (it
                # read a count from before they left the queue until this iteration ended, and let the
                # queue overfill by up to the batch size)
                self.free_slots = self.engine.free_slots - len(admit)
            for job in admit:
                self._admit(job)
            if admit:
                self._prefill([job for job in admit if job.engine_id in self._running])
            self._expire()
            if self._running:
                self._step()
            self._flush()
            self.active = self.engine.active
            self.free_slots = self.engine.free_slots
        self._shutdown()

    def _send(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Deliver this iteration's events: one wake-up per event loop, not one per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox = []
        for loop, items in by_loop.items():
            _deliver(loop, items)

    def _drop(self, job: Job) -> None:
        if job.engine_id is not None and self._running.pop(job.engine_id, None) is not None:
            self.engine.cancel(job.engine_id)

    def _admit(self, job: Job) -> None:
        if job.closed:
            return
        if time.monotonic() - job.submitted > job.timeout_s:
            self._timeout(job)
            return
        try:
            job.engine_id = self.engine.add(job.prompt, job.params, job.eos_ids, user_data=job)
        except ValueError as e:
            job.closed = True
            self._send(job, Event("error", status=400, error_type="invalid_request_error", text=str(e)))
            return
        except Exception as e:  # an engine failure must not take the worker down
            log.exception("prefill failed")
            job.closed = True
            self._send(job, Event("error", status=500, text=f"prefill failed: {e}"))
            return
        job.decoder = IncrementalDecoder(self.tokenizer, job.stop)
        self._running[job.engine_id] = job
        self.metrics.add(prompt_tokens=len(job.prompt))

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill the jobs just admitted, together (engines without ``prefill_pending`` prefill in ``add``)."""
        prefill = getattr(self.engine, "prefill_pending", None)
        if not jobs or prefill is None:
            return
        try:
            prefill()
        except Exception as e:  # the engine has released these jobs' slots; the others go on
            log.exception("prefill failed")
            for job in jobs:
                self._running.pop(job.engine_id, None)
                job.closed = True
                self._send(job, Event("error", status=500, text=f"prefill failed: {e}"))

    def _timeout(self, job: Job) -> None:
        self._drop(job)
        job.closed = True
        self.metrics.add(timed_out=1)
        self._send(job, Event("error", status=504, error_type="timeout",
                       text=f"the request did not finish within the server's timeout of {job.timeout_s:g} s"))

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._running.values() if now - j.submitted > j.timeout_s]:
            self._timeout(job)
        with self._cond:
            late = [j for j in self._pending if now - j.submitted > j.timeout_s]
            for job in late:
                self._pending.remove(job)
        for job in late:
            self._timeout(job)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("decode step failed")
            for job in list(self._running.values()):
                self._drop(job)
                job.closed = True
                self._send(job, Event("error", status=500, text=f"decode step failed: {e}"))
            return
        self.metrics.record_step(len(outputs))
        for out in outputs:
            job = self._running.get(out.request_id)
            if job is None or job.closed:
                continue
            job.completion_tokens += 1
            cached = getattr(out, "cached_prompt_tokens", None)
            if cached:  # with the first token: the prompt tokens the engine found in its cache
                job.cached_tokens = cached
                self.metrics.add(prompt_tokens_cached=cached)
            text = job.decoder.push(out.token)
            if getattr(out, "logprob", None) is not None and out.token not in job.eos_ids:
                job.pending_logprobs.append((len(job.decoder.ids), out.logprob, out.top_logprobs or []))
            reason = None
            if job.decoder.stopped:
                reason = "stop"
                if not out.finished:
                    self.engine.cancel(out.request_id)
            elif out.finished:
                text += job.decoder.flush()
                reason = out.finish_reason or "stop"
            logprobs = self._released_logprobs(job) if job.params.logprobs is not None else None
            if text or logprobs:
                self._send(job, Event("delta", text=text, completion_tokens=job.completion_tokens, logprobs=logprobs))
            if reason is not None:
                self._running.pop(out.request_id, None)
                job.closed = True
                self._send(job, Event("done", finish_reason=reason, prompt_tokens=len(job.prompt),
                               completion_tokens=job.completion_tokens))

    def _released_logprobs(self, job: Job) -> list[tuple[str, float, list[tuple[str, float]], int]]:
        """The pending tokens' logprobs whose text has been sent (a token held back, or cut by a stop
        string, is not reported until, or unless, its text is)."""
        out = []
        decoder = job.decoder
        while job.pending_logprobs:
            n, logprob, top = job.pending_logprobs[0]
            end = len(self.tokenizer.decode(decoder.ids[:n]))
            if end > decoder.sent:
                break
            job.pending_logprobs.pop(0)
            token = self.tokenizer.decode(decoder.ids[n - 1 : n])
            out.append((token, logprob, [(self.tokenizer.decode([t]), lp) for t, lp in top], job.text_len))
            job.text_len = end
        return out

    def _shutdown(self) -> None:
        with self._cond:
            left = list(self._pending) + list(self._running.values())
            self._pending.clear()
        self._flush()
        for job in left:
            self._drop(job)
            if not job.closed:
                job.closed = True
                job.emit(Event("error", status=503, error_type="server_error", text="the server is shutting down"))
