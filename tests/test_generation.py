"""Sampling and the reference generation loops (single sequence and continuous batching)."""

import pytest
import torch

from bittern.batching import BatchGenerator
from bittern.configs import get_config
from bittern.generate import generate_ids
from bittern.model import Transformer
from bittern.sampling import (SamplingParams, apply_repetition_penalty, make_generator, next_token_distribution,
                              sample_next)


@pytest.fixture(scope="module")
def packed_model():
    torch.manual_seed(0)
    return Transformer(get_config("tiny")).freeze()


def test_greedy_is_argmax_and_temperature_sampling_is_seeded():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    assert sample_next(logits, SamplingParams()).tolist() == [1]
    p = SamplingParams(temperature=1.0, seed=7)
    a = [int(sample_next(logits, p, make_generator(7))) for _ in range(5)]
    g1, g2 = make_generator(123), make_generator(123)
    assert [int(sample_next(logits, p, g1)) for _ in range(20)] == [int(sample_next(logits, p, g2)) for _ in range(20)]
    assert len(set(a)) == 1  # a fresh generator with the same seed gives the same first draw


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = make_generator(0)
    draws = lambda p: {int(sample_next(logits, p, g)) for _ in range(300)}  # noqa: E731
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, min_p=0.4)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}


def _filtered_probs_full_sort(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filters written plainly over the whole vocabulary (full sort), as a reference."""
    x = logits.double() / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, 0)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(0)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > p.top_p * cumulative[-1], 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs / probs.sum()


@pytest.mark.parametrize("params", [
    dict(temperature=0.7), dict(temperature=1.3, top_k=50), dict(temperature=0.9, top_p=0.9),
    dict(temperature=1.0, top_p=0.5), dict(temperature=0.8, top_k=200, top_p=0.95),
    dict(temperature=1.0, min_p=0.05), dict(temperature=0.6, top_k=100, top_p=0.8, min_p=0.01),
])
@pytest.mark.parametrize("spread", [0.5, 4.0])  # flat (large nucleus: the top-p search widens) or peaked
def test_next_token_distribution_equals_the_full_sort_definition(params: dict, spread: float) -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(5000, generator=g) * spread
    p = SamplingParams(**params)
    ids, probs = next_token_distribution(logits, p)
    assert ids.unique().numel() == ids.numel() and abs(float(probs.sum()) - 1.0) < 1e-9
    got = torch.zeros(5000, dtype=torch.float64).index_put_((ids,), probs)
    torch.testing.assert_close(got, _filtered_probs_full_sort(logits, p), atol=1e-6, rtol=1e-4)


def test_top_k_keeps_ties_and_draws_follow_the_distribution() -> None:
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, -2.0])
    ids, probs = next_token_distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    assert sorted(ids.tolist()) == [0, 1, 2, 3]  # the k-th largest value is tied three ways: all stay
    p = SamplingParams(temperature=1.0)
    g = make_generator(3)
    n = 20000
    counts = torch.bincount(torch.stack([sample_next(logits[None], p, g)[0] for _ in range(n)]), minlength=6)
    want = torch.softmax(logits.double(), 0) * n
    assert ((counts - want).abs() <= 4 * want.sqrt() + 2).all(), (counts, want)  # within 4 sigma


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]


def test_invalid_sampling_settings_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.0), dict(max_tokens=0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


def test_generation_is_reproducible_with_a_seed(packed_model):
    p = SamplingParams(temperature=0.9, top_k=50, seed=42, max_tokens=20)
    a = list(generate_ids(packed_model, [3, 4, 5], p))
    b = list(generate_ids(packed_model, [3, 4, 5], p))
    c = list(generate_ids(packed_model, [3, 4, 5], SamplingParams(temperature=0.9, top_k=50, seed=43, max_tokens=20)))
    assert a == b and len(a) == 20 and a != c


def test_eos_stops_generation(packed_model):
    free = list(generate_ids(packed_model, [9, 8], SamplingParams(max_tokens=10)))
    stopped = list(generate_ids(packed_model, [9, 8], SamplingParams(max_tokens=10), eos_id=free[2]))
    assert stopped == free[: free.index(free[2]) + 1]


def test_continuous_batching_equals_one_by_one(packed_model):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11], [40, 41, 42, 43], [7] * 9]
    params = [SamplingParams(max_tokens=8 + i, temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(len(prompts))]
    expected = [list(generate_ids(packed_model, p, sp)) for p, sp in zip(prompts, params)]
    batch = BatchGenerator(packed_model, max_batch=3)
    owner, got, waiting = {}, {}, list(range(len(prompts)))
    while waiting or batch.active:
        while waiting and batch.free_slots:
            i = waiting.pop(0)
            owner[batch.add(prompts[i], params[i])] = i
        for out in batch.step():
            got.setdefault(owner[out.request_id], []).append(out.token)
    assert [got[i] for i in range(len(prompts))] == expected


def test_cancel_frees_the_slot(packed_model):
    batch = BatchGenerator(packed_model, max_batch=1)
    rid = batch.add([1, 2], SamplingParams(max_tokens=50))
    batch.step()
    assert batch.free_slots == 0
    with pytest.raises(RuntimeError, match="no free slot"):
        batch.add([3], SamplingParams())
    batch.cancel(rid)
    assert batch.free_slots == 1 and batch.active == 0


def test_sampling_runs_on_one_torch_thread_and_restores_the_setting(monkeypatch):
    seen_threads = []
    real = next_token_distribution

    def spy(row, params):
        seen_threads.append(torch.get_num_threads())
        return real(row, params)

    monkeypatch.setattr("bittern.sampling.next_token_distribution", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits = torch.randn(3, 50)
        sample_next(logits, SamplingParams(temperature=1.0), make_generator(0))
        assert seen_threads == [1, 1, 1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError):  # restored on errors too
            sample_next(logits, SamplingParams(temperature=-1.0), make_generator(0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
