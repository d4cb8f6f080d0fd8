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


def test_released_pages_of_a_private_file_mapping_read_back_the_file(tmp_path) -> None:
    data = torch.randint(0, 256, (5 * mmap.PAGESIZE + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = torch.frombuffer(m, dtype=torch.uint8)[77:]  # starts and ends inside pages
    assert int(view.sum()) > 0
    hugepages.release_pages(view)
    assert torch.equal(view, data[77:])
    hugepages.release_pages(view[:10])  # no whole page inside: nothing to do
    assert torch.equal(view, data[77:])
