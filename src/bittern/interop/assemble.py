"""Build a frozen packed :class:`~bittern.model.Transformer` from per-tensor pieces of a foreign file.

Importers (Hugging Face, GGUF) translate names and decode weights; this module is where the pieces
become a model: every linear layer is a :class:`~bittern.layers.PackedLinear` over ternary codes and
one scale, every other parameter is checked against the config's shape and made float.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..configs import ModelConfig
from ..layers import BitLinear, PackedLinear
from ..model import Transformer, rope_tables
from ..modelfile import ModelFileError
from ..pack import TernaryWeight

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_names(config: ModelConfig) -> list[str]:
    """Qualified names (no ``.weight``) of every ternary linear layer of a model with ``config``."""
    out = []
    for i in range(config.num_layers):
        for n in LINEAR_NAMES:
            part = "self_attn" if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"layers.{i}.{part}.{n}")
    return out


def float_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every non-linear parameter (embeddings, norms, an untied LM head)."""
    with torch.device("meta"):
        model = Transformer(config)
    lin = {f"{n}.weight" for n in linear_names(config)}
    shapes = {}
    for name, p in model.named_parameters():
        if name in lin or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        shapes[name] = tuple(p.shape)
    return shapes


def scaled_rope_tables(config: ModelConfig, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables, with Hugging Face ``rope_scaling`` types "linear" and "llama3" applied."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > low_wl, inv / factor, torch.where(wavelen < high_wl, inv, mid))
    else:
        raise ModelFileError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


_MAX_ROPE_BYTES = 4 << 30
_CHUNK = 1 << 24


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check in chunks, so a large embedding needs no full-size temporary."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK))


def check_sizes(config: ModelConfig, where: str) -> None:
    """Refuse configs whose derived buffers (RoPE tables) would be absurdly large: a corrupted file."""
    if config.max_seq_len * config.head_dim * 8 > _MAX_ROPE_BYTES:
        raise ModelFileError(f"{where}: context length {config.max_seq_len} with head_dim {config.head_dim} needs "
                             f"more than 4 GiB of RoPE tables (corrupted config?)")


def assemble_packed(config: ModelConfig, ternary: Callable[[str, int, int], TernaryWeight],
                    floats: Callable[[str, tuple[int, ...]], torch.Tensor], where: str,
                    dtype: torch.dtype | None = torch.float32, rope_scaling: dict[str, Any] | None = None) -> Transformer:
    """A frozen model: ``ternary(name, out, in)`` gives each linear, ``floats(name, shape)`` the rest.

    Both callbacks are called once per tensor, in model order, so a streaming source never holds more
    than one decoded tensor besides the model itself. Shapes are checked (``where`` names the source).
    ``dtype=None`` keeps float tensors as stored (memory-mapped sources stay mapped).
    """
    if config.linear != "bitnet":
        raise ModelFileError(f"{where}: only a BitNet config (linear='bitnet') can be assembled into a packed model")
    check_sizes(config, where)
    with torch.device("meta"):
        model = Transformer(config)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, BitLinear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            w = ternary(full, child.out_features, child.in_features)
            if (w.out_features, w.in_features) != (child.out_features, child.in_features):
                raise ModelFileError(f"{where}: {full} has shape {(w.out_features, w.in_features)}, "
                                     f"the config expects {(child.out_features, child.in_features)}")
            if not math.isfinite(float(w.scale)) or float(w.scale) <= 0:
                raise ModelFileError(f"{where}: {full} has a scale of {float(w.scale)} (must be positive and finite)")
            setattr(module, child_name, PackedLinear(w, child.norm))
    state = {}
    for name, shape in float_param_shapes(config).items():
        t = floats(name, shape)
        if tuple(t.shape) != tuple(shape):
            raise ModelFileError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the config expects {tuple(shape)}")
        if not t.is_floating_point():
            raise ModelFileError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected a float type")
        if not _all_finite(t):
            raise ModelFileError(f"{where}: tensor {name!r} holds NaN or Inf")
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
            if not _all_finite(t):
                raise ModelFileError(f"{where}: tensor {name!r} overflows {dtype} (choose a wider float type)")
        state[name] = nn.Parameter(t, requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = scaled_rope_tables(config, rope_scaling)
    model.requires_grad_(False)
    return model.eval()
