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
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16, device=codes.device)
    return (stored << shifts).sum(dim=-1).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"2bit"`` tensor back to int8 codes ``[out, in_features]``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16, device=packed.device)
    fields = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & 3
    return (fields.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)


def pack_1p6bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"1.6bit"`` (base 3) layout."""
    _check_codes(codes)
    out = codes.shape[0]
    stored = (_pad_cols(codes.to(torch.int16), 5) + 1).reshape(out, -1, 5)
    return (stored * _POW3.to(stored.device)).sum(dim=-1).to(torch.uint8)


def unpack_1p6bit(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"1.6bit"`` tensor back to int8 codes ``[out, in_features]``."""
    if packed.numel() and int(packed.max()) > 242:
        raise ValueError("corrupt 1.6bit data: byte value above 242 (3**5 - 1)")
    digits = (packed.to(torch.int16).unsqueeze(-1) // _POW3.to(packed.device)) % 3
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


# ----------------------------------------------------------------------------- "2bit-k64" (Triton, GPU)
#
# What the Triton kernels (bittern.kernels.triton_kernels) read: the "2bit" layout with every row
# padded to a multiple of 64 codes (16 bytes), so that a row is a whole number of aligned 32-bit
# words and 16-byte vectors. The bytes equal "2bit" whenever in_features % 64 == 0 (every shape in
# bittern.configs), which makes the conversion from "2bit" free there. Kernel view:
#
#     words = packed.view(torch.int32)            # [out, 4 * ceil(in / 64)], little-endian
#     bits 2i..2i+1 of words[r, p] = codes[r, 16*p + i] + 1
#
# Padding codes are 0 (stored 1). Works on any device.


def pack_2bit_k64(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"2bit-k64"`` (Triton) layout: "2bit" padded to 64 columns."""
    _check_codes(codes)
    return pack_2bit(_pad_cols(codes, 64))


unpack_2bit_k64 = unpack_2bit  # the same bytes as "2bit"; only the row padding differs


LAYOUTS["2bit-k64"] = Layout("2bit-k64", 2.0, pack_2bit_k64, unpack_2bit_k64, lambda n: 16 * ((n + 63) // 64))


# ----------------------------------------------------------------------------- native CPU layouts
#
# "2bit-r4" and "1.6bit-r4" are what the C kernels (bittern/kernels/csrc) read. Rows go in groups of
# 4 (the last group may hold 1-3 rows); inside a group the rows are interleaved block by block, so a
# GEMV streams memory strictly sequentially while one activation block serves four rows:
#
#     for each row group (4*g .. 4*g+3):  for each column block b:  for each row r of the group:
#         32 bytes holding the codes of row r, columns [b*B, (b+1)*B)
#
# "2bit-r4":   B = 128; byte j holds (code[b*128 + 32*i + j] + 1) << (2*i) for i = 0..3, so the
#              four fields of a 32-byte vector are four contiguous 32-column slices (shift + mask).
# "1.6bit-r4": B = 160; byte j holds the trits d_i = code[b*160 + 32*i + j] + 1 (i = 0..4) as the
#              fixed-point fraction f = ceil(256 * sum_i d_i * 3**(4-i) / 243) (as GGUF TQ1_0), stored
#              f ^ 0x80; trit i is (3 * ((f * 3**i) mod 256)) >> 8, which SIMD evaluates as two signed
#              byte compares of (stored * 3**i mod 256) against -43 and 42.
#
# Columns are padded to a multiple of B with code 0, rows are not padded: the packed tensor has shape
# (out_features, padded_in // 4) or (out_features, padded_in // 5), read as one flat byte buffer.


def _r4_interleave(blocks: torch.Tensor) -> torch.Tensor:
    """``[out, nblocks, 32]`` per-row blocks -> row-group interleaved bytes ``[out, nblocks * 32]``."""
    out, nb, _ = blocks.shape
    full = out // 4 * 4
    parts = [blocks[:full].reshape(-1, 4, nb, 32).permute(0, 2, 1, 3).reshape(-1)]
    if out > full:
        parts.append(blocks[full:].permute(1, 0, 2).reshape(-1))
    return torch.cat(parts).reshape(out, nb * 32)


def _r4_deinterleave(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_r4_interleave`: ``[out, nblocks * 32]`` -> ``[out, nblocks, 32]``."""
    if packed.dim() != 2 or packed.shape[1] % 32:
        raise ValueError(f"r4 layouts need a 2-D uint8 tensor with a multiple of 32 columns, got {tuple(packed.shape)}")
    out, cols = packed.shape
    nb = cols // 32
    flat = packed.reshape(-1)
    full = out // 4 * 4
    parts = [flat[: full * cols].reshape(-1, nb, 4, 32).permute(0, 2, 1, 3).reshape(full, nb, 32)]
    if out > full:
        parts.append(flat[full * cols :].reshape(nb, out - full, 32).permute(1, 0, 2))
    return torch.cat(parts)


def pack_2bit_r4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"2bit-r4"`` layout (native CPU GEMV/GEMM)."""
    _check_codes(codes)
    out = codes.shape[0]
    stored = (_pad_cols(codes.to(torch.int16), 128) + 1).reshape(out, -1, 4, 32)  # [out, nb, field, j]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16).reshape(1, 1, 4, 1)
    blocks = (stored << shifts).sum(dim=2).to(torch.uint8)  # [out, nb, 32]
    return _r4_interleave(blocks)


def unpack_2bit_r4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"2bit-r4"`` tensor back to int8 codes ``[out, in_features]``."""
    blocks = _r4_deinterleave(packed).to(torch.int16)  # [out, nb, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16).reshape(1, 1, 4, 1)
    fields = (blocks.unsqueeze(2) >> shifts) & 3  # [out, nb, field, j]
    if fields.numel() and int(fields.max()) > 2:
        raise ValueError("corrupt 2bit-r4 data: a 2-bit field holds 3")
    return (fields.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


_POW3_R4 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32).reshape(1, 1, 5, 1)


def pack_1p6bit_r4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"1.6bit-r4"`` layout (native CPU GEMV/GEMM)."""
    _check_codes(codes)
    out = codes.shape[0]
    digits = (_pad_cols(codes.to(torch.int32), 160) + 1).reshape(out, -1, 5, 32)  # [out, nb, trit, j]
    value = (digits * _POW3_R4).sum(dim=2)  # [out, nb, 32], 0..242
    frac = (value * 256 + 242) // 243  # ceil(256 v / 243) <= 255
    return _r4_interleave((frac ^ 0x80).to(torch.uint8))


def unpack_1p6bit_r4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"1.6bit-r4"`` tensor back to int8 codes ``[out, in_features]``."""
    frac = _r4_deinterleave(packed).to(torch.int32) ^ 0x80  # [out, nb, 32]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32).reshape(1, 1, 5, 1)
    digits = ((frac.unsqueeze(2) * pow3) % 256 * 3) >> 8  # [out, nb, trit, j]
    value = (digits * _POW3_R4).sum(dim=2)
    if frac.numel() and not torch.equal((value * 256 + 242) // 243, frac):
        raise ValueError("corrupt 1.6bit-r4 data: a byte is not a valid 5-trit fixed-point code")
    return (digits.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


LAYOUTS["2bit-r4"] = Layout("2bit-r4", 2.0, pack_2bit_r4, unpack_2bit_r4, lambda n: 32 * ((n + 127) // 128))
LAYOUTS["1.6bit-r4"] = Layout("1.6bit-r4", 1.6, pack_1p6bit_r4, unpack_1p6bit_r4, lambda n: 32 * ((n + 159) // 160))


# "1.67bit-lut": the layout of the lookup-table GEMV (TL2-style, native/csrc/bt_lut.c has the kernel's
# view). Columns are padded to a multiple of 24 and read as triples (c0, c1, c2); a triple is stored as
# a 4-bit index of its canonical form (first nonzero code positive: 14 forms) and a sign bit, 5 bits per
# 3 weights. Every row owns 5 * Kp / 24 + 2 bytes: rows come in groups of 32,
#
#   full group, per 24-column block (160 bytes): four 32-byte index vectors (vector k, byte r: triple 2k
#       of row r in the low nibble, triple 2k + 1 in the high nibble), then eight 4-byte sign words (word
#       j: the sign of triple j of row r is bit r // 4 of byte r % 4); after all blocks, the 32 rows'
#       counts of negated triples as little-endian int16;
#   full groups 2p and 2p + 1 (layout revision 2) share one 64-row region with their blocks interleaved:
#       block 0 of group 2p, block 0 of group 2p + 1, block 1 of group 2p, ..., then the counts of group
#       2p and of group 2p + 1 (the GEMV reads both groups as one sequential stream); a last full group
#       without a partner is stored alone as above;
#   last group (out % 32 rows), row after row: per block 4 index bytes and 1 sign byte (bit j: triple j),
#       then the row's int16 count.
#
# The canonical index of codes (c0, c1, c2) is v - 13 with v = 9 (c0+1) + 3 (c1+1) + (c2+1) when v >= 13,
# else the triple is negated (v -> 26 - v) and its sign bit set.

LUT_BLOCK = 24
LUT_ROWS = 32


def _lut_row_bytes(in_features: int) -> int:
    return 5 * ((in_features + LUT_BLOCK - 1) // LUT_BLOCK) + 2


def pack_1p67bit_lut(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[out, in]`` into the ``"1.67bit-lut"`` layout (lookup-table GEMV)."""
    _check_codes(codes)
    out = codes.shape[0]
    c = _pad_cols(codes.to(torch.int32), LUT_BLOCK) + 1  # [out, Kp] in {0, 1, 2}
    nb = c.shape[1] // LUT_BLOCK
    if nb * 8 > 32767:
        raise ValueError(f"1.67bit-lut supports at most {32767 * 3} columns, got {codes.shape[1]}")
    v = (c.reshape(out, nb, 8, 3) * torch.tensor([9, 3, 1], dtype=torch.int32)).sum(-1)  # [out, nb, 8]
    neg = v < 13
    idx = torch.where(neg, 26 - v, v) - 13  # 0..13
    count = neg.reshape(out, -1).sum(1).to(torch.int16)
    count_bytes = count.view(torch.uint8).reshape(out, 2)
    full = out // LUT_ROWS * LUT_ROWS
    parts = []
    if full:
        G = full // LUT_ROWS
        gi = idx[:full].reshape(G, LUT_ROWS, nb, 4, 2).permute(0, 2, 3, 4, 1)  # [G, nb, k, half, r]
        ivec = (gi[:, :, :, 0] | (gi[:, :, :, 1] << 4)).reshape(G, nb, 128)
        gs = neg[:full].reshape(G, 8, 4, nb, 8).permute(0, 3, 4, 2, 1).to(torch.int32)  # [G, nb, j, byte, bit]
        sbytes = (gs << torch.arange(8, dtype=torch.int32)).sum(-1).reshape(G, nb, 32)
        blocks = torch.cat([ivec, sbytes], dim=2).reshape(G, nb * 160)
        counts = count_bytes[:full].reshape(G, 64)
        P = G // 2  # pairs of groups: blocks interleaved, then both groups' counts
        if P:
            pair_blocks = blocks[: 2 * P].reshape(P, 2, nb, 160).permute(0, 2, 1, 3).reshape(P, nb * 320)
            parts.append(torch.cat([pair_blocks, counts[: 2 * P].reshape(P, 128)], dim=1).reshape(-1))
        if G % 2:
            parts.append(torch.cat([blocks[-1], counts[-1]]).reshape(-1))
    if out > full:
        ti = idx[full:].reshape(out - full, nb, 4, 2)
        ibytes = ti[..., 0] | (ti[..., 1] << 4)  # [m, nb, 4]
        sb = (neg[full:].to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(-1, keepdim=True)  # [m, nb, 1]
        rows = torch.cat([ibytes, sb], dim=2).reshape(out - full, nb * 5)
        parts.append(torch.cat([rows, count_bytes[full:].to(torch.int32)], dim=1).reshape(-1))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    return flat.to(torch.uint8).reshape(out, 5 * nb + 2)


_LUT_CANON = torch.tensor(
    [[0, 0, 0], [0, 0, 1], [0, 1, -1], [0, 1, 0], [0, 1, 1], [1, -1, -1], [1, -1, 0], [1, -1, 1], [1, 0, -1],
     [1, 0, 0], [1, 0, 1], [1, 1, -1], [1, 1, 0], [1, 1, 1]], dtype=torch.int8)


def unpack_1p67bit_lut(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a ``"1.67bit-lut"`` tensor back to int8 codes ``[out, in_features]`` (checks it is canonical)."""
    if packed.dim() != 2 or (packed.shape[1] - 2) % 5 or packed.shape[1] < 7:
        raise ValueError(f"1.67bit-lut needs a 2-D uint8 tensor with 5 * blocks + 2 columns, got {tuple(packed.shape)}")
    out, cols = packed.shape
    nb = (cols - 2) // 5
    flat = packed.reshape(-1).to(torch.int32)
    full = out // LUT_ROWS * LUT_ROWS
    idx_parts, neg_parts, cnt_parts = [], [], []
    if full:
        G = full // LUT_ROWS
        P = G // 2
        region = flat[: 2 * P * LUT_ROWS * cols].reshape(P, 2 * LUT_ROWS * cols)
        blocks = region[:, : nb * 320].reshape(P, nb, 2, 160).permute(0, 2, 1, 3).reshape(2 * P, nb, 160)
        counts = region[:, nb * 320 :].reshape(2 * P, 64)
        if G % 2:  # a last full group without a partner
            lone = flat[2 * P * LUT_ROWS * cols : full * cols].reshape(1, LUT_ROWS * cols)
            blocks = torch.cat([blocks, lone[:, : nb * 160].reshape(1, nb, 160)])
            counts = torch.cat([counts, lone[:, nb * 160 :]])
        iv = blocks[:, :, :128].reshape(G, nb, 4, 32)
        gi = torch.stack([iv & 15, iv >> 4], dim=3)  # [G, nb, k, half, r]
        idx_parts.append(gi.permute(0, 4, 1, 2, 3).reshape(full, nb, 8))
        sb = blocks[:, :, 128:].reshape(G, nb, 8, 4)  # [G, nb, j, byte]
        bits = (sb.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1  # [G, nb, j, byte, bit]
        neg_parts.append(bits.permute(0, 4, 3, 1, 2).reshape(full, nb, 8))  # row = 4 * bit + byte
        cb = counts.reshape(full, 2)
        cnt_parts.append(cb[:, 0] | (cb[:, 1] << 8))
    if out > full:
        rows = flat[full * cols:].reshape(out - full, cols)
        rb = rows[:, : nb * 5].reshape(out - full, nb, 5)
        ib = rb[:, :, :4]
        idx_parts.append(torch.stack([ib & 15, ib >> 4], dim=3).reshape(out - full, nb, 8))
        neg_parts.append((rb[:, :, 4:5] >> torch.arange(8, dtype=torch.int32)) & 1)
        cnt_parts.append(rows[:, nb * 5] | (rows[:, nb * 5 + 1] << 8))
    idx = torch.cat(idx_parts)
    neg = torch.cat(neg_parts)
    count = torch.cat(cnt_parts)
    count = torch.where(count >= 32768, count - 65536, count)
    if idx.numel() and int(idx.max()) > 13:
        raise ValueError("corrupt 1.67bit-lut data: a triple index is above 13")
    if bool(((idx == 0) & (neg == 1)).any()):
        raise ValueError("corrupt 1.67bit-lut data: a zero triple carries a sign")
    if not torch.equal(neg.reshape(out, -1).sum(1), count):
        raise ValueError("corrupt 1.67bit-lut data: a row's count of negated triples does not match its signs")
    trip = _LUT_CANON[idx.long()].to(torch.int32) * (1 - 2 * neg).unsqueeze(-1)  # [out, nb, 8, 3]
    return trip.reshape(out, -1)[:, :in_features].to(torch.int8)


LAYOUTS["1.67bit-lut"] = Layout("1.67bit-lut", 5 / 3, pack_1p67bit_lut, unpack_1p67bit_lut, _lut_row_bytes)
