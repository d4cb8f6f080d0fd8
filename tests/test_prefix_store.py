"""The host-memory prefix store: exact save / lookup / load of cached keys and values, the byte budget,
and the batch generator finding a prompt's prefix there after its slot was reused."""

from __future__ import annotations

import pytest
import torch

from bittern.configs import get_config
from bittern.engine import Engine, EngineModel
from bittern.engine.kvcache import EngineKVCache
from bittern.model import Transformer
from bittern.prefix_store import PrefixStore, cache_tensors
from bittern.sampling import SamplingParams

CONFIG = get_config("tiny-2b4t")


def random_cache(dtype: str, slots: int = 3, max_len: int = 80, seed: int = 0) -> EngineKVCache:
    cache = EngineKVCache(CONFIG, slots, max_len, dtype)
    g = torch.Generator().manual_seed(seed)
    for t in cache_tensors(cache):
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
        else:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return cache


def block_bytes(cache: EngineKVCache, block: int) -> int:
    return sum(t[:, 0, :, :block].numel() * t.element_size() for t in cache_tensors(cache))


@pytest.mark.parametrize("dtype", ["f16", "int8", "f32"])
def test_saved_prefix_loads_back_bit_exact_into_another_slot(dtype) -> None:
    cache = random_cache(dtype)
    store = PrefixStore(1 << 30, block=16)
    tokens = torch.randint(0, 500, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    assert store.save(cache, 0, tokens) == 64  # whole blocks only
    assert store.save(cache, 0, tokens) == 0  # already there: nothing copied again
    assert store.longest(tokens) == 64 and store.longest(tokens + [1, 2]) == 64
    assert store.longest(tokens[:20] + [999] * 40) == 16  # diverges inside the second block
    assert store.longest([999] + tokens[1:]) == 0
    before = [t.clone() for t in cache_tensors(cache)]
    assert store.load(cache, 1, tokens, 5, 50) == 50
    for t, old in zip(cache_tensors(cache), before):
        assert torch.equal(t[:, 1, :, :50], old[:, 0, :, :50])  # the block holding position 5 is loaded whole
        assert torch.equal(t[:, 1, :, 50:], old[:, 1, :, 50:])  # nothing beyond end
        assert torch.equal(t[:, 0], old[:, 0]) and torch.equal(t[:, 2], old[:, 2])
    with pytest.raises(ValueError, match="holds 64 tokens"):
        store.load(cache, 2, tokens, 0, 65)
    assert store.nbytes == 4 * block_bytes(cache, 16) and len(store) == 4


def test_budget_drops_least_recently_used_leaf_blocks_first() -> None:
    cache = random_cache("f16")
    one = block_bytes(cache, 8)
    store = PrefixStore(3 * one, block=8)
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 500, (16,), generator=g).tolist() for _ in range(3))
    store.save(cache, 0, a)
    store.save(cache, 1, b)  # a's second block (its leaf) goes; a's first stays, a parent of nothing now
    assert store.nbytes <= 3 * one
    assert store.longest(b) == 16 and store.longest(a) == 8
    store.longest(a)  # a lookup alone does not make a block recent; a load does
    store.load(cache, 2, a, 0, 8)
    store.save(cache, 2, c)  # c's two blocks drop b's leaf, then b's first block (a leaf by then), not a's
    assert store.longest(a) == 8 and store.longest(b) == 0 and store.longest(c) == 16
    assert store.nbytes <= 3 * one
    # a prefix longer than the budget stores what fits and never drops its own blocks
    long = torch.randint(0, 500, (40,), generator=g).tolist()
    big = random_cache("f16", max_len=80, seed=5)
    assert store.save(big, 0, long) == 24 and store.longest(long) == 24
    assert PrefixStore(one - 1, block=8).save(cache, 0, a) == 0  # not even one block fits
    with pytest.raises(ValueError):
        PrefixStore(-1)
    with pytest.raises(ValueError):
        PrefixStore(10, block=0)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = EngineModel.from_transformer(Transformer(CONFIG).freeze("2bit"), head="f32")
    if not model.use_fast_path:
        pytest.skip("the prefix store serves the fast engine only (bit-exact cached rows)")
    return Engine(model, None, kv_dtype="f16")


def _run(gen, rid: int) -> tuple[list[int], int | None]:
    tokens, cached = [], None
    while rid in gen.requests:
        for o in gen.step():
            if o.request_id == rid:
                tokens.append(o.token)
                if o.cached_prompt_tokens is not None:
                    cached = o.cached_prompt_tokens
    return tokens, cached


@pytest.mark.parametrize("kv", ["f16", "int8"])
@pytest.mark.parametrize("prefill_chunk", [256, 5, None])
def test_prompt_finds_its_prefix_in_the_store_after_its_slot_was_reused(engine, kv, prefill_chunk) -> None:
    """One slot: a long prompt runs, an unrelated one takes the slot (the first one's cached rows go to
    the store), then a follow-up of the first prompt loads its whole blocks from the store and prefills
    only the rest; its tokens equal a fresh generation's. Without a store nothing is found."""
    eng = Engine(engine.model, None, kv_dtype=kv)
    g = torch.Generator().manual_seed(7)
    first = torch.randint(1, CONFIG.vocab_size, (75,), generator=g).tolist()
    other = torch.randint(1, CONFIG.vocab_size, (12,), generator=g).tolist()
    greedy = SamplingParams(max_tokens=4)
    sampled = SamplingParams(temperature=0.9, seed=3, max_tokens=6)
    found = {}
    for store_bytes in (0, 64 << 20):
        gen = eng.batch_generator(max_batch=1, max_len=128, prefill_chunk=prefill_chunk, prefix_store_bytes=store_bytes)
        said, _ = _run(gen, gen.add(first, greedy))
        _, cached_other = _run(gen, gen.add(other, greedy))
        assert cached_other == 0
        follow = first + said + torch.randint(1, CONFIG.vocab_size, (5,), generator=g).tolist()
        rid = gen.add(follow, sampled)
        got, found[store_bytes] = _run(gen, rid)
        assert got == list(eng.generate_ids(follow, sampled, eos_ids=set()))
        if store_bytes:
            # 75 prompt + 3 generated tokens ran in the slot: two whole 32-token blocks were stored
            assert gen.prefix_store.saved_tokens >= 64 and gen.prefix_store.loaded_tokens == 64
    assert found == {0: 0, 64 << 20: 64}


def test_reference_generator_and_bad_budget_have_no_store(engine) -> None:
    with pytest.raises(ValueError, match="prefix_store_bytes"):
        engine.batch_generator(max_batch=1, prefix_store_bytes=-1)
    assert engine.batch_generator(max_batch=1).prefix_store is None
