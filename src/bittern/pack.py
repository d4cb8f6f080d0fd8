"""Packed ternary weight layouts: each layout is defined here once, with its reference pack/unpack.

A ternary weight matrix of shape ``(out_features, in_features)`` with codes in {-1, 0, +1} is
stored as a ``uint8`` tensor in one of these layouts (the code stored is ``c + 1`` in {0, 1, 2}):

``"2bit"`` (4 codes per byte, 2 bits per weight), row-major::

    packed.shape == (out_features, ceil(in_features / 4))
    packed[r, j] = sum_{i<4} (codes[r, 4*j + i] + 1) << (2*i)      # lowest bits first

``"1.6bit"`` (5 codes per byte, base 3, 1.6 bits per weight), row-major::

    packed.shape == (out_features, ceil(in_features / 5))
    packed[r, j] = sum_{i<5} (codes[r, 5*j + i] + 1) * 3**i         # values 0..242

Rows are padded at the end with code 0 (stored 1 in "2bit", i.e. the digit 1 in "1.6bit"); padding
never changes a product. Kernel-specific layouts (interleaved rows, lookup-table friendly orders)
register themselves in :data:`LAYOUTS` with the same two functions, so a packed file can store
whatever the fastest kernel wants and convert to and from these interchange layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quant import quantize_weight


@dataclass(frozen=True)
class Layout:
    """A packed layout: ``pack(codes int8 [out, in]) -> uint8`` and ``unpack(packed, in) -> codes``."""

    name: str
    bits_per_weight: float
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]
    packed_cols: Callable[[int], int]


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 2:
        raise ValueError(f"ternary codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
        raise ValueError("ternary codes must lie in {-1, 0, 1}")


def _pad_cols(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-codes.shape[1]) % multiple
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=0)
    return codes


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"2bit"`` layout."""
    _check_codes(codes)
    out = codes.shape[0]
    stored = (_pad_cols(codes.to(torch.int16), 4) + 1).reshape(out, -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    return (stored << shifts).sum(dim=-1).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"2bit"`` tensor back to int8 codes ``[out, in_features]``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    fields = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & 3
    return (fields.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)


def pack_1p6bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"1.6bit"`` (base 3) layout."""
    _check_codes(codes)
    out = codes.shape[0]
    stored = (_pad_cols(codes.to(torch.int16), 5) + 1).reshape(out, -1, 5)
    return (stored * _POW3).sum(dim=-1).to(torch.uint8)


def unpack_1p6bit(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"1.6bit"`` tensor back to int8 codes ``[out, in_features]``."""
    if packed.numel() and int(packed.max()) > 242:
        raise ValueError("corrupt 1.6bit data: byte value above 242 (3**5 - 1)")
    digits = (packed.to(torch.int16).unsqueeze(-1) // _POW3) % 3
    return (digits.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


LAYOUTS: dict[str, Layout] = {
    "2bit": Layout("2bit", 2.0, pack_2bit, unpack_2bit, lambda n: (n + 3) // 4),
    "1.6bit": Layout("1.6bit", 1.6, pack_1p6bit, unpack_1p6bit, lambda n: (n + 4) // 5),
}


def get_layout(name: str) -> Layout:
    """Look up a layout by name, with a clear error listing the known ones."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown packed layout {name!r}; known: {sorted(LAYOUTS)}") from None


@dataclass
class TernaryWeight:
    """A packed ternary weight matrix: codes in ``layout`` plus the per-tensor scale gamma."""

    packed: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int
    layout: str = "2bit"

    @classmethod
    def from_float(cls, w: torch.Tensor, layout: str = "2bit") -> "TernaryWeight":
        """Quantise a float weight ``[out, in]`` (absmean) and pack it; NaN/Inf raise."""
        codes, gamma = quantize_weight(w)
        return cls.from_codes(codes, gamma, layout)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, gamma: torch.Tensor | float, layout: str = "2bit") -> "TernaryWeight":
        """Pack ready-made int8 codes ``[out, in]`` with scale ``gamma``."""
        packed = get_layout(layout).pack(codes)
        scale = torch.as_tensor(gamma, dtype=torch.float32).reshape(())
        return cls(packed.contiguous(), scale, codes.shape[0], codes.shape[1], layout)

    def codes(self) -> torch.Tensor:
        """The int8 codes ``[out, in]`` (reference unpack)."""
        return get_layout(self.layout).unpack(self.packed, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``codes * gamma`` as a dense tensor."""
        return (self.codes().float() * self.scale).to(dtype)

    def to_layout(self, layout: str) -> "TernaryWeight":
        """The same weight in another layout (exact)."""
        if layout == self.layout:
            return self
        return TernaryWeight.from_codes(self.codes(), self.scale, layout)

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes plus the scale."""
        return self.packed.numel() * self.packed.element_size() + 4
