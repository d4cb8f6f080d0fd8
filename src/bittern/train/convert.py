"""FP → BitNet b1.58 conversion by fine-tuning an existing LLaMA-family checkpoint.

Naively quantising a trained FP model starts at the loss of a random model; instead the quantisation
residual is blended in with lambda = min(step / ramp_steps, 1) (HF blog "Fine-tuning LLMs to
1.58bit"; :meth:`bittern.model.Transformer.set_quant_strength`), so the network adapts gradually.
"""

from __future__ import annotations

import os
from typing import Any

from .config import TrainConfig, apply_overrides, read_config_file
from .trainer import train

# defaults for conversion runs; anything in the config file or the overrides wins
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 3e-4, "lr_schedule": "cosine", "wd_schedule": "constant", "weight_decay": 0.0,
                                     "steps": 1000, "warmup": 50}


def finetune_ternary(hf_dir: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
                     config_file: str | os.PathLike | None = None, ramp_steps: int | None = None,
                     overrides: list[str] | None = None, resume: bool = True) -> dict[str, Any]:
    """Fine-tune the FP checkpoint in ``hf_dir`` into BitNet b1.58 on shards ``data``; returns the run summary.

    ``ramp_steps`` defaults to a quarter of the steps.
    """
    base = {**TrainConfig().to_dict(), **FINETUNE_DEFAULTS}
    if config_file:
        base.update(read_config_file(config_file))
    base.update({"init_from": str(hf_dir), "data": str(data), "out_dir": str(out_dir), "model": {"linear": "bitnet"}})
    cfg = TrainConfig.from_dict(apply_overrides(base, overrides or [])).validate()
    if ramp_steps is None and not cfg.quant_ramp_steps:
        ramp_steps = max(1, cfg.steps // 4)
    if ramp_steps is not None:
        cfg.quant_ramp_steps = ramp_steps
        cfg.validate()
    return train(cfg, resume=resume)
