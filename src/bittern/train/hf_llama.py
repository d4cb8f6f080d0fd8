"""Minimal reading of a Hugging Face LlamaForCausalLM directory (config.json + safetensors) for conversion.

HF names ``model.layers.N.…`` map to ours by dropping the ``model.`` prefix; ``lm_head.weight`` is
the same. Only what FP → ternary fine-tuning needs; full HF import/export lives in
:mod:`bittern.interop`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..configs import ModelConfig
from ..errors import UsageError
from ..modelfile import ModelFileError, read_safetensors

_ARCHS = ("llama", "mistral", "qwen2")


def llama_model_config(hf: dict, linear: str = "bitnet", name: str = "hf-llama", where: str = "config.json") -> ModelConfig:
    """Our :class:`ModelConfig` for an HF LLaMA-family ``config.json`` dict.

    RoPE settings are read as :mod:`bittern.interop.hf` reads them: ``rope_theta`` / ``rope_scaling`` at
    the top level, or transformers 5's ``rope_parameters``; a "linear" or "llama3" scaling is kept as
    ``extra["rope_scaling"]``. A missing ``rms_norm_eps`` is 1e-6, transformers' LlamaConfig default.
    ``where`` names the file in error messages.
    """
    from ..interop.hf import hf_rope_scaling

    mt = hf.get("model_type")
    if mt not in _ARCHS:
        raise UsageError(f"{where}: model_type {mt!r} is not a LLaMA-family model (expected one of {_ARCHS})")
    if hf.get("hidden_act", "silu") != "silu":
        raise UsageError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UsageError("checkpoints with attention or MLP biases are not supported")
    try:
        scaling = hf_rope_scaling(hf, where)
    except ModelFileError as e:
        raise UsageError(str(e)) from None
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    try:
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            raise UsageError(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
        return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                           num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                           intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                           rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                           norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), linear=linear, name=name,
                           extra={"rope_scaling": scaling} if scaling else {})
    except KeyError as e:
        raise UsageError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UsageError(f"{where}: invalid config ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({directory / f for f in weight_map.values()})
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")):
        raise UsageError(f"{directory}: only pickle (.bin) weights found; save with safetensors (save_pretrained(safe_serialization=True))")
    raise UsageError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_llama_checkpoint(directory: str | os.PathLike, linear: str = "bitnet") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of a LlamaForCausalLM directory, in our parameter names, float32."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    config = llama_model_config(json.loads(cfg_path.read_text()), linear=linear, name=directory.name, where=str(cfg_path))
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(directory):
        tensors, _ = read_safetensors(f)
        for k, v in tensors.items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            state[k[len("model."):] if k.startswith("model.") else k] = v.float().clone()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return config, state
