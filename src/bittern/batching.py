"""Continuous batching over a model: requests join and leave between decode steps.

:class:`BatchGenerator` owns a KV cache with ``max_batch`` rows ("slots"). :meth:`~BatchGenerator.add`
takes a new request into a free slot; :meth:`~BatchGenerator.step` prefills the requests added since
the last step (together, in one pass where the model can) and then advances every active request by
one token with a single forward pass (one matrix product per layer for the whole batch);
:meth:`~BatchGenerator.cancel` frees a slot at once. A generator whose model can run rows of any slots
in one pass (the engine's) sets ``prefill_chunk``: each step then carries up to that many prompt tokens
of new requests in the same pass as the running requests' next tokens, so a long prompt neither stalls
the running streams for its whole prefill nor costs a pass of its own; with ``reuse_prefix`` a new
request takes the free slot whose cache holds the longest prefix of its prompt and prefills the rest,
and a ``prefix_store`` keeps slots' prefixes in host memory after their slots are reused. Each request
samples with its own parameters and seeded generator, so its tokens do not depend on what else shares
the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import KVCache, Transformer
from .prefix_store import PrefixStore
from .sampling import SamplingParams, make_generator, sample_next


class SeenTokens:
    """Token ids a sequence has seen (for the repetition penalty), grown without per-token reallocation."""

    def __init__(self, prompt: list[int], capacity: int) -> None:
        self.buf = torch.empty(1, len(prompt) + capacity, dtype=torch.long)
        self.buf[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.n = len(prompt)

    def add(self, token: int) -> None:
        """Append one id."""
        self.buf[0, self.n] = token
        self.n += 1

    def view(self) -> torch.Tensor:
        """The ids so far, ``[1, n]``."""
        return self.buf[:, : self.n]


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
    prefilled: int = 0  # prompt tokens whose keys and values are in the cache
    cached_prompt_tokens: int = 0  # of those, the ones an earlier request left there
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
    #: with a request's first token: how many of its prompt tokens were found in the KV cache
    cached_prompt_tokens: int | None = None
    #: when the request asked for ``logprobs``: the token's log-probability under the model
    logprob: float | None = None
    #: and its ``logprobs`` most likely alternatives, ``(token, log-probability)``, most likely first
    top_logprobs: list[tuple[int, float]] | None = None


#: a new request waits for an earlier one that will compute at least this many more of its prompt
SHARE_MIN = 32


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(diff[0, 0]) if len(diff) else n


class BatchGenerator:
    """Continuous-batching generator over a :class:`Transformer` (reference or packed)."""

    #: prompt tokens a step carries along with the decode rows (None: whole prompts, before the step's
    #: decode pass; set where :meth:`_forward_rows` is implemented)
    prefill_chunk: int | None = None
    #: take a new request into the free slot whose cache already holds the longest prefix of its prompt,
    #: and prefill only the rest (set where a token's cached keys and values do not depend on the pass
    #: that computed them: the engine's, bit-exact kernels)
    reuse_prefix: bool = False
    #: with ``reuse_prefix``: where a slot's cached prefix goes before another prompt overwrites it, and
    #: where a new prompt's longest stored prefix is copied from (beyond the ``max_batch`` slots)
    prefix_store: PrefixStore | None = None

    def __init__(self, model: Transformer, max_batch: int = 8, max_len: int | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.cache = self._new_cache()
        self.requests: dict[int, Request] = {}
        self._free = list(range(max_batch))
        self._ids = itertools.count()
        self._seen: dict[int, SeenTokens] = {}
        self._unprefilled: list[Request] = []
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each free slot's cache holds
        self._released = [0] * max_batch
        self._clock = itertools.count(1)

    # -- the model-specific hooks (a faster engine overrides these) --------------------------------

    def _new_cache(self) -> Any:
        return KVCache(self.model.config, self.max_batch, self.max_len, device=self.model.embed_tokens.weight.device)

    def _prefill_many(self, prompts: list[list[int]], slots: list[int], starts: list[int]) -> torch.Tensor:
        """Logits ``[len(prompts), vocab]`` of each prompt's last token, prompt ``i`` prefilled into ``slots[i]``
        from position ``starts[i]``."""
        device = self.cache.k.device
        return torch.cat([self.model(torch.tensor([p], dtype=torch.long, device=device), self.cache, st,
                                     torch.tensor([s]))[:, -1]
                          for p, s, st in zip(prompts, slots, starts)])

    def _copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the cached keys and values of positions ``0..n`` from slot ``src`` to slot ``dst``."""
        self.cache.copy_prefix(src, dst, n)

    def _forward_rows(self, tokens: list[int], slots: list[int], positions: list[int], logit_rows: list[int]) -> torch.Tensor:
        """Rows of any slots in one pass (rising positions within a slot); logits of ``logit_rows``."""
        raise NotImplementedError("this generator's model runs whole prompts only: leave prefill_chunk as None")

    def _decode(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor(tokens, dtype=torch.long).view(-1, 1), self.cache,
                            torch.tensor(positions, dtype=torch.long), torch.tensor(slots, dtype=torch.long))
        return logits[:, -1]

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
        """Take ``prompt`` into a free slot and return the new request's id (the next :meth:`step` or
        :meth:`prefill_pending` prefills it, with every other prompt added since)."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context is {self.max_len}")
        if not self._free:
            raise RuntimeError("no free slot: wait for a request to finish")
        slot, reused = self._pick_slot(prompt)
        request = Request(next(self._ids), slot, list(prompt), params, set(eos_ids or ()), make_generator(params.seed),
                          user_data=user_data, prefilled=reused, cached_prompt_tokens=reused)
        if params.repetition_penalty != 1.0:
            self._seen[request.id] = SeenTokens(request.prompt, params.max_tokens)
        self.requests[request.id] = request
        self._unprefilled.append(request)
        if self.reuse_prefix:
            self._catch_up(request)
            self._load_stored_prefix(request)
        return request.id

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """A free slot for ``prompt`` (taken from the free list) and how many of its first tokens that
        slot's cache holds: with ``reuse_prefix``, the free slot with the longest cached prefix (among
        equals, the one released longest ago: its cache is the least likely to be wanted again); else
        none. At most all but the last prompt token, which always runs: it gives the logits."""
        best, best_key, best_len = self._free[0], None, 0
        for slot in self._free:
            n = _common_prefix(self._slot_tokens[slot], prompt) if self.reuse_prefix else 0
            key = (n, -self._released[slot])
            if best_key is None or key > best_key:
                best, best_key, best_len = slot, key, n
        self._free.remove(best)
        if self.prefix_store is not None and self.reuse_prefix and self._slot_tokens[best]:
            self.prefix_store.save(self.cache, best, self._slot_tokens[best])
        self._slot_tokens[best] = []
        return best, min(best_len, len(prompt) - 1)

    def _load_stored_prefix(self, request: Request) -> None:
        """Copy into ``request``'s slot what the prefix store holds beyond it of its prompt (up to all but
        the last prompt token)."""
        if self.prefix_store is None:
            return
        n = min(self.prefix_store.longest(request.prompt), len(request.prompt) - 1)
        if n > request.prefilled:
            self.prefix_store.load(self.cache, request.slot, request.prompt, request.prefilled, n)
            request.cached_prompt_tokens += n - request.prefilled
            request.prefilled = n

    def _catch_up(self, request: Request) -> None:
        """Copy into ``request``'s slot what another request's slot holds beyond it of its prompt (the
        longest such prefix; up to all but the last prompt token)."""
        limit = len(request.prompt) - 1
        source, n = None, request.prefilled
        for other in self.requests.values():
            if other is not request:
                m = min(_common_prefix(self._cached_tokens(other), request.prompt), limit)
                if m > n:
                    source, n = other, m
        if source is not None:
            self._copy_prefix(source.slot, request.slot, n)
            request.cached_prompt_tokens += n - request.prefilled
            request.prefilled = n

    @staticmethod
    def _cached_tokens(request: Request) -> list[int]:
        """The tokens whose keys and values ``request``'s passes have put in its slot (a sampled token
        runs in the next pass)."""
        n = request.position if request.prefilled == len(request.prompt) else request.prefilled
        return (request.prompt + request.generated)[:n]

    def cached_prompt_tokens(self, request_id: int) -> int:
        """Prompt tokens of a request that its slot's cache already held (not prefilled again)."""
        request = self.requests.get(request_id)
        return request.cached_prompt_tokens if request is not None else 0

    @torch.no_grad()
    def prefill_pending(self) -> None:
        """Prefill every request added since the last call, in one pass where the model can (with
        ``prefill_chunk`` set, nothing: the steps carry the prompts).

        If that fails, those requests are cancelled (their slots freed) and the error is raised; requests
        prefilled earlier are unaffected.
        """
        if self.prefill_chunk is not None:
            return
        pending, self._unprefilled = self._unprefilled, []
        if not pending:
            return
        logits = self._run_pass(pending, self._prefill_many, [r.prompt[r.prefilled :] for r in pending],
                                [r.slot for r in pending], [r.prefilled for r in pending])
        for i, r in enumerate(pending):
            r.next_logits = logits[i : i + 1].clone()
            r.position = r.prefilled = len(r.prompt)

    def _run_pass(self, requests: list[Request], run: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``run(*args)``, a forward pass for ``requests``; if it fails they are cancelled and the error raised
        (their caches end where their last completed pass left them)."""
        try:
            return run(*args)
        except BaseException:
            for r in requests:
                self.cancel(r.id)
            raise

    def cancel(self, request_id: int) -> None:
        """Stop a request now and free its slot (unknown ids are ignored)."""
        request = self.requests.pop(request_id, None)
        self._seen.pop(request_id, None)
        if request is not None:
            self._slot_tokens[request.slot] = self._cached_tokens(request)
            self._released[request.slot] = next(self._clock)
            self._free.append(request.slot)
            self._unprefilled = [r for r in self._unprefilled if r is not request]

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Advance every request whose prompt is in the cache by one token, with one batched forward pass.

        Without ``prefill_chunk``: new requests' whole prompts are prefilled first, then every request
        samples from its waiting logits and one pass runs the sampled tokens. With it: one pass runs each
        request's last sampled token together with up to ``prefill_chunk`` prompt tokens of new requests,
        then every request it produced logits for samples (a prompt that ends in this pass yields its first
        token at once). A failed pass cancels the requests it carried and raises.
        """
        if self.prefill_chunk is not None:
            return self._step_carrying_prompts()
        self.prefill_pending()
        outputs: list[StepOutput] = []
        continuing: list[Request] = []
        for request in list(self.requests.values()):
            self._sample(request, outputs, continuing)
        if continuing:
            logits = self._run_pass(continuing, self._decode, [r.generated[-1] for r in continuing],
                                    [r.slot for r in continuing], [r.position for r in continuing])
            for i, r in enumerate(continuing):
                r.next_logits = logits[i : i + 1].clone()
                r.position += 1
        return outputs

    def _share_prefixes(self) -> set[int]:
        """Before a step carries prompts: copy into each new request's slot what another slot already holds
        of its prompt, and return the ids of the new requests that should wait because an earlier one will
        compute at least ``SHARE_MIN`` more of their prompt (a burst of requests with one system prompt,
        or n choices of one prompt, prefill it once)."""
        waiting: set[int] = set()
        ahead: list[Request] = []
        for r in self._unprefilled:
            self._catch_up(r)
            limit = len(r.prompt) - 1
            if any(min(_common_prefix(o.prompt, r.prompt), limit) - r.prefilled >= SHARE_MIN for o in ahead):
                waiting.add(r.id)
            ahead.append(r)
        return waiting

    def _step_carrying_prompts(self) -> list[StepOutput]:
        waiting = self._share_prefixes() if self.reuse_prefix and self._unprefilled else set()
        running = [r for r in self.requests.values() if r.prefilled == len(r.prompt)]
        tokens = [r.generated[-1] for r in running]
        slots = [r.slot for r in running]
        positions = [r.position for r in running]
        wanted = list(range(len(running)))
        completed: list[Request] = []
        carried: list[tuple[Request, int]] = []
        budget = self.prefill_chunk or 0
        for r in self._unprefilled:
            if budget <= 0:
                break
            if r.id in waiting:
                continue
            n = min(budget, len(r.prompt) - r.prefilled)
            tokens += r.prompt[r.prefilled : r.prefilled + n]
            slots += [r.slot] * n
            positions += range(r.prefilled, r.prefilled + n)
            budget -= n
            carried.append((r, n))
            if r.prefilled + n == len(r.prompt):
                wanted.append(len(tokens) - 1)
                completed.append(r)
        if not tokens:
            return []
        involved = running + [r for r, _ in carried]
        if carried:
            logits = self._run_pass(involved, self._forward_rows, tokens, slots, positions, wanted)
        else:
            logits = self._run_pass(involved, self._decode, tokens, slots, positions)
        for r, n in carried:
            r.prefilled += n
        if completed:
            self._unprefilled = [r for r in self._unprefilled if r.prefilled < len(r.prompt)]
        outputs: list[StepOutput] = []
        for i, r in enumerate(running + completed):
            r.next_logits = logits[i : i + 1]
            r.position = r.position + 1 if i < len(running) else len(r.prompt)
            self._sample(r, outputs, [])
            r.next_logits = None  # the sampled token runs in the next step's pass
        return outputs

    def _sample(self, request: Request, outputs: list[StepOutput], continuing: list[Request]) -> None:
        """Sample ``request``'s next token from its waiting logits; record the output, and append the
        request to ``continuing`` unless it has finished (then its slot is freed)."""
        seen = self._seen.get(request.id)
        token = int(sample_next(request.next_logits, request.params, request.generator,
                                seen.view() if seen is not None else None)[0])
        request.generated.append(token)
        if seen is not None:
            seen.add(token)
        reason = None
        if token in request.eos_ids:
            reason = "stop"
        elif len(request.generated) >= request.params.max_tokens or request.position >= self.max_len:
            # (the sampled token would be written at ``position``; the last one never needs writing)
            reason = "length"
        if reason:
            request.finished, request.finish_reason = True, reason
            self.cancel(request.id)
        else:
            continuing.append(request)
        first = request.cached_prompt_tokens if len(request.generated) == 1 else None
        logprob = top = None
        if request.params.logprobs is not None:
            lp = torch.log_softmax(request.next_logits[0].float(), dim=-1)
            logprob = float(lp[token])
            if request.params.logprobs:
                values, ids = torch.topk(lp, min(request.params.logprobs, lp.numel()))
                top = list(zip(ids.tolist(), values.tolist()))
            else:
                top = []
        outputs.append(StepOutput(request.id, token, reason is not None, reason, first, logprob, top))
