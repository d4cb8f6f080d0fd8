"""A finished training run → a packed model directory the engine loads (:func:`bittern.modelfile.save_packed`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..configs import ModelConfig
from ..errors import UsageError
from ..model import Transformer
from ..modelfile import save_packed
from . import checkpoint as ckpt


def load_run_model(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> tuple[Transformer, dict[str, Any]]:
    """The trained model (latent weights) of a run's latest checkpoint (or ``checkpoint``) and its state."""
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise UsageError(f"{run_dir}: no checkpoint found (is this a training run directory?)")
    weights, state = ckpt.load_model_weights(path)
    config = ModelConfig.from_dict(state["model_config"])
    model = Transformer(config)
    if config.tie_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), state


def pack_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, layout: str = "2bit", dtype: str = "float16",
             checkpoint: str | os.PathLike | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Pack the run's BitNet model with its tokenizer into ``out_dir``; returns ``out_dir``."""
    model, state = load_run_model(run_dir, checkpoint)
    if model.config.linear != "bitnet":
        raise UsageError(f"{run_dir}: an FP model (linear='fp') cannot be packed to ternary; train with model.linear=bitnet")
    tok = Path(run_dir) / "tokenizer.json"
    info = {"trained_by": "bittern train", "step": state["step"], "tokens": state["tokens"],
            "train_seconds": round(state.get("elapsed", 0.0), 1)}
    info.update(meta or {})
    return save_packed(model, out_dir, layout=layout, dtype=dtype, tokenizer_file=tok if tok.is_file() else None, meta=info)
