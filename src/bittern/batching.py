"""Continuous batching over a model: requests join and leave between decode steps.

:class:`BatchGenerator` owns a KV cache with ``max_batch`` rows ("slots"). :meth:`~BatchGenerator.add`
prefills a new request into a free slot; :meth:`~BatchGenerator.step` advances every active request
by one token with a single forward pass (one matrix product per layer for the whole batch);
:meth:`~BatchGenerator.cancel` frees a slot at once. Each request samples with its own parameters and
seeded generator, so its tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import KVCache, Transformer
from .sampling import SamplingParams, make_generator, sample_next


@dataclass
class Request:
    """One sequence being generated."""

    id: int
    slot: int
    prompt: list[int]
    params: SamplingParams
    eos_ids: set[int]
    generator: torch.Generator
    position: int = 0
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    next_logits: torch.Tensor | None = None
    user_data: Any = None


@dataclass
class StepOutput:
    """A token produced for a request by one :meth:`BatchGenerator.step`."""

    request_id: int
    token: int
    finished: bool
    finish_reason: str | None


class BatchGenerator:
    """Continuous-batching generator over a :class:`Transformer` (reference or packed)."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_len: int | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        device = model.embed_tokens.weight.device
        self.cache = KVCache(model.config, max_batch, self.max_len, device=device)
        self.requests: dict[int, Request] = {}
        self._free = list(range(max_batch))
        self._ids = itertools.count()

    @property
    def free_slots(self) -> int:
        """How many more requests can join now."""
        return len(self._free)

    @property
    def active(self) -> int:
        """Requests currently generating."""
        return len(self.requests)

    @torch.no_grad()
    def add(self, prompt: list[int], params: SamplingParams, eos_ids: set[int] | None = None, user_data: Any = None) -> int:
        """Prefill ``prompt`` into a free slot and return the new request's id."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context is {self.max_len}")
        if not self._free:
            raise RuntimeError("no free slot: wait for a request to finish")
        slot = self._free.pop(0)
        request = Request(next(self._ids), slot, list(prompt), params, set(eos_ids or ()), make_generator(params.seed),
                          user_data=user_data)
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.cache.k.device)
        logits = self.model(tokens, self.cache, 0, torch.tensor([slot]))
        request.position = len(prompt)
        request.next_logits = logits[:, -1]
        self.requests[request.id] = request
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request now and free its slot (unknown ids are ignored)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._free.append(request.slot)

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        seen = torch.tensor([request.prompt + request.generated], dtype=torch.long) if request.params.repetition_penalty != 1.0 else None
        return int(sample_next(logits, request.params, request.generator, seen)[0])

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Sample one token for every active request, then run one batched forward pass for them."""
        outputs: list[StepOutput] = []
        continuing: list[Request] = []
        for request in list(self.requests.values()):
            token = self._sample(request, request.next_logits)
            request.generated.append(token)
            reason = None
            if token in request.eos_ids:
                reason = "stop"
            elif len(request.generated) >= request.params.max_tokens:
                reason = "length"
            elif request.position + 1 >= self.max_len:
                reason = "length"
            if reason:
                request.finished, request.finish_reason = True, reason
                self.cancel(request.id)
            else:
                continuing.append(request)
            outputs.append(StepOutput(request.id, token, reason is not None, reason))
        if continuing:
            tokens = torch.tensor([[r.generated[-1]] for r in continuing], dtype=torch.long)
            positions = torch.tensor([r.position for r in continuing], dtype=torch.long)
            slots = torch.tensor([r.slot for r in continuing], dtype=torch.long)
            logits = self.model(tokens, self.cache, positions, slots)[:, -1]
            for i, r in enumerate(continuing):
                r.next_logits = logits[i : i + 1]
                r.position += 1
        return outputs
