"""The huge-page arena: alignment, capacity, copies, the fallback, and dropping mapped file pages."""

from __future__ import annotations

import mmap

import pytest
import torch

from bittern import hugepages
from bittern.hugepages import HUGE_PAGE_BYTES, HugePageArena


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch) -> None:
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "_THP_ENABLED", f)
    assert hugepages.thp_mode() == "madvise"
    f.write_text("always madvise [never]\n")
    assert hugepages.thp_mode() == "never" and not hugepages.huge_pages_available()
    monkeypatch.setattr(hugepages, "_THP_ENABLED", tmp_path / "missing")
    assert hugepages.thp_mode() is None and not hugepages.huge_pages_available()


@pytest.mark.parametrize("huge", [True, False])
def test_arena_pieces_are_aligned_disjoint_and_hold_their_copies(monkeypatch, huge: bool) -> None:
    if huge and not hugepages.huge_pages_available():
        pytest.skip("no transparent huge pages on this machine")
    if not huge:
        monkeypatch.setattr(hugepages, "huge_pages_available", lambda: False)
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randint(0, 256, (n, 37), dtype=torch.uint8, generator=g) for n in (5, 3000, 1)]
    srcs.append(torch.randn(33, 3, generator=g))
    arena = HugePageArena(HugePageArena.bytes_for(srcs))
    assert arena.huge == huge
    copies = [arena.copy(s) for s in srcs]
    if huge:
        assert copies[0].data_ptr() % HUGE_PAGE_BYTES == 0
    for s, c in zip(srcs, copies):
        assert c.data_ptr() % arena.align == 0 and c.is_contiguous()
        assert c.dtype == s.dtype and torch.equal(c, s) and c.data_ptr() != s.data_ptr()
    spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    copies[0].fill_(7)  # writing one piece leaves the others alone
    assert torch.equal(copies[1], srcs[1])
    with pytest.raises(MemoryError, match="full"):
        arena.empty((4096,), torch.uint8)


def test_empty_is_huge_page_aligned_when_large(monkeypatch) -> None:
    small = hugepages.empty((100, 10), torch.uint8)
    assert small.shape == (100, 10) and small.dtype == torch.uint8
    big = hugepages.empty((3, HUGE_PAGE_BYTES // 4), torch.float32)
    assert big.shape == (3, HUGE_PAGE_BYTES // 4) and big.dtype == torch.float32
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * big.numel()
    if hugepages.huge_pages_available():
        assert big.data_ptr() % HUGE_PAGE_BYTES == 0
    monkeypatch.setattr(hugepages, "huge_pages_available", lambda: False)
    assert hugepages.empty((3, HUGE_PAGE_BYTES), torch.uint8).shape == (3, HUGE_PAGE_BYTES)


def test_read_into_fills_the_tensor_from_the_file_and_reports_truncation(tmp_path) -> None:
    data = torch.randint(0, 256, (3 * mmap.PAGESIZE + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    arena = HugePageArena(4096 + 1000)
    with open(path, "rb", buffering=0) as f:
        out = hugepages.read_into(f, 77, arena.empty((4, 250), torch.uint8), 1000)
        assert torch.equal(out.reshape(-1), data[77:1077])
        wide = hugepages.read_into(f, 5, arena.empty((10,), torch.int16), 20)  # any dtype, bytes as stored
        assert torch.equal(wide.view(torch.uint8), data[5:25])
        with pytest.raises(OSError, match="ended 77 bytes early"):
            hugepages.read_into(f, len(data) - 123, torch.empty(200, dtype=torch.uint8), 200, where="blob")
        with pytest.raises(ValueError, match="do not fill"):
            hugepages.read_into(f, 0, torch.empty(10, dtype=torch.uint8), 11)
