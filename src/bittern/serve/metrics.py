"""Server counters and gauges, exposed in the Prometheus text format at ``/metrics``.

Written by the worker thread and the request handlers, read by ``/metrics``; one lock guards all.
"""

from __future__ import annotations

import threading
import time
from collections import deque



class Metrics:
    """Request and token counters, plus a sliding-window generation rate."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.window_s = window_s
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self.timed_out = 0
        self.rejected_queue_full = 0
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.started = time.time()

    def count_request(self, endpoint: str, status: int) -> None:
        """One finished HTTP request to ``endpoint`` answered with ``status``."""
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def add(self, **counts: int) -> None:
        """Add to named counters (``prompt_tokens``, ``cancelled``, ...)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def record_step(self, tokens: int) -> None:
        """One decode step that produced ``tokens`` tokens."""
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.generated_tokens += tokens
            self._recent.append((now, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self.window_s

    def render(self, gauges: dict[str, tuple[str, float]], prefix: str = "bittern") -> str:
        """Prometheus text exposition of every counter plus ``gauges`` (name -> (help, value))."""
        rate = self.tokens_per_second()
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {prefix}_{name} {help_}")
                lines.append(f"# TYPE {prefix}_{name} {kind}")
                for labels, value in samples:
                    lines.append(f"{prefix}_{name}{labels} {value:g}" if isinstance(value, float) else f"{prefix}_{name}{labels} {value}")

            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())] or [("", 0)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", self.prompt_tokens)])
            metric("prompt_tokens_cached_total", "counter",
                   "Prompt tokens found in a KV-cache slot (left there by an earlier request), not prefilled again.",
                   [("", self.prompt_tokens_cached)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("decode_steps_total", "counter", "Batched decode steps run.", [("", self.steps)])
            metric("requests_cancelled_total", "counter", "Generations stopped because the client went away.", [("", self.cancelled)])
            metric("requests_timed_out_total", "counter", "Generations stopped by the request timeout.", [("", self.timed_out)])
            metric("requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.", [("", self.rejected_queue_full)])
            metric("generation_tokens_per_second", "gauge", f"Tokens generated per second over the last {self.window_s:g} s.", [("", float(rate))])
            metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", float(time.time() - self.started))])
        for name, (help_, value) in gauges.items():
            lines.append(f"# HELP {prefix}_{name} {help_}")
            lines.append(f"# TYPE {prefix}_{name} gauge")
            lines.append(f"{prefix}_{name} {value:g}")
        return "\n".join(lines) + "\n"


