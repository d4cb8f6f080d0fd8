"""Build a frozen packed :class:`~bittern.model.Transformer` from per-tensor pieces of a foreign file,
or stream those pieces straight to a writer without building the model.

Importers (Hugging Face, GGUF) translate names and decode weights; this module is where the pieces
become a model: every linear layer is a :class:`~bittern.layers.PackedLinear` over ternary codes and
one scale, every other parameter is checked against the config's shape and made float.

Writers (bittern, HF, GGUF) read a :class:`TensorSource`: per-tensor access to a model. A
:class:`ModelSource` wraps a built model; a :class:`StreamingSource` decodes each tensor from its
file only when a writer asks for it (with the same checks as :func:`assemble_packed`) and keeps none,
so converting a checkpoint holds about one tensor at a time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from ..configs import ModelConfig
from ..layers import BitLinear, PackedLinear
from ..model import Transformer, check_rope_scaling, scaled_rope_tables
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
    """Name -> shape of every non-linear parameter (embeddings, norms, an untied LM head), in the order of
    ``Transformer(config).named_parameters()`` (worked out from the config: no model is built)."""
    h, f = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    inner = config.bitlinear_norm
    for i in range(config.num_layers):
        p = f"layers.{i}."
        if not inner:
            shapes[p + "input_layernorm.weight"] = (h,)
        if inner:
            shapes.update({f"{p}self_attn.{n}.norm.weight": (h,) for n in ("q_proj", "k_proj", "v_proj")})
        if config.subln:
            shapes[p + "self_attn.attn_sub_norm.weight"] = (h,)
        if inner:
            shapes[p + "self_attn.o_proj.norm.weight"] = (h,)
        else:
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        if inner:
            shapes.update({f"{p}mlp.{n}.norm.weight": (h,) for n in ("gate_proj", "up_proj")})
        if config.subln:
            shapes[p + "mlp.ffn_sub_norm.weight"] = (f,)
        if inner:
            shapes[p + "mlp.down_proj.norm.weight"] = (f,)
    shapes["norm.weight"] = (h,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


_MAX_ROPE_BYTES = 4 << 30
_CHUNK = 1 << 20  # values per finiteness check: temporaries stay a few MB whatever the tensor


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check in chunks, so a large embedding needs no full-size temporary."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK))


def check_sizes(config: ModelConfig, where: str) -> None:
    """Refuse configs whose derived buffers (RoPE tables) would be absurdly large: a corrupted file."""
    if config.max_seq_len * config.head_dim * 8 > _MAX_ROPE_BYTES:
        raise ModelFileError(f"{where}: context length {config.max_seq_len} with head_dim {config.head_dim} needs "
                             f"more than 4 GiB of RoPE tables (corrupted config?)")


def _checked_ternary(w: TernaryWeight, name: str, out: int, inp: int, where: str) -> TernaryWeight:
    if (w.out_features, w.in_features) != (out, inp):
        raise ModelFileError(f"{where}: {name} has shape {(w.out_features, w.in_features)}, "
                             f"the config expects {(out, inp)}")
    if not math.isfinite(float(w.scale)) or float(w.scale) <= 0:
        raise ModelFileError(f"{where}: {name} has a scale of {float(w.scale)} (must be positive and finite)")
    return w


def _checked_float(t: torch.Tensor, name: str, shape: tuple[int, ...], where: str,
                   dtype: torch.dtype | None) -> torch.Tensor:
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
    return t


def _checked_scaling(config: ModelConfig, where: str) -> None:
    try:
        check_rope_scaling(config.extra.get("rope_scaling"))
    except ValueError as e:
        raise ModelFileError(f"{where}: {e}") from None


def assemble_packed(config: ModelConfig, ternary: Callable[[str, int, int], TernaryWeight],
                    floats: Callable[[str, tuple[int, ...]], torch.Tensor], where: str,
                    dtype: torch.dtype | None = torch.float32, rope_scaling: dict[str, Any] | None = None) -> Transformer:
    """A frozen model: ``ternary(name, out, in)`` gives each linear, ``floats(name, shape)`` the rest.

    Both callbacks are called once per tensor, in model order, so a streaming source never holds more
    than one decoded tensor besides the model itself. Shapes are checked (``where`` names the source).
    ``dtype=None`` keeps float tensors as stored (memory-mapped sources stay mapped).
    ``rope_scaling`` (HF ``rope_scaling``) is recorded as ``config.extra["rope_scaling"]``, so a model
    saved from the result and reopened builds the same RoPE tables.
    """
    if config.linear != "bitnet":
        raise ModelFileError(f"{where}: only a BitNet config (linear='bitnet') can be assembled into a packed model")
    if rope_scaling is not None:
        config = config.replace(extra={**config.extra, "rope_scaling": rope_scaling})
    check_sizes(config, where)
    _checked_scaling(config, where)
    with torch.device("meta"):
        model = Transformer(config)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, BitLinear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            w = _checked_ternary(ternary(full, child.out_features, child.in_features), full,
                                 child.out_features, child.in_features, where)
            setattr(module, child_name, PackedLinear(w, child.norm))
    state = {}
    for name, shape in float_param_shapes(config).items():
        state[name] = nn.Parameter(_checked_float(floats(name, shape), name, shape, where, dtype), requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = scaled_rope_tables(config, config.extra.get("rope_scaling"))
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------- tensor sources for writers


def release_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the OS (no-op elsewhere).

    Decoding one tensor after another leaves large freed blocks in the malloc heap, which would keep
    the process's resident size at the high-water mark of every temporary seen so far.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class TensorSource(ABC):
    """Per-tensor access to a BitNet model for writers: its config, ternary linears and float parameters.

    Linear names are those of :func:`linear_names`, float names those of :func:`float_param_shapes`.
    """

    config: ModelConfig

    def linear_shape(self, name: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of linear ``name``."""
        cfg = self.config
        leaf = name.rsplit(".", 1)[-1]
        h, kv, f = cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size
        shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                  "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
        if leaf not in shapes:
            raise KeyError(f"{name} is not a linear layer")
        return shapes[leaf]

    def float_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every float parameter a writer stores (no tied LM head)."""
        return float_param_shapes(self.config)

    @abstractmethod
    def ternary(self, name: str) -> TernaryWeight:
        """The ternary weight of linear ``name``."""

    def scale(self, name: str) -> float:
        """gamma of linear ``name``."""
        return float(self.ternary(name).scale)

    @abstractmethod
    def floats(self, name: str) -> torch.Tensor:
        """Float parameter ``name``, in its stored dtype."""


class ModelSource(TensorSource):
    """A :class:`TensorSource` over a built :class:`Transformer` (packed, or latent BitLinear weights)."""

    def __init__(self, model: Transformer) -> None:
        if model.config.linear != "bitnet":
            raise ValueError("only a BitNet model (linear='bitnet') can be exported")
        self.model = model
        self.config = model.config

    def linear_shape(self, name: str) -> tuple[int, int]:
        m = self.model.get_submodule(name)
        return m.out_features, m.in_features

    def float_shapes(self) -> dict[str, tuple[int, ...]]:
        lin = {f"{n}.weight" for n in linear_names(self.config)}
        return {n: tuple(p.shape) for n, p in self.model.named_parameters()
                if n not in lin and not (n == "lm_head.weight" and self.config.tie_embeddings)}

    def ternary(self, name: str) -> TernaryWeight:
        m = self.model.get_submodule(name)
        if isinstance(m, PackedLinear):
            return m.ternary
        if isinstance(m, BitLinear):
            return TernaryWeight.from_float(m.weight.detach().float())
        raise ValueError(f"{name} is not a ternary linear layer")

    def floats(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach()


class StreamingSource(TensorSource):
    """A :class:`TensorSource` that decodes each tensor from its file on request and keeps none of them.

    ``ternary(name, out, in)`` and ``floats(name, shape)`` are the importer's callbacks, as for
    :func:`assemble_packed`, and their results get the same checks. ``scale(name)``, when given, reads
    a layer's gamma without decoding its codes (a GGUF header lists every gamma before any tensor);
    it must agree with ``ternary``. Only the last ternary weight is cached (writers ask for a layer's
    codes and its scale one after the other) plus every scale.
    """

    def __init__(self, config: ModelConfig, ternary: Callable[[str, int, int], TernaryWeight],
                 floats: Callable[[str, tuple[int, ...]], torch.Tensor], where: str,
                 scale: Callable[[str], float] | None = None) -> None:
        if config.linear != "bitnet":
            raise ModelFileError(f"{where}: only a BitNet config (linear='bitnet') can be converted")
        check_sizes(config, where)
        _checked_scaling(config, where)
        self.config, self.where = config, where
        self._ternary, self._floats, self._scale = ternary, floats, scale
        self._shapes = float_param_shapes(config)
        self._last: tuple[str, TernaryWeight] | None = None
        self._scales: dict[str, float] = {}

    def float_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def ternary(self, name: str) -> TernaryWeight:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None  # drop the previous layer before decoding the next
        release_freed_memory()
        out, inp = self.linear_shape(name)
        w = _checked_ternary(self._ternary(name, out, inp), name, out, inp, self.where)
        if name in self._scales and self._scales[name] != float(w.scale):
            raise ModelFileError(f"{self.where}: {name}: scale {float(w.scale)} differs from the {self._scales[name]} "
                                 "read before (the file changed during conversion?)")
        self._scales[name] = float(w.scale)
        self._last = (name, w)
        return w

    def scale(self, name: str) -> float:
        if name not in self._scales:
            if self._scale is None:
                self.ternary(name)
                self._last = None
            else:
                g = float(self._scale(name))
                if not math.isfinite(g) or g <= 0:
                    raise ModelFileError(f"{self.where}: {name} has a scale of {g} (must be positive and finite)")
                self._scales[name] = g
        return self._scales[name]

    def floats(self, name: str) -> torch.Tensor:
        release_freed_memory()
        if name not in self._shapes:
            raise KeyError(f"{name} is not a float parameter of this model")
        shape = self._shapes[name]
        return _checked_float(self._floats(name, shape), name, shape, self.where, None)


def as_source(model: "Transformer | TensorSource") -> TensorSource:
    """``model`` itself when it is a :class:`TensorSource`, else a :class:`ModelSource` over it."""
    return model if isinstance(model, TensorSource) else ModelSource(model)
