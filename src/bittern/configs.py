"""Model configurations: one dataclass and a table of named sizes used everywhere (CLI, bench, tests).

Parameter counts are computed from the shapes (:meth:`ModelConfig.num_params`), never typed in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape and flavour of a LLaMA-alike transformer.

    ``linear="bitnet"`` gives BitNet b1.58 (ternary weights, int8 activations); ``linear="fp"`` the
    full-precision baseline of the same shape. ``activation`` is ``"swiglu"`` (SiLU-gated) or
    ``"relu2"`` (squared-ReLU-gated, as 2B4T). ``subln`` adds the 2B4T sub-norms before ``o_proj``
    and ``down_proj``; ``bitlinear_norm`` moves the input RMSNorm inside every linear layer and drops
    the block pre-norms (the BitNet FAQ recipe).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    subln: bool = False
    bitlinear_norm: bool = False
    tie_embeddings: bool = False
    linear: str = "bitnet"
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer (got {value!r})")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number (got {value!r})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.activation not in ("swiglu", "relu2"):
            raise ValueError(f"activation must be 'swiglu' or 'relu2', got {self.activation!r}")
        if self.linear not in ("bitnet", "fp"):
            raise ValueError(f"linear must be 'bitnet' or 'fp', got {self.linear!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.head_dim * self.num_kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear layer of one block, by its name."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (f, h),
            "up_proj": (f, h),
            "down_proj": (h, f),
        }

    def num_linear_params(self) -> int:
        """Weights of all (ternary, for BitNet) linear layers: the non-embedding matrix weights."""
        return self.num_layers * sum(o * i for o, i in self.linear_shapes().values())

    def num_norm_params(self) -> int:
        """Gains of all RMSNorms."""
        h, f = self.hidden_size, self.intermediate_size
        if self.bitlinear_norm:
            per_block = 6 * h + f  # a norm inside every linear: q, k, v, o, gate, up (width h), down (f)
        else:
            per_block = 2 * h
        if self.subln:
            per_block += h + f
        return self.num_layers * per_block + h

    def num_embedding_params(self) -> int:
        """Token embedding plus (when untied) the LM head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Total parameters; with ``include_embeddings=False`` the paper's non-embedding count."""
        n = self.num_linear_params() + self.num_norm_params()
        return n + (self.num_embedding_params() if include_embeddings else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the ``model`` section of config.json)."""
        d = dataclasses.asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def _llama(name: str, hidden: int, layers: int, heads: int, ffn: int, kv: int | None = None, vocab: int = 32000, **kw: Any) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, intermediate_size=ffn, name=name, **kw)


CONFIGS: dict[str, ModelConfig] = {
    # test and demo sizes
    "tiny": _llama("tiny", 64, 2, 4, 176, kv=2, vocab=512, max_seq_len=256),
    "tiny-2b4t": _llama("tiny-2b4t", 64, 2, 4, 160, kv=2, vocab=512, max_seq_len=256, activation="relu2",
                        subln=True, tie_embeddings=True, rope_theta=500000.0),
    "tiny-faq": _llama("tiny-faq", 64, 2, 4, 176, vocab=512, max_seq_len=256, bitlinear_norm=True),
    "demo": _llama("demo", 192, 4, 6, 512, kv=2, vocab=1024, max_seq_len=256, tie_embeddings=True),
    # the BitNet b1.58 paper's LLaMA-shaped sizes (vocab 32000, LLaMA tokenizer)
    "700M": _llama("700M", 1536, 24, 16, 4096),
    "1.3B": _llama("1.3B", 2048, 24, 32, 5460),
    "3B": _llama("3B", 3200, 26, 32, 8640),
    "3.9B": _llama("3.9B", 3200, 26, 32, 11008),
    "7B": _llama("7B", 4096, 32, 32, 11008),
    "13B": _llama("13B", 5120, 40, 40, 13824),
    "70B": _llama("70B", 8192, 80, 64, 28672, kv=8),
    # bitnet.cpp's 100B dummy shape (random weights, for scale benchmarks)
    "100B": _llama("100B", 8192, 78, 64, 45568, kv=8),
    # microsoft/bitnet-b1.58-2B-4T
    "2B4T": _llama("2B4T", 2560, 30, 20, 6912, kv=5, vocab=128256, max_seq_len=4096, activation="relu2",
                   subln=True, tie_embeddings=True, rope_theta=500000.0),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named config, optionally with fields overridden; unknown names list the known ones."""
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
