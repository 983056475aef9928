"""In-process tests of the write-buffer pool's memory (alignfs.buffer_pool)."""

from __future__ import annotations

import ctypes
import mmap
import re
from pathlib import Path

import pytest
import trio.testing

from alignfs.buffer_pool import BufferPool, anonymous_buffer

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE = 2 << 20


def _address(mem: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mem))


def _smaps_entry(addr: int) -> str:
    """This process's smaps lines for the mapping that starts at *addr*."""
    text = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start = int(block.split("-", 1)[0], 16)
        if start == addr:
            return block
    raise AssertionError(f"no mapping at {addr:#x}")


def test_buffers_are_private_aligned_and_zeroed() -> None:
    mem = anonymous_buffer(3 * 4096)
    try:
        assert _address(mem) % mmap.PAGESIZE == 0
        assert mem[:] == bytes(3 * 4096)
        smaps = _smaps_entry(_address(mem))
        assert smaps.split()[1][3] == "p", smaps  # private, not shmem
        flags = re.search(r"VmFlags:(.*)", smaps).group(1).split()
        assert "dc" in flags, smaps  # MADV_DONTFORK: no child gets a copy
        if THP.exists():
            assert "hg" in flags, smaps  # MADV_HUGEPAGE
    finally:
        mem.close()


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="transparent huge pages are off on this system")
def test_whole_huge_pages_of_a_buffer_are_huge() -> None:
    """An 8 MiB buffer, touched once, is held in 2 MiB pages: one fault (and one
    pin per O_DIRECT write-out) per 2 MiB instead of 512."""
    mem = anonymous_buffer(4 * HUGE)
    try:
        mem[:] = b"x" * len(mem)
        smaps = _smaps_entry(_address(mem))
        huge_kb = int(re.search(r"AnonHugePages:\s+(\d+) kB", smaps).group(1))
        # khugepaged and fragmentation may deny a page now and then; most must be huge.
        assert huge_kb * 1024 >= 2 * HUGE, smaps
    finally:
        mem.close()


async def test_pool_reuses_buffers_and_wakes_a_waiting_writer() -> None:
    pool = BufferPool(4096, max_buffers=2)
    assert pool.try_take() is None  # nothing made yet
    await pool.grow()
    await pool.grow()
    assert not pool.can_grow()
    a, b = pool.try_take(), pool.try_take()
    assert a is not None and b is not None and pool.try_take() is None
    assert pool.in_use == 2
    woke = []

    async def writer() -> None:
        await pool.wait_for_free()
        woke.append(pool.try_take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        pool.give_back(a)
    assert woke == [a]  # the same memory again, not a new map
    pool.give_back(b)
    pool.give_back(a)
    pool.close()
    assert pool.in_use == 0


def _resident_bytes(mem: mmap.mmap) -> int:
    smaps = _smaps_entry(_address(mem))
    return int(re.search(r"\nRss:\s+(\d+) kB", smaps).group(1)) * 1024


async def test_growth_takes_its_slot_at_once_and_faults_the_buffer_in() -> None:
    """Two writers growing at once make no more than the bound; the new
    buffer is resident before the trio thread first copies into it, and the
    CPU that took is counted."""
    pool = BufferPool(4 * HUGE, max_buffers=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.grow)
        await trio.testing.wait_all_tasks_blocked(cushion=0.0)
        assert not pool.can_grow()  # the first grower holds the only slot
        assert pool.made == 1 and pool.in_use == 0
    mem = pool.try_take()
    assert mem is not None and pool.try_take() is None
    try:
        assert _resident_bytes(mem) == len(mem)
        assert mem[:] == bytes(len(mem))
        assert pool.touch_seconds > 0
    finally:
        pool.give_back(mem)
        pool.close()


async def test_a_failed_growth_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(size: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("alignfs.buffer_pool.touched_buffer", no_memory)
    pool = BufferPool(4096, max_buffers=1)
    with pytest.raises(OSError):
        await pool.grow()
    assert pool.can_grow() and pool.made == 0 and pool.in_use == 0
