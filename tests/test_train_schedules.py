"""Schedules match their formulas; training configs parse, override and reject bad values."""

from __future__ import annotations

import json
import math

import pytest

from bittern.errors import UsageError
from bittern.train.config import TrainConfig, apply_overrides, load_train_config
from bittern.train.schedules import (bitnet_lr, constant_lr, cosine_lr, lr_at, quant_ramp, two_stage_weight_decay, wd_at)


def test_bitnet_two_stage_lr_formula():
    total, peak, warm = 1000, 1.5e-3, 100
    for s in range(warm):
        assert bitnet_lr(s, total, peak, warm) == pytest.approx(peak * (s + 1) / warm)
    for s in (100, 250, 499, 500, 750, 999):
        line = peak * (1 - 0.9 * (s - warm) / (total - warm))
        want = line * (2 / 3 if s >= 500 else 1.0)
        assert bitnet_lr(s, total, peak, warm) == pytest.approx(want)
    # the sharp drop at mid-training: 1.5e-3-scale peak falls by a third in one step
    before, after = bitnet_lr(499, total, peak, warm), bitnet_lr(500, total, peak, warm)
    assert after / before == pytest.approx(2 / 3, rel=1e-2)
    # decreasing within each stage
    first = [bitnet_lr(s, total, peak, warm) for s in range(warm, 500)]
    second = [bitnet_lr(s, total, peak, warm) for s in range(500, total)]
    assert all(a > b for a, b in zip(first, first[1:])) and all(a > b for a, b in zip(second, second[1:]))
    assert bitnet_lr(total - 1, total, peak, warm) == pytest.approx(peak * (1 - 0.9 * 899 / 900) * 2 / 3)


def test_cosine_lr_formula():
    total, peak, warm = 200, 1e-3, 20
    assert cosine_lr(0, total, peak, warm) == pytest.approx(peak / warm)
    assert cosine_lr(warm, total, peak, warm) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert cosine_lr(mid, total, peak, warm) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert cosine_lr(total, total, peak, warm) == pytest.approx(0.1 * peak)
    s = 77
    frac = (s - warm) / (total - warm)
    assert cosine_lr(s, total, peak, warm) == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))
    assert constant_lr(150, total, peak, warm) == peak


def test_weight_decay_and_quant_ramp():
    assert [two_stage_weight_decay(s, 10, 0.1) for s in range(10)] == [0.1] * 5 + [0.0] * 5
    assert wd_at("constant", 9, 10, 0.1) == 0.1
    assert [quant_ramp(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert quant_ramp(0, 0) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at("linear", 0, 10, 1e-3, 0, 0.5, 0.1)


def test_auto_schedules_and_lr_defaults_follow_the_model():
    bit = TrainConfig(data="x", model={"name": "tiny"})
    fp = TrainConfig(data="x", model={"name": "tiny", "linear": "fp"})
    assert (bit.lr_schedule_name, bit.wd_schedule_name) == ("bitnet", "two-stage")
    assert (fp.lr_schedule_name, fp.wd_schedule_name) == ("cosine", "constant")
    assert bit.peak_lr == pytest.approx(6 * fp.peak_lr)


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data": "d", "model": {"name": "tiny"}, "steps": 5}))
    cfg = load_train_config(f, ["lr=1e-3", "model.hidden_size=128", "model.num_heads=4", "betas=[0.8,0.9]", "out_dir=runs/x"])
    assert cfg.lr == 1e-3 and cfg.steps == 5 and cfg.betas == (0.8, 0.9) and cfg.out_dir == "runs/x"
    assert cfg.model_config().hidden_size == 128 and cfg.model_config().num_layers == 2
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(UsageError, match="unknown training config keys"):
        load_train_config(f, ["stepz=3"])
    with pytest.raises(UsageError, match="steps must be positive"):
        load_train_config(f, ["steps=0"])
    with pytest.raises(UsageError, match="not key=value"):
        load_train_config(f, ["steps"])
    with pytest.raises(UsageError, match="no such config file"):
        load_train_config(tmp_path / "missing.json")


@pytest.mark.parametrize("override, message", [
    ("steps=1.5", "steps must be an integer, got 1.5"),
    ("steps=true", "steps must be an integer, got true"),
    ("lr=nan", 'lr must be a finite number, got "nan"'),
    ("lr=NaN", "lr must be a finite number, got nan"),
    ("lr=-1e-3", "lr must be > 0"),
    ("warmup=abc", 'warmup must be an integer, got "abc"'),
    ("quant_ramp_steps=abc", 'quant_ramp_steps must be an integer, got "abc"'),
    ("betas=abc", r'betas must be a pair of numbers in \[0, 1\).*got "abc"'),
    ("betas=[0.9]", r"betas must be a pair .*got \[0.9\]"),
    ("betas=[0.9,1.0]", r"betas must be a pair .*got \[0.9, 1.0\]"),
    ("eval_windows=0", "eval_windows must be positive, got 0"),
    ("weight_decay=Infinity", "weight_decay must be a finite number"),
    ("final_lr_ratio=2", "final_lr_ratio must be >= 0 and <= 1, got 2"),
    ("stage2_ratio=0", "stage2_ratio must be > 0 and <= 1, got 0"),
    ("progress=no", 'progress must be true or false, got "no"'),
    ("model=5", "model must be a named config"),
    ("model.num_heads=3", "bad model section .*not divisible by num_heads 3"),
])
def test_config_fields_are_type_and_range_checked(tmp_path, override, message):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data": "d", "model": {"name": "tiny"}, "steps": 5}))
    with pytest.raises(UsageError, match=message):
        load_train_config(f, [override])


def test_finetune_checks_steps_before_using_them(tmp_path):
    from bittern.train.convert import finetune_ternary

    with pytest.raises(UsageError, match='steps must be an integer, got "abc"'):
        finetune_ternary(tmp_path / "hf", tmp_path / "data", tmp_path / "out", overrides=["steps=abc"])
