"""The engine's preallocated key/value cache: float32, float16, bfloat16 or int8 storage.

Layout: ``[layers, slots, kv_heads, max_len, head_dim]`` for K and V (one "slot" per sequence). The
``int8`` option stores one float32 scale per (token, head) (absmax / 127) beside the codes: half the
bytes of float16 for a small, measured quality cost (see ``docs/engine.md``).
"""

from __future__ import annotations

import torch

from ..configs import ModelConfig
from ..prefix_store import cache_tensors

KV_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
                                     "int8": torch.int8}


class EngineKVCache:
    """Key/value cache with ``slots`` independent sequences of up to ``max_len`` positions each."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype: str = "f16") -> None:
        if dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV-cache dtype {dtype!r}; choose one of {sorted(KV_DTYPES)}")
        if slots <= 0 or max_len <= 0:
            raise ValueError("a KV cache needs at least one slot and one position")
        self.dtype_name = dtype
        self.max_len = max_len
        self.slots = slots
        shape = (config.num_layers, slots, config.num_kv_heads, max_len, config.head_dim)
        # empty, not zeros: a large allocation is fresh mmapped memory whose pages become resident only when
        # written (zeros would write them all at once); only positions already written are ever read
        self.k = torch.empty(shape, dtype=KV_DTYPES[dtype])
        self.v = torch.empty(shape, dtype=KV_DTYPES[dtype])
        self.quantized = dtype == "int8"
        if self.quantized:
            self.k_scale = torch.empty(shape[:-1] + (1,), dtype=torch.float32)
            self.v_scale = torch.empty(shape[:-1] + (1,), dtype=torch.float32)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (virtual: pages become resident only when written)."""
        n = 2 * self.k.numel() * self.k.element_size()
        if self.quantized:
            n += 2 * self.k_scale.numel() * 4
        return n

    def bytes_per_token(self) -> int:
        """Bytes one cached position of one sequence takes over all layers."""
        return self.nbytes // (self.slots * self.max_len)

    @staticmethod
    def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale

    def write(self, layer: int, slot: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` ``[kv_heads, T, head_dim]`` at positions ``pos..pos+T`` of ``slot``."""
        end = pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} exceeds its length {self.max_len}")
        if self.quantized:
            kq, ks = self._quant(k)
            vq, vs = self._quant(v)
            self.k[layer, slot, :, pos:end] = kq
            self.v[layer, slot, :, pos:end] = vq
            self.k_scale[layer, slot, :, pos:end] = ks
            self.v_scale[layer, slot, :, pos:end] = vs
        else:
            self.k[layer, slot, :, pos:end] = k
            self.v[layer, slot, :, pos:end] = v

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy positions ``0..n`` of every layer from slot ``src`` to slot ``dst`` (codes and scales)."""
        if not (0 <= src < self.slots and 0 <= dst < self.slots and 0 <= n <= self.max_len):
            raise ValueError(f"cannot copy {n} positions from slot {src} to slot {dst}")
        if src == dst or n == 0:
            return
        for t in cache_tensors(self):
            t[:, dst, :, :n].copy_(t[:, src, :, :n])

    def read(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, end, head_dim]`` of positions ``0..end`` in float32."""
        k = self.k[layer, slot, :, :end]
        v = self.v[layer, slot, :, :end]
        if self.quantized:
            return k.float() * self.k_scale[layer, slot, :, :end], v.float() * self.v_scale[layer, slot, :, :end]
        if k.dtype != torch.float32:
            return k.float(), v.float()
        return k, v
