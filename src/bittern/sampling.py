"""Next-token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick the next token; ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    #: report each generated token's log-probability (under the model, before sampling's filters) and
    #: those of this many most likely alternatives; None: nothing (batch generation only)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = [self.stop]

    def validate(self) -> "SamplingParams":
        """Raise ValueError on out-of-range settings (NaN included); return self."""
        if not 0 <= self.temperature < math.inf:
            raise ValueError("temperature must be >= 0 and finite")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError("min_p must be in [0, 1)")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError("repetition_penalty must be > 0 and finite")
        if self.max_tokens <= 0:
            raise ValueError("max_tokens must be a positive number of tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS} alternatives")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]")
        return self


#: the most alternatives a token's log-probabilities may list (OpenAI's limit for top_logprobs)
MAX_TOP_LOGPROBS = 20

#: the seeds a generator takes (64-bit, signed or unsigned)
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def offset_seed(seed: int | None, offset: int) -> int | None:
    """``seed + offset``, wrapped into the seed range (a request's n choices use seed, seed + 1, ...)."""
    if seed is None:
        return None
    s = seed + offset
    return s - (1 << 64) if s > SEED_MAX else s


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU random generator, seeded for reproducibility when ``seed`` is given."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on ``logits [B, V]`` for the ids in ``seen [B, n]`` (positive / p, negative * p)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def next_token_distribution(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that can be drawn from one row of (penalised) ``logits [V]`` and their probabilities.

    Temperature, then top-k (every logit at least the k-th largest stays, ties included), softmax,
    min-p (drop tokens below ``min_p`` x the top probability) and top-p (the smallest set of the most
    likely tokens whose mass reaches ``top_p`` of what is left). Returns ``(ids int64 [n], probs float64
    [n])`` with the probabilities summing to 1. Only the candidates are ever sorted: with top-k that is
    k of them, with top-p alone the leading 256, 2048, ... until the nucleus is inside (a full sort of a
    128k vocabulary took 13 ms, a third of a decode step).
    """
    if params.temperature <= 0:
        raise ValueError("next_token_distribution needs temperature > 0 (temperature 0 is greedy)")
    row = logits.float().reshape(-1) / params.temperature
    V = row.numel()
    if 0 < params.top_k < V:
        kth = torch.topk(row, params.top_k).values[-1]
        ids = torch.nonzero(row >= kth).reshape(-1)
        row = row[ids]
    else:
        ids = torch.arange(V)
    probs = torch.softmax(row, dim=0)
    if params.min_p > 0:
        keep = probs >= params.min_p * probs.max()
        ids, probs = ids[keep], probs[keep]
    if params.top_p < 1.0:
        total = probs.sum()
        k = min(probs.numel(), 256)
        while True:
            top, order = torch.topk(probs, k)  # descending
            cumulative = top.cumsum(0)
            # every token past the k-th is dropped once the k leading ones exceed top_p of the mass
            if k == probs.numel() or cumulative[-1] > params.top_p * total:
                break
            k = min(probs.numel(), k * 8)
        keep = ~(cumulative - top > params.top_p * total)
        ids, probs = ids[order[keep]], top[keep]
    probs = probs.double()
    return ids, probs / probs.sum()


def _draw(ids: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id from ``ids`` with probabilities ``probs`` (inverse CDF of one uniform draw)."""
    cdf = probs.cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    i = int(torch.searchsorted(cdf, u.reshape(1), right=True)[0])
    return ids[min(i, ids.numel() - 1)]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits [B, V]``; returns int64 ids ``[B]``.

    Runs on one torch thread: its operations over one vocabulary take ~1 ms, and torch's parallel
    regions would cost more than they save and compete with the kernel pool's workers for the cores
    (sampled decode on two threads: 26 -> 32 tok/s at 2B4T, docs/engine.md).
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        if params.temperature == 0:
            return logits.argmax(dim=-1)
        return torch.stack([_draw(*next_token_distribution(row, params), generator) for row in logits])
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
