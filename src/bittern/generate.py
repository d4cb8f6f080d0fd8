"""Reference generation loop: any :class:`~bittern.model.Transformer` (training or packed) with a KV cache.

This is the plain twin of the fast engine: prefill the prompt in one forward pass, then one token per
step, streaming ids as they come.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .model import KVCache, Transformer
from .sampling import SamplingParams, make_generator, sample_next


@torch.no_grad()
def generate_ids(model: Transformer, prompt: list[int], params: SamplingParams | None = None,
                 eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids after ``prompt`` until ``params.max_tokens``, EOS or the context end."""
    params = (params or SamplingParams()).validate()
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    ctx = model.config.max_seq_len
    if len(prompt) >= ctx:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {ctx}")
    device = model.embed_tokens.weight.device
    cache = KVCache(model.config, 1, min(ctx, len(prompt) + params.max_tokens), device=device)
    generator = make_generator(params.seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    seen = tokens.clone()
    logits = model(tokens, cache, 0)[:, -1]
    pos = len(prompt)
    for _ in range(params.max_tokens):
        next_id = sample_next(logits, params, generator, seen)
        token = int(next_id[0])
        yield token
        if token == eos_id or pos >= cache.max_len:
            return
        seen = torch.cat([seen, next_id.view(1, 1)], dim=1)
        logits = model(next_id.view(1, 1), cache, pos)[:, -1]
        pos += 1


def generate_text(model: Transformer, tokenizer, prompt: str, params: SamplingParams | None = None) -> str:
    """Generate a continuation of ``prompt`` and return its text (stop strings honoured)."""
    params = params or SamplingParams()
    ids = list(generate_ids(model, tokenizer.encode(prompt), params, tokenizer.eos_id))
    text = tokenizer.decode(ids)
    for stop in params.stop:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text
