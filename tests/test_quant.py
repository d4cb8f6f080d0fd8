"""Quantisation: hand-computed cases and edge cases (DESIGN.md §2)."""

import pytest
import torch

from bittern.quant import (NonFiniteError, activation_scale, fake_quant_activation, quantize_activation,
                           quantize_weight, rescale, ste_activation, ste_weight, ternary_codes, weight_scale)


def test_weight_absmean_hand_computed():
    w = torch.tensor([[0.5, -1.5, 0.0], [2.0, -0.2, 0.3]])
    # mean |w| = (0.5 + 1.5 + 0 + 2 + 0.2 + 0.3) / 6 = 0.75
    codes, gamma = quantize_weight(w)
    assert gamma.item() == pytest.approx(0.75)
    # w / gamma = [0.667, -2, 0], [2.667, -0.267, 0.4] -> round, clip
    assert codes.tolist() == [[1, -1, 0], [1, 0, 0]]
    assert codes.dtype == torch.int8


def test_weight_round_half_to_even():
    # gamma = mean(|[0.5, 1.5, 2.0, 0.0]|) = 1.0: 0.5 -> 0, 1.5 -> 2 -> clipped 1
    codes, gamma = quantize_weight(torch.tensor([[0.5, -0.5, 1.5, 0.0]]) * 1.0)
    assert gamma.item() == pytest.approx(0.625)
    w = torch.tensor([[0.5, -0.5, 2.5, 0.5]])  # gamma = 1.0
    assert ternary_codes(w, torch.tensor(1.0)).tolist() == [[0, 0, 1, 0]]


def test_all_zero_weight_uses_floor():
    codes, gamma = quantize_weight(torch.zeros(3, 4))
    assert gamma.item() == pytest.approx(1e-5)
    assert codes.abs().sum() == 0


def test_activation_absmax_hand_computed():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]])
    q, s = quantize_activation(x)
    assert s[0].item() == pytest.approx(63.5)
    assert q[0].tolist() == [64, -127, 32]  # 63.5 -> 64 (half to even), 31.75 -> 32
    assert s[1].item() == pytest.approx(127 / 1e-5)  # all-zero row: floored max
    assert q[1].tolist() == [0, 0, 0]
    assert q[2].tolist() == [127, 0, -64]  # 1 * 0.5 = 0.5 -> 0 (half to even); -63.5 -> -64
    assert q.dtype == torch.int8


def test_single_huge_outlier_crushes_the_rest_but_stays_finite():
    x = torch.tensor([[1e6, 1.0, -1.0, 3.0]])
    q, s = quantize_activation(x)
    assert q.tolist() == [[127, 0, 0, 0]]
    y = fake_quant_activation(x)
    assert torch.isfinite(y).all() and y[0, 0].item() == pytest.approx(1e6, rel=1e-6)
    w = torch.zeros(2, 8)
    w[0, 0] = 1e4
    w[1, 3] = 0.5
    codes, gamma = quantize_weight(w)
    assert codes[0, 0] == 1 and codes[1, 3] == 0  # the outlier sets gamma; small weights round to zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes_agree_with_float32(dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 33).to(dtype)
    q, s = quantize_activation(x)
    q32, s32 = quantize_activation(x.float())
    assert torch.equal(q, q32) and torch.equal(s, s32)
    w = torch.randn(7, 9).to(dtype)
    c, g = quantize_weight(w)
    c32, g32 = quantize_weight(w.float())
    assert torch.equal(c, c32) and torch.equal(g, g32)
    assert fake_quant_activation(x).dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise_in_packing_path(bad):
    w = torch.randn(4, 4)
    w[2, 1] = bad
    with pytest.raises(NonFiniteError, match="non-finite"):
        quantize_weight(w)
    from bittern.pack import TernaryWeight

    with pytest.raises(NonFiniteError):
        TernaryWeight.from_float(w)


def test_rescale_is_the_canonical_formula():
    acc = torch.tensor([[100, -7]], dtype=torch.int32)
    s = torch.tensor([[2.0]])
    gamma = torch.tensor(0.5)
    assert rescale(acc, s, gamma).tolist() == [[25.0, -1.75]]
    assert activation_scale(torch.tensor([[0.5, -4.0]])).item() == pytest.approx(127 / 4)


def test_straight_through_estimator_passes_gradients_unchanged():
    torch.manual_seed(1)
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    wq, xq = ste_weight(w), ste_activation(x)
    assert torch.allclose(wq, ternary_codes(w).float() * weight_scale(w))
    (wq.sum() * 2 + (xq * 3).sum()).backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_quant_strength_ramp_interpolates():
    w = torch.randn(4, 4)
    assert torch.equal(ste_weight(w, 0.0), w)
    half = ste_weight(w, 0.5)
    assert torch.allclose(half, 0.5 * w + 0.5 * ste_weight(w, 1.0))
