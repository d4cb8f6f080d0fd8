"""Keys and values of token prefixes kept in host memory after their KV-cache slot is reused.

A :class:`~bittern.batching.BatchGenerator` keeps what a finished request computed in its slot, so a
later prompt that starts the same way prefills only the rest; but it has only ``max_batch`` slots, and
a slot's content is lost as soon as an unrelated prompt takes it. A :class:`PrefixStore` keeps that
content in blocks of ``block`` tokens in a tree (a block's key is its parent block and its own token
ids, so a lookup compares ids, never hashes), under a byte budget, dropping the least recently used
leaf blocks first. The generator saves a slot's blocks before another prompt overwrites them and copies
the longest stored prefix of a new prompt into its slot. That is exact only where a cached position's
keys and values depend on nothing but the tokens up to it (the engine's bit-exact kernels).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors a KV cache keeps per position, each ``[layers, slots, kv_heads, max_len, ...]``."""
    tensors = [cache.k, cache.v]
    if getattr(cache, "quantized", False):
        tensors += [cache.k_scale, cache.v_scale]
    return tensors


@dataclass(eq=False)
class _Block:
    id: int
    parent: int
    tokens: tuple[int, ...]
    data: list[torch.Tensor]
    nbytes: int
    children: int = 0
    key: tuple[int, tuple[int, ...]] = field(default=(0, ()))


class PrefixStore:
    """Blocks of cached keys and values, keyed by the token prefix that produced them.

    ``max_bytes``: the most the stored tensors may take (0 stores nothing); ``block``: tokens per block
    (only whole blocks are stored).
    """

    def __init__(self, max_bytes: int, block: int = 32) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix store's budget must be >= 0 bytes (got {max_bytes})")
        if block < 1:
            raise ValueError(f"a prefix-store block needs at least one token (got {block})")
        self.max_bytes = max_bytes
        self.block = block
        self.nbytes = 0
        self._ids = itertools.count(1)  # 0 is the empty prefix, the root
        self._blocks: dict[tuple[int, tuple[int, ...]], _Block] = {}
        self._by_id: dict[int, _Block] = {}
        self._recency: OrderedDict[int, None] = OrderedDict()  # block ids, least recently used first
        self.saved_tokens = 0  # tokens written into the store so far
        self.loaded_tokens = 0  # tokens copied out of it so far

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: list[int]) -> list[_Block]:
        """The stored blocks along ``tokens``, from the first, as far as they go."""
        chain: list[_Block] = []
        parent = 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            node = self._blocks.get((parent, tuple(tokens[start : start + self.block])))
            if node is None:
                break
            chain.append(node)
            parent = node.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        # children before parents: a parent is then never less recently used than its children
        for node in reversed(chain):
            self._recency.move_to_end(node.id)

    def longest(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` the store holds (a multiple of ``block``)."""
        return len(self._chain(tokens)) * self.block

    def save(self, cache: Any, slot: int, tokens: list[int]) -> int:
        """Store the whole blocks of ``tokens`` whose keys and values sit at positions ``0..len(tokens)`` of
        ``slot`` in ``cache`` (blocks already stored are not copied again); returns the tokens newly stored.
        Stops early when the budget is full of blocks this prefix needs."""
        chain = self._chain(tokens)
        added = 0
        parent = chain[-1].id if chain else 0
        tensors = cache_tensors(cache)
        for start in range(len(chain) * self.block, len(tokens) - self.block + 1, self.block):
            end = start + self.block
            need = sum(t[:, slot, :, start:end].numel() * t.element_size() for t in tensors)
            if not self._make_room(need, keep={b.id for b in chain}):
                break
            data = [t[:, slot, :, start:end].clone() for t in tensors]
            key = (parent, tuple(tokens[start:end]))
            node = _Block(next(self._ids), parent, key[1], data, need, key=key)
            self._blocks[key] = node
            self._by_id[node.id] = node
            self._recency[node.id] = None
            if parent:
                self._by_id[parent].children += 1
            self.nbytes += need
            chain.append(node)
            parent = node.id
            added += self.block
        self._touch(chain)
        self.saved_tokens += added
        return added

    def load(self, cache: Any, slot: int, tokens: list[int], start: int, end: int) -> int:
        """Copy the stored keys and values of ``tokens`` into ``slot`` for positions ``start..end`` (rounded
        out to whole blocks at the start; ``end`` at most :meth:`longest`); returns the positions
        ``start..`` now filled, i.e. ``end``."""
        chain = self._chain(tokens[: -(-end // self.block) * self.block])
        if end > len(chain) * self.block:
            raise ValueError(f"the prefix store holds {len(chain) * self.block} tokens of this prompt, not {end}")
        tensors = cache_tensors(cache)
        for i in range(start // self.block, len(chain)):
            a = i * self.block
            b = min(a + self.block, end)
            if b <= a:
                break
            for t, saved in zip(tensors, chain[i].data):
                t[:, slot, :, a:b].copy_(saved[:, :, : b - a])
        self._touch(chain)
        self.loaded_tokens += max(0, end - start)
        return end

    def _make_room(self, need: int, keep: set[int]) -> bool:
        """Drop least recently used leaf blocks (not in ``keep``) until ``need`` more bytes fit."""
        if need > self.max_bytes:
            return False
        while self.nbytes + need > self.max_bytes:
            victim = next((self._by_id[i] for i in self._recency
                           if self._by_id[i].children == 0 and i not in keep), None)
            if victim is None:
                return False
            self._drop(victim)
        return True

    def _drop(self, node: _Block) -> None:
        del self._blocks[node.key]
        del self._by_id[node.id]
        del self._recency[node.id]
        if node.parent:
            self._by_id[node.parent].children -= 1
        self.nbytes -= node.nbytes
