"""Packed layouts: exact round trips for any shape (property tests), documented bit positions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bittern.pack import LAYOUTS, TernaryWeight, get_layout, pack_1p6bit, pack_2bit, unpack_1p6bit


@st.composite
def codes_matrix(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)


@settings(max_examples=150, deadline=None)
@given(codes=codes_matrix(), layout=st.sampled_from(sorted(LAYOUTS)))
def test_round_trip_is_exact_for_any_shape(codes, layout):
    spec = get_layout(layout)
    packed = spec.pack(codes)
    assert packed.dtype == torch.uint8
    assert spec.unpack(packed, codes.shape[1]).tolist() == codes.tolist()


def test_2bit_bit_positions():
    codes = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    packed = pack_2bit(codes)
    # byte 0: fields 0,1,2,3 = 0,1,2,2 -> 0 | 1<<2 | 2<<4 | 2<<6 = 0 + 4 + 32 + 128
    assert packed.tolist() == [[164, 0 | 1 << 2 | 1 << 4 | 1 << 6]]  # second byte: -1 then padding (stored 1)


def test_1p6bit_digits():
    codes = torch.tensor([[1, 0, -1, 1, 1, 0]], dtype=torch.int8)
    packed = pack_1p6bit(codes)
    assert packed.tolist() == [[2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81, 1 + 3 + 9 + 27 + 81]]
    assert packed.shape == (1, 2)


def test_corrupt_1p6bit_byte_is_rejected():
    with pytest.raises(ValueError, match="above 242"):
        unpack_1p6bit(torch.tensor([[250]], dtype=torch.uint8), 5)


def test_bad_codes_and_layout_names():
    with pytest.raises(ValueError, match="in \\{-1, 0, 1\\}"):
        pack_2bit(torch.tensor([[2]], dtype=torch.int8))
    with pytest.raises(ValueError, match="unknown packed layout"):
        get_layout("3bit")


def test_ternary_weight_conversions_and_sizes():
    torch.manual_seed(0)
    w = torch.randn(13, 37)
    t2 = TernaryWeight.from_float(w, "2bit")
    t16 = t2.to_layout("1.6bit")
    assert torch.equal(t2.codes(), t16.codes())
    assert torch.equal(t16.to_layout("2bit").packed, t2.packed)
    assert t2.packed.shape == (13, 10) and t16.packed.shape == (13, 8)
    assert torch.allclose(t2.dequantize(), t2.codes().float() * t2.scale)
