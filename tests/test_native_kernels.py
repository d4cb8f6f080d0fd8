"""The native C kernels equal the reference backend bit for bit (and the kernel layouts round-trip).

Covers both weight formats ("2bit-r4", "1.6bit-r4"), the GEMV and GEMM paths, the SIMD and scalar
instruction sets, 1 and several threads, ragged shapes (rows not a multiple of the 4-row group,
columns not a multiple of the 128/160-column block), float32/bfloat16/float16 activations and the
int16-overflow worst case (all activations -128, all weights +-1, K = 28672).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bittern.kernels import get_backend, ternary_linear
from bittern.kernels import native as nat
from bittern.kernels.reference import ReferenceBackend, int_matmul
from bittern.pack import LAYOUTS, TernaryWeight, get_layout
from bittern.quant import quantize_activation

pytestmark = pytest.mark.skipif(
    not nat.available(), reason=f"native kernel library unavailable: {nat.library_error()}"
)

REF = ReferenceBackend()
NATIVE_LAYOUTS = ["2bit-r4", "1.6bit-r4", "1.67bit-lut"]
SIMD = [isa for isa in ("avx2", "neon") if nat.available() and nat.isa_available(isa)]
ISAS = ["scalar"] + SIMD
# (tokens, out_features, in_features): ragged rows and columns, single rows, blocks exactly full
SHAPES = [
    (1, 1, 1),
    (1, 3, 5),
    (1, 4, 128),
    (1, 5, 129),
    (1, 7, 160),
    (1, 9, 161),
    (1, 64, 640),
    (2, 13, 300),
    (3, 6, 1000),
    (4, 8, 257),
    (5, 37, 777),
    (9, 21, 1280),
    (17, 50, 333),
]


def _codes(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)


def _acts(t: int, k: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # mixed magnitudes per token, never all zero
    scale = torch.exp(torch.randn(t, 1, generator=gen) * 2)
    x = torch.randn(t, k, generator=gen) * scale
    x[:, 0] += 0.5
    return x.to(dtype)


@pytest.fixture(autouse=True)
def _restore_settings():
    isa, threads = nat.isa(), nat.get_threads()
    yield
    nat.set_isa(isa)
    nat.set_threads(threads)


# ----------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
def test_layout_roundtrip_and_conversion(layout):
    gen = torch.Generator().manual_seed(1)
    L = get_layout(layout)
    for n, k in [(1, 1), (3, 5), (4, 128), (5, 129), (6, 160), (7, 161), (9, 700), (12, 1280)]:
        codes = _codes(n, k, gen)
        packed = L.pack(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (n, L.packed_cols(k))
        assert torch.equal(L.unpack(packed, k), codes)
        for other in ("2bit", "1.6bit"):
            w = TernaryWeight.from_codes(codes, 0.25, other)
            assert torch.equal(w.to_layout(layout).codes(), codes)
            assert torch.equal(w.to_layout(layout).to_layout(other).packed, w.packed)
    assert L.bits_per_weight == {"2bit-r4": 2.0, "1.6bit-r4": 1.6, "1.67bit-lut": 5 / 3}[layout]


def test_layout_byte_order_2bit_r4():
    gen = torch.Generator().manual_seed(2)
    codes = _codes(6, 256, gen)
    flat = LAYOUTS["2bit-r4"].pack(codes).reshape(-1)
    # group 0, block 1, row 2, byte 5, field 3 -> column 128 + 96 + 5
    assert ((int(flat[(1 * 4 + 2) * 32 + 5]) >> 6) & 3) - 1 == int(codes[2, 128 + 96 + 5])
    # short last group (rows 4, 5): block 1, row 5, byte 7, field 1 -> column 128 + 32 + 7
    assert ((int(flat[4 * 64 + (1 * 2 + 1) * 32 + 7]) >> 2) & 3) - 1 == int(codes[5, 128 + 32 + 7])


def test_layout_byte_order_1p67bit_lut():
    """The documented positions: a full 32-row group (index vectors, sign words, counts) and a short one."""
    codes = torch.zeros(40, 48, dtype=torch.int8)
    codes[5, 27:30] = torch.tensor([-1, 1, 0])  # row 5, block 1, triple 1: (-1, 1, 0) = -(1, -1, 0) -> idx 6, negated
    codes[33, 30:33] = torch.tensor([0, 1, 1])  # tail row 33 (row 1 of the short group), block 1, triple 2 -> idx 4
    packed = LAYOUTS["1.67bit-lut"].pack(codes)
    rb = 5 * 2 + 2
    assert packed.shape == (40, rb)
    flat = packed.reshape(-1)
    blk = flat[160:320]  # group 0, block 1
    assert (int(blk[32 * 0 + 5]) >> 4) == 6  # vector k = 0 holds triples 0 (low nibble) and 1 (high nibble)
    word1 = blk[128 + 4:128 + 8]  # sign word of triple 1
    assert (int(word1[5 % 4]) >> (5 // 4)) & 1 == 1 and int(word1.sum()) == 1 << (5 // 4)
    counts = flat[320:384].view(torch.int16)
    assert int(counts[5]) == 1 and int(counts.sum()) == 1
    tail_row = flat[32 * rb + 1 * rb:32 * rb + 2 * rb]  # rows 32.. stored row after row
    assert int(tail_row[5 + 1]) & 15 == 4 and int(tail_row[5 + 4]) == 0  # block 1: index byte 1, sign byte
    assert int(tail_row[10:12].view(torch.int16)) == 0


def test_layout_byte_order_1p67bit_lut_group_pairs():
    """Full groups 2p and 2p+1 interleave their 160-byte blocks, then store both groups' counts; a third
    full group without a partner is stored alone (layout revision 2)."""
    codes = torch.zeros(3 * 32 + 5, 48, dtype=torch.int8)
    codes[32 + 7, 3:6] = torch.tensor([0, 0, 1])  # group 1, row 7, block 0, triple 1 -> idx 1
    codes[2, 24:27] = torch.tensor([0, -1, 0])  # group 0, row 2, block 1, triple 0 -> -(0, 1, 0): idx 3, negated
    codes[64 + 9, 24:27] = torch.tensor([0, 1, 1])  # group 2 (alone), row 9, block 1, triple 0 -> idx 4
    rb = 5 * 2 + 2
    flat = LAYOUTS["1.67bit-lut"].pack(codes).reshape(-1)
    pair = flat[: 64 * rb]
    g0b0, g1b0, g0b1, g1b1 = (pair[160 * i : 160 * (i + 1)] for i in range(4))
    assert int(g1b0[7]) >> 4 == 1 and int(g1b0[:128].sum()) == 1 << 4  # group 1's block 0 comes second
    assert int(g0b0[:128].sum()) == 0 and int(g1b1[:128].sum()) == 0
    assert int(g0b1[2]) & 15 == 3 and (int(g0b1[128 + 2 % 4]) >> (2 // 4)) & 1 == 1  # group 0, block 1
    counts = pair[640:768].view(torch.int16)  # group 0's 32 counts, then group 1's
    assert int(counts[2]) == 1 and int(counts.sum()) == 1
    lone = flat[64 * rb : 96 * rb]  # group 2: its own blocks then counts
    assert int(lone[160 + 9]) & 15 == 4 and int(lone[320:384].view(torch.int16).sum()) == 0
    assert torch.equal(LAYOUTS["1.67bit-lut"].unpack(flat.reshape(-1, rb), 48), codes)


def test_layout_corrupt_data_raises():
    bad = torch.full((4, 32), 0xFF, dtype=torch.uint8)  # every 2-bit field holds 3
    with pytest.raises(ValueError):
        LAYOUTS["2bit-r4"].unpack(bad, 100)
    packed = LAYOUTS["1.6bit-r4"].pack(torch.zeros(4, 160, dtype=torch.int8))
    packed[0, 0] = 0x80 ^ 20  # 20 is none of the 243 fixed-point bytes ceil(256 v / 243)
    with pytest.raises(ValueError):
        LAYOUTS["1.6bit-r4"].unpack(packed, 160)
    lut = LAYOUTS["1.67bit-lut"]
    good = lut.pack(torch.randint(-1, 2, (33, 50), generator=torch.Generator().manual_seed(3), dtype=torch.int8))
    bad = good.clone()
    bad[0, 0] |= 0x0F  # index 15 (row 0, triple 0 of the full group)
    with pytest.raises(ValueError, match="index"):
        lut.unpack(bad, 50)
    bad = good.clone()
    bad.reshape(-1)[32 * good.shape[1] - 64] ^= 1  # row 0's count of negated triples
    with pytest.raises(ValueError, match="count"):
        lut.unpack(bad, 50)


# ----------------------------------------------------------------------------------------- quantise


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_activations_bit_exact(isa, dtype):
    nat.set_isa(isa)
    gen = torch.Generator().manual_seed(3)
    for threads in (1, 2):
        nat.set_threads(threads)
        for t, k in [(1, 1), (1, 7), (2, 31), (3, 32), (4, 33), (5, 100), (3, 2560), (40, 900)]:
            x = _acts(t, k, gen, dtype)
            if k > 3:
                x[0, 1] = 0.0
                x[-1, 2] = -x[-1].float().abs().max().to(dtype)  # ties for the max
            q, s, rowsum = nat.quantize_activations(x)
            qr, sr = quantize_activation(x)
            assert q.shape == (t, nat.padded_k(k))
            assert torch.equal(q[:, :k], qr), (isa, dtype, t, k)
            assert not q[:, k:].any()
            assert torch.equal(s, sr.reshape(-1))
            assert torch.equal(rowsum, qr.to(torch.int32).sum(1, dtype=torch.int32))


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_rounding_edges(isa):
    """Halfway cases round to even, tiny rows hit the 1e-5 floor, huge values clamp."""
    nat.set_isa(isa)
    k = 64
    rows = [
        torch.linspace(-127, 127, k),  # s == 1: x * s lands on .5 steps after scaling below
        torch.linspace(-127, 127, k) / 2 + 0.25,
        torch.full((k,), 3e-6) * torch.arange(1, k + 1),  # amax below the floor
        torch.tensor([1e30, -1e30] + [1.0] * (k - 2)),
        torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0] + [0.25] * (k - 7)),
    ]
    x = torch.stack(rows)
    q, s, rowsum = nat.quantize_activations(x)
    qr, sr = quantize_activation(x)
    assert torch.equal(q[:, :k], qr)
    assert torch.equal(s, sr.reshape(-1))
    assert torch.equal(rowsum, qr.int().sum(1, dtype=torch.int32))


def test_quantize_into_buffers_and_strided_input():
    gen = torch.Generator().manual_seed(4)
    x = _acts(6, 300, gen)[:, :250]  # row stride 300, 250 features
    q = torch.full((8, nat.padded_k(250) + 64), 7, dtype=torch.int8)
    s = torch.empty(8)
    rs = torch.empty(8, dtype=torch.int32)
    nat.quantize_activations(x, out=(q, s, rs))
    qr, sr = quantize_activation(x)
    assert torch.equal(q[:6, :250], qr) and not q[:6, 250:].any()
    assert torch.equal(s[:6], sr.reshape(-1))


# ----------------------------------------------------------------------------------------- products


def _check_products(isa, thread_counts, layout, shapes, gen):
    nat.set_isa(isa)
    for t, n, k in shapes:
        codes = _codes(n, k, gen)
        w = TernaryWeight.from_codes(codes, torch.rand((), generator=gen) + 0.01, layout)
        x = _acts(t, k, gen)
        q, s, rowsum = nat.quantize_activations(x)
        qr, _ = quantize_activation(x)
        acc = int_matmul(qr, codes)
        y_ref = REF.linear(x, w)
        for threads in thread_counts:
            nat.set_threads(threads)
            for mode in ("gemv", "gemm", "tables", "auto"):
                got = nat.matmul_int32(q, rowsum, w, mode)
                assert torch.equal(got, acc), (isa, threads, layout, t, n, k, mode)
            for fn in (nat.gemv, nat.gemm, nat.gemm_tables, nat.matmul):
                assert torch.equal(fn(q, s, rowsum, w), y_ref), (isa, threads, layout, t, n, k, fn.__name__)


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_products_bit_exact(isa, threads, layout):
    gen = torch.Generator().manual_seed(5 + threads)
    _check_products(isa, [threads], layout, SHAPES, gen)


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("isa", SIMD)
def test_products_bit_exact_larger(isa, layout):
    """Shapes spanning several GEMM panels, K chunks and token tiles (2B4T-like widths)."""
    gen = torch.Generator().manual_seed(11)
    # 1.67bit-lut group pairs: 1030 rows = 32 full groups (all paired) + 6; 2100 = 65 full groups (the
    # last one unpaired) + 20; 300 = 9 full groups + 12
    shapes = [(1, 1030, 2560), (1, 2100, 2560), (3, 640, 1280), (37, 300, 2600), (130, 40, 6912), (6, 520, 3300)]
    _check_products(isa, [1, 2], layout, shapes, gen)


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
def test_table_gemm_tiles_windows_and_items(layout):
    """The GEMM by tables of token vectors (AVX2): token counts around the 16-token tile, columns around the
    7-slice int16 window (224 columns) and the 32-column chunk, rows around the 32-row item granule and over
    several items (also where the scratch cap splits a thread's rows) and decode panels, 1-3 threads; equal
    to the exact integer product and to the panel GEMM."""
    if "avx2" not in SIMD:
        pytest.skip("the table GEMM is an AVX2 kernel")
    nat.set_isa("avx2")
    gen = torch.Generator().manual_seed(31)
    # (16, 1200, 28672): a 70B-wide row caps the item at ~1165 rows of scratch, so two items per thread
    for t, n, k in [(15, 33, 224), (16, 32, 225), (17, 63, 448), (31, 1, 32), (32, 97, 200), (33, 4100, 96),
                    (48, 2047, 700), (64, 65, 4480), (16, 1200, 28672)]:
        codes = _codes(n, k, gen)
        w = TernaryWeight.from_codes(codes, torch.rand((), generator=gen) + 0.01, layout)
        x = _acts(t, k, gen)
        q, s, rowsum = nat.quantize_activations(x)
        acc = int_matmul(quantize_activation(x)[0], codes)
        for threads in (1, 2, 3):
            nat.set_threads(threads)
            assert torch.equal(nat.matmul_int32(q, rowsum, w, "tables"), acc), (layout, t, n, k, threads)
            assert torch.equal(nat.gemm_tables(q, s, rowsum, w), nat.gemm(q, s, rowsum, w)), (layout, t, n, k)


def test_table_gemm_corrupt_weights_stay_inside_the_tables():
    """Bytes no packer writes must not send the table GEMM outside its tables: a 2-bit field holding 3
    clamps its 4-column group to the last pattern (all codes +1), and a lookup triple with index 14 or 15
    reads as zero codes, as in the lookup GEMV and the panel GEMM."""
    if "avx2" not in SIMD:
        pytest.skip("the table GEMM is an AVX2 kernel")
    nat.set_isa("avx2")
    gen = torch.Generator().manual_seed(37)
    t, n, k = 20, 37, 300
    x = _acts(t, k, gen)
    q, s, rowsum = nat.quantize_activations(x)
    q_ref = quantize_activation(x)[0]
    r4 = get_layout("2bit-r4")
    bad = torch.full((n, r4.packed_cols(k)), 0xFF, dtype=torch.uint8)  # every field 3
    w = TernaryWeight(bad, torch.tensor(0.5), n, k, "2bit-r4")
    for threads in (1, 2):
        nat.set_threads(threads)
        all_plus_one = int_matmul(q_ref, torch.ones(n, k, dtype=torch.int8))
        assert torch.equal(nat.matmul_int32(q, rowsum, w, "tables"), all_plus_one)

    lut = get_layout("1.67bit-lut")
    codes = _codes(n, k, gen)
    # every position of a triple in its 4-triple unit with both bad indices, in the full group and the short last one
    spots = [(2 * j, j) for j in range(16)] + [(31, 20), (32, 5), (33, 3), (35, 10), (36, 98)]
    for row, triple in spots:
        codes[row, 3 * triple : 3 * triple + 3] = 1  # canonical index 13, not negated
    packed = lut.pack(codes)
    cols = packed.shape[1]
    flat = packed.reshape(-1)  # one full group (stored alone), then rows 32..36 one after another
    zeroed = codes.clone()
    for row, triple in spots:
        b, jj = divmod(triple, 8)
        pos = 160 * b + 32 * (jj // 2) + row if row < 32 else 32 * cols + (row - 32) * cols + 5 * b + jj // 2
        shift = 4 * (jj % 2)
        assert (int(flat[pos]) >> shift) & 15 == 13, (row, triple)
        bad_index = 14 + (triple // 4 + row // 32) % 2
        flat[pos] = (int(flat[pos]) & ~(15 << shift) & 0xFF) | (bad_index << shift)
        zeroed[row, 3 * triple : 3 * triple + 3] = 0
    with pytest.raises(ValueError, match="index"):
        lut.unpack(packed, k)
    w = TernaryWeight(packed, torch.tensor(0.5), n, k, "1.67bit-lut")
    want_acc = int_matmul(q_ref, zeroed)
    for threads in (1, 2):
        nat.set_threads(threads)
        for mode in ("tables", "gemm", "gemv"):
            assert torch.equal(nat.matmul_int32(q, rowsum, w, mode), want_acc), (mode, threads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_many_equals_separate_products(isa, threads):
    """Several weights of one input in one call (the decode step's q/k/v and gate/up): every slice equals
    the reference product, for mixed layouts, ragged rows and columns, decode- and prefill-sized T."""
    nat.set_isa(isa)
    nat.set_threads(threads)
    gen = torch.Generator().manual_seed(23 + threads)
    for t, k, rows in [(1, 300, [133, 64, 7]), (1, 2560, [520, 130, 130]), (3, 97, [5, 1, 40, 33]),
                       (12, 777, [64, 9]), (70, 161, [21, 50])]:
        weights, refs = [], []
        x = _acts(t, k, gen)
        for i, n in enumerate(rows):
            codes = _codes(n, k, gen)
            w = TernaryWeight.from_codes(codes, torch.rand((), generator=gen) + 0.01, NATIVE_LAYOUTS[i % 3])
            weights.append(w)
            refs.append(REF.linear(x, w))
        q, s, rowsum = nat.quantize_activations(x)
        out = torch.full((t, sum(rows) + 3), float("nan"))
        got = nat.matmul_many(q, s, rowsum, weights, out=out)
        assert got is out
        assert torch.equal(out[:, : sum(rows)], torch.cat(refs, 1)), (isa, threads, t, k, rows)
        assert torch.isnan(out[:, sum(rows):]).all()  # nothing written past the products
    with pytest.raises(ValueError, match="same in_features"):
        w1 = TernaryWeight.from_codes(_codes(4, 8, gen), 1.0, "2bit-r4")
        w2 = TernaryWeight.from_codes(_codes(4, 9, gen), 1.0, "2bit-r4")
        q, s, rowsum = nat.quantize_activations(_acts(1, 9, gen))
        nat.matmul_many(q, s, rowsum, [w1, w2])


@pytest.mark.parametrize("isa", ISAS)
def test_lookup_tables_follow_changed_activations(isa):
    """The 1.67bit-lut GEMV reuses the tables of byte-identical activations; one changed byte in the same
    buffer, or another weight of a different width, must not see stale tables."""
    nat.set_isa(isa)
    gen = torch.Generator().manual_seed(21)
    codes = _codes(64, 300, gen)
    w = TernaryWeight.from_codes(codes, 1.0, "1.67bit-lut")
    q, s, rowsum = nat.quantize_activations(_acts(1, 300, gen))
    for step in range(4):
        got = nat.matmul_int32(q, rowsum, w, "gemv")
        assert torch.equal(got, int_matmul(q[:, :300], codes)), step
        q[0, (37 * step) % 300] = q[0, (37 * step) % 300] // 2 + 1  # same buffer, new contents
        rowsum = q.to(torch.int32).sum(1, dtype=torch.int32)
    wide = _codes(40, 500, gen)
    qw, _, rsw = nat.quantize_activations(_acts(1, 500, gen))
    qw[0, :300] = q[0, :300]  # same leading bytes, longer row
    wl = TernaryWeight.from_codes(wide, 1.0, "1.67bit-lut")
    assert torch.equal(nat.matmul_int32(qw, rsw, wl, "gemv"), int_matmul(qw[:, :500], wide))


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("isa", ISAS)
def test_overflow_worst_case(isa, layout):
    """All activations -128 (or +127) against all weights +1 / -1 at K = 28672: no int16 overflow."""
    nat.set_isa(isa)
    k, n = 28672, 40  # 40 rows: one full 32-row group of the 1.67bit-lut layout and a short one
    codes = torch.ones(n, k, dtype=torch.int8)
    codes[1] = -1
    codes[2, ::2] = -1  # mixed signs
    codes[3] = 0
    codes[5, k // 2 :] = -1
    w = TernaryWeight.from_codes(codes, 1.0, layout)
    q = torch.zeros(3, nat.padded_k(k), dtype=torch.int8)
    q[0, :k] = -128
    q[1, :k] = 127
    q[2, :k] = torch.where(codes[0] > 0, -128, 127).to(torch.int8)
    rowsum = q.to(torch.int32).sum(1, dtype=torch.int32)
    acc = int_matmul(q[:, :k], codes)
    assert int(acc[0, 0]) == -128 * k and int(acc[0, 1]) == 128 * k
    for threads in (1, 2):
        nat.set_threads(threads)
        for mode in ("gemv", "gemm", "tables"):
            assert torch.equal(nat.matmul_int32(q, rowsum, w, mode), acc), (isa, layout, mode, threads)
            assert torch.equal(nat.matmul_int32(q[:1], rowsum[:1], w, mode), acc[:1]), (isa, layout, mode)


def test_output_buffers_strided():
    gen = torch.Generator().manual_seed(12)
    w = TernaryWeight.from_codes(_codes(30, 500, gen), 0.5, "2bit-r4")
    x = _acts(5, 500, gen)
    q, s, rowsum = nat.quantize_activations(x)
    big = torch.full((5, 40), float("nan"))
    out = big[:, 3:33]
    nat.matmul(q, s, rowsum, w, out=out)
    assert torch.equal(out, REF.linear(x, w))
    assert big[:, :3].isnan().all() and big[:, 33:].isnan().all()


def test_numpy_buffers():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(17)
    w = TernaryWeight.from_codes(_codes(20, 300, gen), 0.5, "1.6bit-r4")
    x = _acts(3, 300, gen)
    q, s, rowsum = nat.quantize_activations(x.numpy())
    out = np.full((3, 20), np.nan, dtype=np.float32)
    nat.matmul(q.numpy(), s.numpy(), rowsum.numpy(), w, out=out)
    assert torch.equal(torch.from_numpy(out), REF.linear(x, w))


def test_bad_arguments_raise():
    gen = torch.Generator().manual_seed(13)
    w = TernaryWeight.from_codes(_codes(8, 300, gen), 0.5, "2bit")
    q, s, rowsum = nat.quantize_activations(_acts(2, 300, gen))
    with pytest.raises(ValueError, match="prepare"):
        nat.matmul(q, s, rowsum, w)
    wn = nat.BACKEND.prepare(w)
    with pytest.raises(ValueError):
        nat.matmul(q[:, :128], s, rowsum, wn)  # too few (padded) columns
    with pytest.raises(ValueError):
        nat.matmul(q.float(), s, rowsum, wn)
    with pytest.raises(ValueError):
        nat.matmul(q, s, rowsum.long(), wn)


# ----------------------------------------------------------------------------------------- backend


@pytest.mark.parametrize("layout", ["2bit", "1.6bit", "2bit-r4", "1.6bit-r4"])
def test_backend_linear_matches_reference(layout):
    backend = get_backend("native")
    assert backend.name == "native" and backend.available()
    gen = torch.Generator().manual_seed(14)
    w = TernaryWeight.from_float(torch.randn(45, 333, generator=gen), layout)
    prepared = backend.prepare(w)
    assert prepared.layout in NATIVE_LAYOUTS and torch.equal(prepared.codes(), w.codes())
    for shape in [(333,), (1, 333), (2, 3, 333), (7, 333)]:
        x = torch.randn(*shape, generator=gen) * 3
        for xx in (x, x.to(torch.bfloat16)):
            y = backend.linear(xx, w)
            assert y.dtype == torch.float32 and y.shape == shape[:-1] + (45,)
            assert torch.equal(y, REF.linear(xx, w))
            assert torch.equal(ternary_linear(xx, w, backend="native"), y)
    with pytest.raises(ValueError):
        backend.linear(torch.randn(2, 100), w)


def test_concurrent_python_threads():
    """Calls from several Python threads (the GIL is released) serialise safely on the pool."""
    gen = torch.Generator().manual_seed(15)
    w = nat.BACKEND.prepare(TernaryWeight.from_codes(_codes(256, 1024, gen), 0.3, "2bit"))
    xs = [_acts(t, 1024, gen) for t in (1, 2, 5, 1)]
    want = [REF.linear(x, w) for x in xs]
    errors = []

    def work(i):
        for _ in range(20):
            if not torch.equal(nat.BACKEND.linear(xs[i], w), want[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_pool_started():
    """A forked child (DataLoader workers, servers) gets a working pool of its own."""
    if nat.threading_backend() == "openmp":
        pytest.skip("libgomp is not fork-safe once the parent has run a parallel region")
    gen = torch.Generator().manual_seed(16)
    w = TernaryWeight.from_codes(_codes(200, 700, gen), 0.3, "2bit-r4")
    x = _acts(5, 700, gen)
    nat.set_threads(2)
    want = nat.BACKEND.linear(x, w)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        ok = False
        try:
            ok = torch.equal(nat.BACKEND.linear(x, w), want)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0


def test_settings_functions():
    assert nat.set_threads(3) == 3 and nat.get_threads() == 3
    assert nat.force_scalar() == "scalar" and nat.isa() == "scalar"
    assert nat.force_scalar(False) in ("avx2", "neon", "scalar")
    with nat.using("scalar", 1):
        assert nat.isa() == "scalar" and nat.get_threads() == 1
    with pytest.raises(ValueError):
        nat.set_isa("sse9")
    assert nat.threading_backend() in ("pthread-pool", "openmp")


def test_environment_variables():
    code = "from bittern.kernels import native as n; print(n.isa(), n.get_threads())"
    env = dict(os.environ, BITTERN_KERNEL_ISA="scalar", BITTERN_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scalar", "3"]


def test_stream_read_checksum():
    buf = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    words = buf.view(torch.int64)
    want = 0
    for v in words.tolist():
        want ^= v & 0xFFFFFFFFFFFFFFFF
    for threads in (1, 2):
        nat.set_threads(threads)
        assert nat.stream_read(buf) == want
        assert nat.stream_read(buf, prefetch_bytes=1024) == want


# ----------------------------------------------------------------------------------------- ARM NEON

CSRC = Path(nat.__file__).resolve().parent / "csrc"
ARM_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
ARM_SYSROOT = "/usr/aarch64-linux-gnu"

# Every kernel of the best ISA against the scalar twin, on random data (run under qemu for NEON).
_HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bittern.h"
static unsigned rng = 12345;
static unsigned rnd(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
int main(void) {
    int isa = bt_isa_available(BT_ISA_NEON) ? BT_ISA_NEON : BT_ISA_AVX2, bad = 0;
    long shapes[][3] = {{1, 5, 129}, {1, 64, 640}, {3, 7, 300}, {9, 37, 1000}, {17, 12, 333}, {130, 21, 700}};
    for (int si = 0; si < 6; si++)
        for (int fmt = 0; fmt < 2; fmt++) {
            long T = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
            long Kp = bt_padded_k(fmt, K), ldq = (K + 639) / 640 * 640, rb = fmt == 0 ? Kp / 4 : Kp / 5;
            unsigned char *w = malloc(N * rb);
            for (long i = 0; i < N * rb; i++) {
                if (fmt == 0) { unsigned b = 0; for (int f = 0; f < 4; f++) b |= (rnd() % 3) << (2 * f); w[i] = b; }
                else w[i] = (unsigned char)((((rnd() % 243) * 256 + 242) / 243) ^ 0x80);
            }
            float *x = malloc(sizeof(float) * T * K);
            for (long i = 0; i < T * K; i++) x[i] = ((int)(rnd() % 20001) - 10000) * 0.001f * (1 + i % 7);
            signed char *q[2]; float *s[2], *y[2]; int *rs[2], *yi[2];
            for (int v = 0; v < 2; v++) {
                bt_set_isa(v == 0 ? BT_ISA_SCALAR : isa);
                q[v] = malloc(T * ldq); s[v] = malloc(4 * T); rs[v] = malloc(4 * T);
                y[v] = malloc(4 * T * N); yi[v] = malloc(4 * T * N);
                bt_quantize(x, BT_DT_F32, T, K, K, q[v], ldq, s[v], rs[v]);
            }
            bad += memcmp(q[0], q[1], T * ldq) || memcmp(s[0], s[1], 4 * T) || memcmp(rs[0], rs[1], 4 * T);
            for (int mode = 1; mode <= 3; mode++) /* 3: tables where the ISA has them, else the panel GEMM */
                for (int th = 1; th <= 2; th++) {
                    bt_set_threads(th);
                    for (int v = 0; v < 2; v++) {
                        bt_set_isa(v == 0 ? BT_ISA_SCALAR : isa);
                        bt_matmul_mode(mode, fmt, w, N, K, q[0], ldq, rs[0], s[0], T, 0.37f, y[v], NULL, N);
                        bt_matmul_mode(mode, fmt, w, N, K, q[0], ldq, rs[0], s[0], T, 0.37f, NULL, yi[v], N);
                    }
                    bad += memcmp(y[0], y[1], 4 * T * N) || memcmp(yi[0], yi[1], 4 * T * N);
                }
        }
    printf("%s %s\n", bt_isa_name(isa), bad ? "MISMATCH" : "equal");
    return bad != 0;
}
"""

_CFLAGS = ["-O2", "-std=c11", "-fno-strict-aliasing", "-ffp-contract=off", "-pthread", "-Wall", "-Wextra", "-Werror"]


@pytest.mark.skipif(ARM_CC is None, reason="no aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_neon_builds_and_matches_scalar_under_qemu(tmp_path, march):
    """The NEON path compiles warning-free for AArch64 and, under qemu-user, equals the scalar twin."""
    src = tmp_path / "harness.c"
    src.write_text(_HARNESS)
    exe = tmp_path / "harness"
    sources = sorted(str(p) for p in CSRC.glob("*.c"))
    cmd = [ARM_CC, *_CFLAGS, f"-march={march}", f"-I{CSRC}", "-o", str(exe), str(src), *sources, "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    if QEMU is None or not os.path.isdir(ARM_SYSROOT):
        pytest.skip("compiled for AArch64; qemu-aarch64 or the arm64 sysroot is missing, so not run")
    cmd = [QEMU, "-cpu", "max", "-L", ARM_SYSROOT, str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["neon", "equal"], res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("gcc") is None or not nat.available() or not nat.isa_available("avx2"),
                    reason="needs gcc and an AVX2 CPU")
def test_portable_gemm_microkernel_matches_scalar(tmp_path):
    """With GNU C the main AVX2 GEMM microkernel is inline assembly; its C twin (BT_NO_ASM, for other
    compilers) must give the same bits: built here with it and checked against the scalar path."""
    src = tmp_path / "harness.c"
    src.write_text(_HARNESS)
    exe = tmp_path / "harness"
    sources = sorted(str(p) for p in CSRC.glob("*.c"))
    cmd = ["gcc", *_CFLAGS, "-DBT_NO_ASM", f"-I{CSRC}", "-o", str(exe), str(src), *sources, "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["avx2", "equal"], res.stdout + res.stderr


_SPIN_PROBE = r"""
import os, time, torch
from bittern.kernels import native as nat
from bittern.pack import TernaryWeight

def worker_cpu_s():
    me = os.getpid()
    total = 0
    for tid in os.listdir(f"/proc/{me}/task"):
        if int(tid) == me:
            continue  # the calling thread sleeps below; the others are the pool's workers (and torch's)
        f = open(f"/proc/{me}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])  # utime + stime, clock ticks
    return total / os.sysconf("SC_CLK_TCK")

nat.set_threads(2)
torch.set_num_threads(1)
w = TernaryWeight.from_codes(torch.randint(-1, 2, (256, 512)), torch.tensor(0.5), "2bit-r4")
q, s, rs = nat.quantize_activations(torch.randn(1, 512))
nat.matmul(q, s, rs, w)  # the worker now spins for BITTERN_SPIN_US
if os.environ.get("RELEASE") == "1":
    nat.release_cores()
time.sleep(0.05)
c0 = worker_cpu_s()
time.sleep(0.6)
print(worker_cpu_s() - c0)
y = nat.matmul(q, s, rs, w)  # the pool still works after sleeping
print(float(y.abs().sum()) > 0)
"""


@pytest.mark.skipif(not nat.available() or not Path("/proc/self/task").exists(), reason="needs the library and /proc")
def test_release_cores_stops_the_spinning_workers() -> None:
    if nat.threading_backend() != "pthread-pool":
        pytest.skip("the OpenMP build has no spinning pool of its own")
    used = {}
    for release in ("0", "1"):
        env = {**os.environ, "BITTERN_SPIN_US": "30000000", "RELEASE": release}  # spin 30 s unless released
        out = subprocess.run([sys.executable, "-c", _SPIN_PROBE], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        cpu, works = out.stdout.split()
        used[release] = float(cpu)
        assert works == "True"
    assert used["0"] > 0.25  # kept spinning through the 0.6 s sleep
    assert used["1"] < 0.1  # asleep
