"""The one model definition: a LLaMA-alike decoder serving training, the FP baseline and inference.

Parameter names follow Hugging Face LLaMA (``layers.N.self_attn.q_proj.weight``, ...) without the
``model.`` prefix, plus the 2B4T sub-norms (``attn_sub_norm``, ``ffn_sub_norm``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ModelConfig
from .layers import BitLinear, PackedLinear, RMSNorm, make_linear


class KVCache:
    """Preallocated key/value cache: ``[layers, batch, kv_heads, max_len, head_dim]`` for K and V."""

    def __init__(self, config: ModelConfig, batch_size: int = 1, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.max_len = max_len or config.max_seq_len
        shape = (config.num_layers, batch_size, config.num_kv_heads, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def reset(self) -> None:
        """Forget everything cached (the memory stays allocated)."""
        self.length = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy positions ``0..n`` of every layer from cache row ``src`` to row ``dst``."""
        if not (0 <= src < self.k.shape[1] and 0 <= dst < self.k.shape[1] and 0 <= n <= self.max_len):
            raise ValueError(f"cannot copy {n} positions from row {src} to row {dst}")
        for t in (self.k, self.v):
            t[:, dst, :, :n].copy_(t[:, src, :, :n])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
               slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ``[B, kvh, T, hd]`` and return all keys/values of those rows so far.

        ``start`` is one position for the whole batch, or one per row (``[B]``, decode with T == 1).
        ``slots`` names the cache rows that the batch rows use (default: rows 0..B-1).
        """
        B, T = k.shape[0], k.shape[2]
        rows = slice(0, B) if slots is None else slots
        if isinstance(start, torch.Tensor):
            if T != 1:
                raise ValueError("per-row positions need one new token per row")
            end = int(start.max()) + 1
            if end > self.max_len:
                raise ValueError(f"KV cache overflow: position {end} exceeds its length {self.max_len}")
            index = (torch.arange(B) if slots is None else slots)
            self.k[layer, index, :, start] = k[:, :, 0].to(self.k.dtype)
            self.v[layer, index, :, start] = v[:, :, 0].to(self.v.dtype)
        else:
            end = start + T
            if end > self.max_len:
                raise ValueError(f"KV cache overflow: position {end} exceeds its length {self.max_len}")
            self.k[layer, rows, :, start:end] = k.to(self.k.dtype)
            self.v[layer, rows, :, start:end] = v.to(self.v.dtype)
        return self.k[layer, rows, :, :end], self.v[layer, rows, :, :end]


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_len, head_dim]`` for rotate-half RoPE (HF LLaMA convention)."""
    return _tables(rope_inv_freq(head_dim, theta), max_len)


def _tables(inv_freq: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


ROPE_SCALING_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a Hugging Face ``rope_scaling`` dict; returns it, or None for no (or "default") scaling.

    Raises ValueError naming the problem for an unsupported type or a missing/invalid parameter.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_TYPES)})")
    if kind == "default":
        return None
    need = ["factor"] + (["original_max_position_embeddings"] if kind == "llama3" else [])
    for key in need + [k for k in ("low_freq_factor", "high_freq_factor") if k in scaling]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"rope_scaling {kind!r} needs a positive number {key!r}, got {value!r}")
    if kind == "llama3" and float(scaling.get("high_freq_factor", 4.0)) <= float(scaling.get("low_freq_factor", 1.0)):
        raise ValueError("rope_scaling 'llama3' needs high_freq_factor > low_freq_factor")
    return scaling


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float64), with HF ``rope_scaling`` "linear"/"llama3" applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = check_rope_scaling(scaling)
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen > old_ctx / low, inv / factor, torch.where(wavelen < old_ctx / high, inv, mid))


def scaled_rope_tables(config: ModelConfig, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_seq_len, head_dim]`` of ``config`` with the given HF ``rope_scaling`` applied."""
    return _tables(rope_inv_freq(config.head_dim, config.rope_theta, scaling), config.max_seq_len)


def config_rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of ``config``, honouring ``config.extra["rope_scaling"]`` (set by the HF importer)."""
    return scaled_rope_tables(config, config.extra.get("rope_scaling"))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, hd]`` by the angles for its positions (``cos``/``sin`` ``[T, hd]``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional sub-norm before ``o_proj``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        inner_norm = c.bitlinear_norm
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = make_linear(c.linear, c.hidden_size, c.hidden_size, inner_norm, c.norm_eps)
        self.k_proj = make_linear(c.linear, c.hidden_size, c.kv_dim, inner_norm, c.norm_eps)
        self.v_proj = make_linear(c.linear, c.hidden_size, c.kv_dim, inner_norm, c.norm_eps)
        self.attn_sub_norm = RMSNorm(c.hidden_size, c.norm_eps) if c.subln else None
        self.o_proj = make_linear(c.linear, c.hidden_size, c.hidden_size, inner_norm, c.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int | torch.Tensor, slots: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start, slots)
            k, v = k.to(q.dtype), v.to(q.dtype)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif T == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            q_pos = torch.arange(S - T, S, device=x.device).unsqueeze(1)
            mask = torch.arange(S, device=x.device).unsqueeze(0) <= q_pos
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, -1)
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)


class MLP(nn.Module):
    """Gated feed-forward: SwiGLU (``silu(gate) * up``) or 2B4T's ``relu(gate)**2 * up``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        inner_norm = c.bitlinear_norm
        self.activation = c.activation
        self.gate_proj = make_linear(c.linear, c.hidden_size, c.intermediate_size, inner_norm, c.norm_eps)
        self.up_proj = make_linear(c.linear, c.hidden_size, c.intermediate_size, inner_norm, c.norm_eps)
        self.ffn_sub_norm = RMSNorm(c.intermediate_size, c.norm_eps) if c.subln else None
        self.down_proj = make_linear(c.linear, c.intermediate_size, c.hidden_size, inner_norm, c.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.activation == "swiglu" else F.relu(gate).square()
        h = gate * self.up_proj(x)
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block (pre-norms dropped when the norms live inside the linears)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        keep_prenorm = not config.bitlinear_norm
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps) if keep_prenorm else nn.Identity()
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps) if keep_prenorm else nn.Identity()
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int | torch.Tensor, slots: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, start, slots, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """LLaMA-alike decoder; BitNet b1.58 or FP depending on ``config.linear``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if torch.empty(0).device.type == "meta":  # a shapes-only model: whoever loads the weights sets the tables
            cos = sin = torch.empty(config.max_seq_len, config.head_dim)
        else:
            cos, sin = config_rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-style init: N(0, std) weights, output projections scaled by 1/sqrt(2 * layers)."""
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]`` at positions ``start..start+T``.

        For batched decoding of sequences at different positions pass ``start`` as a ``[B]`` tensor
        (one new token per row) and ``slots``, the KV-cache rows those sequences own.
        """
        B, T = tokens.shape
        mask = None
        if isinstance(start, torch.Tensor):
            if cache is None or T != 1:
                raise ValueError("per-row positions need a KV cache and one token per row")
            end = int(start.max()) + 1
            if end > self.config.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds the context length {self.config.max_seq_len}")
            cos, sin = self.rope_cos[start].unsqueeze(1).unsqueeze(1), self.rope_sin[start].unsqueeze(1).unsqueeze(1)
            mask = (torch.arange(end, device=tokens.device).view(1, 1, 1, end) <= start.view(B, 1, 1, 1))
        else:
            end = start + T
            if end > self.config.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds the context length {self.config.max_seq_len}")
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.embed_tokens(tokens)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, i, cache, start, slots, mask)
        if cache is not None:
            cache.length = end
        return self.lm_head(self.norm(x)).float()

    def set_quant_strength(self, strength: float) -> None:
        """Set lambda (quantisation residual ramp, in [0, 1]) on every BitLinear."""
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.quant_strength = float(strength)

    def freeze(self, layout: str = "2bit") -> "Transformer":
        """Replace every BitLinear by its packed twin in place (inference only) and return self."""
        if self.config.linear != "bitnet":
            raise ValueError("only a BitNet model (linear='bitnet') can be packed")
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, BitLinear):
                    setattr(module, name, child.freeze(layout))
        return self.eval()

    @property
    def is_packed(self) -> bool:
        """True once :meth:`freeze` has replaced the linear layers."""
        return any(isinstance(m, PackedLinear) for m in self.modules())

    def packed_linears(self) -> dict[str, PackedLinear]:
        """The packed linear layers by their qualified names."""
        return {n: m for n, m in self.named_modules() if isinstance(m, PackedLinear)}
