"""Training: data shards, the training loop (BitNet b1.58 and FP, one or many processes), checkpoints,
FP → ternary conversion and export to a packed model directory.

Each file has one job: :mod:`.data` (shards and batches), :mod:`.config` (the run's settings),
:mod:`.schedules` (lr / weight decay / quantisation ramp), :mod:`.checkpoint`, :mod:`.distributed`,
:mod:`.metrics`, :mod:`.trainer` (the loop), :mod:`.hf_llama` (reading an FP LLaMA checkpoint),
:mod:`.export` (run → packed model).
"""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path | None:
    """The packed BitNet b1.58 model shipped with bittern (``bittern/default_model``), or None if absent."""
    d = Path(__file__).resolve().parent.parent / "default_model"
    return d if (d / "config.json").is_file() and (d / "model.safetensors").is_file() else None


__all__ = ["default_model_path"]
