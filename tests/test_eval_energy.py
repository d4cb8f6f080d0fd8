"""Energy model: operation counts and joules per token against hand-computed values."""

from __future__ import annotations

import pytest

from bittern.configs import get_config
from bittern.eval.energy import OpCounts, count_ops, energy_per_token, energy_table


def test_counts_match_hand_computation_tiny():
    # tiny: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads (kv_dim 32), FFN 176, vocab 512
    cfg = get_config("tiny")
    bn = count_ops(cfg, "bitnet", context=10)
    fp = count_ops(cfg, "fp", context=10)
    macs = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 176 * 64)  # = 92160
    assert macs == 92160
    assert bn["linear"] == OpCounts(int8_add=92160)
    assert fp["linear"] == OpCounts(fp16_add=92160, fp16_mul=92160)
    # quantised inputs per block: attention in (64), o_proj in (64), MLP in (64), down_proj in (176) -> 368;
    # rescaled outputs per block: 64 + 32 + 32 + 64 + 176 + 176 + 64 = 608
    assert bn["quant"] == OpCounts(fp16_add=2 * 368, fp16_mul=2 * (368 + 608))
    assert fp["quant"] == OpCounts()
    # attention: q.k and p.v, 4 heads x 16 dims x 10 positions each, 2 layers
    assert bn["attention"] == fp["attention"] == OpCounts(fp16_add=2560, fp16_mul=2560)
    assert bn["lm_head"] == OpCounts(fp16_add=32768, fp16_mul=32768)


def test_joules_per_token_tiny():
    e = energy_per_token(get_config("tiny"), context=10)
    n7 = e["7nm"]
    assert n7["bitnet"]["linear_j"] == pytest.approx(92160 * 0.007e-12)
    assert n7["fp16"]["linear_j"] == pytest.approx(92160 * 0.50e-12)
    assert n7["bitnet"]["total_j"] == pytest.approx(19090.56e-12)  # 645.12 + 117.76 + 663.68 + 17664 pJ
    assert n7["fp16"]["total_j"] == pytest.approx(63744e-12)  # 46080 + 17664 pJ
    assert n7["linear_ratio"] == pytest.approx(0.5 / 0.007)  # the paper's 71.4x for matrix multiplication
    n45 = e["45nm"]
    assert n45["linear_ratio"] == pytest.approx(1.5 / 0.03)
    assert n45["fp16"]["linear_j"] == pytest.approx(92160 * 1.5e-12)


def test_faq_config_quantises_every_linear_input():
    cfg = get_config("tiny-faq")  # norm inside every BitLinear: q/k/v and gate/up quantise separately
    q = count_ops(cfg, "bitnet", context=1)["quant"]
    h, f = 64, 176
    assert q.fp16_add == 2 * (3 * h + h + 2 * h + f)


def test_ratio_grows_with_model_size_and_bad_input():
    small = energy_per_token(get_config("700M"))["7nm"]["total_ratio"]
    big = energy_per_token(get_config("70B"))["7nm"]["total_ratio"]
    assert 1 < small < big < 0.5 / 0.007
    with pytest.raises(ValueError, match="process node"):
        energy_table("3nm")
    with pytest.raises(ValueError, match="context"):
        count_ops(get_config("tiny"), context=0)
