"""Engine vs the reference path (frozen Transformer): logits, greedy tokens, KV-cache options, loading."""

from __future__ import annotations

import pytest
import torch

from bittern.configs import get_config
from bittern.engine import Engine, EngineModel
from bittern.engine.create import create_random_model
from bittern.generate import generate_ids
from bittern.model import Transformer
from bittern.modelfile import load_packed, save_packed
from bittern.sampling import SamplingParams


def _frozen(name: str, seed: int = 0, layout: str = "2bit") -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_config(name))
    with torch.no_grad():  # give norms non-trivial gains so they matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.freeze(layout).requires_grad_(False)


@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t", "tiny-faq"])
def test_prefill_logits_equal_reference(name: str) -> None:
    model = _frozen(name)
    engine = Engine(EngineModel.from_transformer(model, head="f32"), kv_dtype="f32")
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = model(torch.tensor([ids]))[0]
    got = engine.logits(ids)
    assert got.shape == ref.shape
    assert ref.abs().max() > 0.05
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t", "tiny-faq"])
@pytest.mark.parametrize("fast", [True, False])
def test_decode_steps_equal_reference(name: str, fast: bool) -> None:
    model = _frozen(name, seed=2)
    em = EngineModel.from_transformer(model, head="f32")
    em.use_fast_path = fast and em.use_fast_path
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = model(torch.tensor([ids]))[0]
    cache = em.new_cache(1, 64, "f32")
    first = em.prefill(ids[:12], cache)
    torch.testing.assert_close(first[0], ref[11], atol=1e-4, rtol=1e-4)
    for p in range(12, 30):
        logits = em.decode([ids[p]], cache, [0], [p])
        torch.testing.assert_close(logits[0], ref[p], atol=1e-4, rtol=1e-4)


def _fast_model(model: Transformer, native_layer_loop: bool) -> EngineModel:
    """An engine model on the C path (int8 head), with the one-call layer loop or the per-kernel Python one."""
    em = EngineModel.from_transformer(model, head="int8")
    assert em.use_fast_path
    em.native_layer_loop = native_layer_loop
    return em


@pytest.mark.parametrize("kv", ["f16", "int8"])
@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t"])
def test_native_layer_loop_equals_python_loop(name: str, kv: str) -> None:
    """The one-call C layer loop computes the same bits as the per-kernel Python loop, for a batch of
    rows in different cache slots at different positions."""
    model = _frozen(name, seed=4)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(5)).tolist()
    outs = []
    for native_loop in (True, False):
        em = _fast_model(model, native_loop)
        cache = em.new_cache(3, 32, kv)
        em.prefill(ids[0][:9], cache, slot=2)
        em.prefill(ids[1][:5], cache, slot=0)
        steps = [em.decode([ids[0][9 + i], ids[1][5 + i]], cache, [2, 0], [9 + i, 5 + i]).clone() for i in range(6)]
        assert (em._fast[2].c_plan is not None) == native_loop
        outs.append(torch.stack(steps))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kv", ["f16", "int8"])
def test_batched_attention_equals_row_by_row(kv: str) -> None:
    """The C layer loop attends all rows of a prefill (and rows of one slot at rising positions) in one
    pool dispatch; enough positions here to use both threads. Same bits as the per-row Python loop."""
    from bittern.engine import set_threads
    from bittern.kernels import native

    model = _frozen("tiny-2b4t", seed=6)
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(7)).tolist()
    old = native.get_threads() if native.available() else 1
    set_threads(2)
    try:
        outs = []
        for native_loop in (True, False):
            em = _fast_model(model, native_loop)
            cache = em.new_cache(2, 96, kv)
            full = em.prefill(ids[:60], cache, slot=1, all_logits=True).clone()
            two = em.decode(ids[60:62], cache, [1, 1], [60, 61]).clone()  # one slot, rising positions
            outs.append((full, two))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert outs[0][0].abs().max() > 0
    finally:
        set_threads(old)


@pytest.mark.parametrize("kv", ["f16", "int8"])
@pytest.mark.parametrize("native_loop", [True, False])
def test_prefill_batch_equals_one_prefill_per_sequence(native_loop: bool, kv: str) -> None:
    """Several sequences prefilled in shared passes (ragged lengths, one continuing from position 9,
    passes split inside a sequence, > 64 rows over several slots on two threads): the same logits and
    cache entries, bit for bit, as one prefill per sequence."""
    from bittern.engine import set_threads
    from bittern.kernels import native

    model = _frozen("tiny-2b4t", seed=9)
    gen = torch.Generator().manual_seed(10)
    lens, slots, starts = [1, 23, 40, 6, 31], [3, 0, 4, 1, 2], [0, 0, 0, 9, 0]
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lens]
    head = torch.randint(0, 512, (9,), generator=gen).tolist()  # what slot 1 holds before its batch rows
    old = native.get_threads() if native.available() else 1
    set_threads(2)
    try:
        em = _fast_model(model, native_loop)
        ref_cache = em.new_cache(5, 64, kv)
        em.prefill(head, ref_cache, slot=1)
        ref = [em.prefill(p, ref_cache, s, st).clone() for p, s, st in zip(prompts, slots, starts)]
        for max_rows in (1024, 17):
            cache = em.new_cache(5, 64, kv)
            em.prefill(head, cache, slot=1)
            got = em.prefill_batch(prompts, cache, slots, starts, max_rows=max_rows)
            assert got.shape == (5, model.config.vocab_size)
            for i in range(5):
                assert torch.equal(got[i], ref[i][0]), (max_rows, i)
            for s, st, n in zip(slots, starts, lens):
                for a, b in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
                    assert torch.equal(a[:, s, :, : st + n], b[:, s, :, : st + n])
        assert got.abs().max() > 0
    finally:
        set_threads(old)
    cache = em.new_cache(2, 16, kv)
    with pytest.raises(ValueError, match="share a cache slot"):
        em.prefill_batch([[1], [2]], cache, [0, 0])
    with pytest.raises(ValueError, match="outside"):
        em.prefill_batch([[1], [2]], cache, [0, 2])
    with pytest.raises(ValueError, match="exceeds the cache length"):
        em.prefill_batch([[1], list(range(17))], cache, [0, 1])
    with pytest.raises(ValueError, match="no tokens"):
        em.prefill_batch([[1], []], cache, [0, 1])


def test_prefill_in_passes_equals_one_pass() -> None:
    """A prompt longer than ``pass_rows`` runs in several passes (bounded activation memory): the same
    logits for every position and the same cache as in one pass."""
    model = _frozen("tiny-2b4t", seed=12)
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(13)).tolist()
    outs = []
    for rows in (1000, 8):
        em = _fast_model(model, True)
        em.pass_rows = rows
        cache = em.new_cache(1, 40, "f16")
        outs.append((em.prefill(ids, cache, all_logits=True).clone(), em.prefill(ids[:3], cache, 0, 0).clone(),
                     cache.k[:, 0, :, :37].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*outs)) and outs[0][0].shape == (37, model.config.vocab_size)


@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, ReLU^2
def test_many_row_activation_quantisation_same_on_any_threads(act: int) -> None:
    """A prefill's activation + sub-norm + int8 quantisation runs its rows on the pool: the same bits
    as on one thread, rows big enough to take the parallel path."""
    from bittern.engine import set_threads
    from bittern.engine.headkernel import load_head_kernel
    from bittern.kernels import native

    C = load_head_kernel()
    if C is None:
        pytest.skip("native library not built")
    T, F = 48, 2000
    gen = torch.Generator().manual_seed(8)
    gu0 = torch.randn(T, 2 * F, generator=gen) * 3
    w = torch.rand(F, generator=gen) + 0.5
    old = native.get_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            set_threads(threads)
            gu, q = gu0.clone(), torch.zeros(T, F, dtype=torch.int8)
            s, rs = torch.empty(T), torch.empty(T, dtype=torch.int32)
            assert C.act_quant(gu.data_ptr(), T, F, act, w.data_ptr(), 1e-5, q.data_ptr(), F, s.data_ptr(), rs.data_ptr()) == 0
            outs.append((gu, q, s, rs))
    finally:
        set_threads(old)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    assert outs[0][1].abs().amax(dim=1).eq(127).all() and torch.equal(outs[0][3], outs[0][1].sum(dim=1, dtype=torch.int32))


@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t"])
def test_greedy_tokens_identical_to_reference(name: str) -> None:
    model = _frozen(name, seed=4)
    engine = Engine(EngineModel.from_transformer(model, head="f32"), kv_dtype="f32")
    prompt = [5, 17, 42, 7, 300, 12]
    params = SamplingParams(max_tokens=24)
    ref = list(generate_ids(model, prompt, params))
    got = list(engine.generate_ids(prompt, params))
    assert len(ref) == 24 and got == ref
    assert len(set(ref)) > 1  # not a degenerate constant stream


def test_lookup_table_layout_decodes_like_reference(tmp_path) -> None:
    """A model packed in 1.67bit-lut decodes through the lookup-table GEMV: same greedy tokens."""
    model = _frozen("tiny-2b4t", seed=4, layout="1.67bit-lut")
    engine = Engine(EngineModel.from_transformer(model, head="f32"), kv_dtype="f32")
    assert engine.model.use_fast_path
    prompt = [5, 17, 42, 7, 300, 12]
    params = SamplingParams(max_tokens=16)
    ref = list(generate_ids(model, prompt, params))
    assert list(engine.generate_ids(prompt, params)) == ref and len(set(ref)) > 1


@pytest.mark.parametrize("kv", ["f16", "bf16", "int8"])
def test_compact_kv_cache_stays_close(kv: str) -> None:
    model = _frozen("tiny-2b4t", seed=5)
    em = EngineModel.from_transformer(model, head="f32")
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = model(torch.tensor([ids]))[0]
    cache = em.new_cache(1, 64, kv)
    em.prefill(ids[:20], cache)
    errs = []
    for p in range(20, 40):
        errs.append(float((em.decode([ids[p]], cache, [0], [p])[0] - ref[p]).abs().max()))
    scale = float(ref.abs().max())
    assert max(errs) < 0.1 * scale  # a compact cache perturbs the logits only slightly...
    assert max(errs) > 0 or kv != "int8"  # ...and int8 storage really is lossy


@pytest.mark.parametrize("fmt", ["int8", "int6", "bf16"])
def test_compact_head_close_to_float(fmt: str) -> None:
    model = _frozen("tiny-2b4t", seed=7)
    ids = list(range(3, 40))
    exact = Engine(EngineModel.from_transformer(model, head="f32"), kv_dtype="f32").logits(ids)
    compact = Engine(EngineModel.from_transformer(model, head=fmt), kv_dtype="f32")
    got = compact.logits(ids)
    assert compact.model.head.nbytes < EngineModel.from_transformer(model, head="f32").head.nbytes
    err = (got - exact).abs().max()
    assert 0 < err < 0.06 * exact.abs().max()  # tied: the table is the embedding too
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("layout", ["2bit", "1.6bit", "2bit-r4", "1.6bit-r4", "1.67bit-lut"])
def test_load_from_directory_equals_load_packed(tmp_path, layout: str) -> None:
    model = _frozen("tiny", seed=8)
    d = save_packed(model, tmp_path / "m", layout=layout, dtype="float32")
    ref = load_packed(d)
    engine = Engine(EngineModel.load(d, head="f32"), kv_dtype="f32")
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    torch.testing.assert_close(engine.logits(ids), ref(torch.tensor([ids]))[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["1.6bit-r4", "1.67bit-lut"])
def test_create_random_model_streams_a_loadable_file(tmp_path, layout: str) -> None:
    cfg = get_config("tiny-2b4t")
    d = create_random_model(tmp_path / "r", cfg, layout=layout, seed=3)
    ref = load_packed(d)  # unpacks (and so validates) every weight
    engine = Engine(EngineModel.load(d, head="f32"), kv_dtype="f32")
    ids = [9, 8, 7, 6, 5]
    out = engine.logits(ids)
    assert out.std() > 0
    torch.testing.assert_close(out, ref(torch.tensor([ids]))[0], atol=1e-4, rtol=1e-4)
    # another seed gives other weights
    d2 = create_random_model(tmp_path / "r2", cfg, layout=layout, seed=4)
    assert not torch.equal(Engine(EngineModel.load(d2, head="f32")).logits(ids), out)


@pytest.mark.parametrize("layout", ["2bit-r4", "1.67bit-lut"])
def test_mapped_and_copied_weights_give_identical_logits(tmp_path, layout: str) -> None:
    from bittern.hugepages import huge_pages_available

    d = save_packed(_frozen("tiny-2b4t", seed=9), tmp_path / "m", layout=layout, dtype="float32")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    mapped = EngineModel.load(d, head="int6", mmap_weights=True)
    copied = EngineModel.load(d, head="int6", mmap_weights=False)
    assert mapped.weights_mapped and not mapped.weights_on_huge_pages
    assert not copied.weights_mapped and copied.weights_on_huge_pages == huge_pages_available()
    ref = Engine(mapped, kv_dtype="f32").logits(ids)
    assert ref.std() > 0
    assert torch.equal(Engine(copied, kv_dtype="f32").logits(ids), ref)
    # the copies are not views of the file: every packed tensor of the copied model has its own bytes
    ptrs_mapped = {w.packed.data_ptr() for L in mapped.layers for g in (L.qkv, L.o, L.gate_up, L.down) for w in g.weights}
    ptrs_copied = {w.packed.data_ptr() for L in copied.layers for g in (L.qkv, L.o, L.gate_up, L.down) for w in g.weights}
    assert len(ptrs_copied) == len(ptrs_mapped) == 7 * copied.config.num_layers and not ptrs_copied & ptrs_mapped
    # the mapped model still reads its (released-and-re-read, in the copied model's case) file correctly
    assert torch.equal(Engine(EngineModel.load(d, head="int6", mmap_weights=True), kv_dtype="f32").logits(ids), ref)


def test_default_copies_weights_only_when_huge_pages_exist_and_memory_allows(monkeypatch) -> None:
    from bittern.engine import model as engine_model

    monkeypatch.setattr(engine_model, "mem_available_bytes", lambda: 10 << 30)
    monkeypatch.setattr(engine_model, "huge_pages_available", lambda: True)
    assert engine_model.keep_weights_mapped(1 << 30) is False  # 1 GB of 10 GB free: copied
    assert engine_model.keep_weights_mapped(6 << 30) is True  # more than half of what is free: mapped
    assert engine_model.keep_weights_mapped(1 << 30, mmap_weights=True) is True  # the caller decides
    assert engine_model.keep_weights_mapped(6 << 30, mmap_weights=False) is False
    monkeypatch.setattr(engine_model, "mem_available_bytes", lambda: None)
    assert engine_model.keep_weights_mapped(1 << 20) is True  # free memory unknown: mapped
    monkeypatch.setattr(engine_model, "mem_available_bytes", lambda: 10 << 30)
    monkeypatch.setattr(engine_model, "huge_pages_available", lambda: False)
    assert engine_model.keep_weights_mapped(1 << 20) is True  # no huge pages: nothing to gain from a copy
