"""Learning-rate, weight-decay and quantisation-ramp schedules: pure functions of the step.

``step`` counts optimizer steps from 0; ``total`` is the number of steps of the run.

- :func:`bitnet_lr` — the BitNet b1.58 two-stage schedule (Training Tips FAQ): linear warm-up to
  ``peak``, then one linear decay line from ``peak`` to ``final_ratio * peak``, multiplied by
  ``stage2_ratio`` from mid-training on (a sharp drop; 1.5e-3 → 1e-3 at 700M is a ratio of 2/3).
- :func:`cosine_lr` — warm-up then cosine decay to ``final_ratio * peak`` (the FP baseline).
- :func:`two_stage_weight_decay` — ``wd`` for the first half, 0 after (BitNet).
- :func:`quant_ramp` — lambda = min(step / warmup, 1) for FP → ternary conversion.
"""

from __future__ import annotations

import math


def _warmup(step: int, peak: float, warmup: int) -> float | None:
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    return None


def bitnet_lr(step: int, total: int, peak: float, warmup: int = 0, stage2_ratio: float = 2 / 3,
              final_ratio: float = 0.1) -> float:
    """Two-stage BitNet learning rate at ``step`` (see the module docstring)."""
    w = _warmup(step, peak, warmup)
    if w is not None:
        return w
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    lr = peak * (1.0 - (1.0 - final_ratio) * frac)
    return lr * stage2_ratio if step >= total // 2 else lr


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0, final_ratio: float = 0.1) -> float:
    """Warm-up then cosine decay from ``peak`` to ``final_ratio * peak`` at ``total``."""
    w = _warmup(step, peak, warmup)
    if w is not None:
        return w
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def constant_lr(step: int, total: int, peak: float, warmup: int = 0, **_: float) -> float:
    """Warm-up then constant ``peak``."""
    w = _warmup(step, peak, warmup)
    return peak if w is None else w


def two_stage_weight_decay(step: int, total: int, wd: float) -> float:
    """BitNet weight decay: ``wd`` before mid-training, 0 from ``total // 2`` on."""
    return wd if step < total // 2 else 0.0


def constant_weight_decay(step: int, total: int, wd: float) -> float:
    """The same weight decay throughout."""
    return wd


def quant_ramp(step: int, warmup: int) -> float:
    """Quantisation strength lambda = min(step / warmup, 1) (1 at once when ``warmup`` is 0)."""
    return 1.0 if warmup <= 0 else min(step / warmup, 1.0)


LR_SCHEDULES = {"bitnet": bitnet_lr, "cosine": cosine_lr, "constant": constant_lr}
WD_SCHEDULES = {"two-stage": two_stage_weight_decay, "constant": constant_weight_decay}


def lr_at(name: str, step: int, total: int, peak: float, warmup: int, stage2_ratio: float, final_ratio: float) -> float:
    """The learning rate of schedule ``name`` at ``step``."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; known: {', '.join(LR_SCHEDULES)}")
    if name == "bitnet":
        return bitnet_lr(step, total, peak, warmup, stage2_ratio, final_ratio)
    return LR_SCHEDULES[name](step, total, peak, warmup, final_ratio=final_ratio)


def wd_at(name: str, step: int, total: int, wd: float) -> float:
    """The weight decay of schedule ``name`` at ``step``."""
    if name not in WD_SCHEDULES:
        raise ValueError(f"unknown weight-decay schedule {name!r}; known: {', '.join(WD_SCHEDULES)}")
    return WD_SCHEDULES[name](step, total, wd)
