"""In-process tests of the write-coalescing engine (WriteCache/CachedFile) and RangeSet.

The cache runs on the test's trio loop against a real backing file in
``tmp_path`` (ext4 here, so O_DIRECT works). Three BackingIO variants:

* ``BackingIO`` itself: real worker threads, as in the daemon.
* ``InlineIO``: the same syscalls run inline on the trio thread. Used with
  ``autojump_clock``: with real threads the mock clock jumps forward whenever
  the trio thread idles while a worker runs, so virtual time would race ahead
  of thread hops and age/time assertions would depend on thread speed. Inline
  I/O has no such hops, so virtual time is exact.
* ``GatedIO``: real threads, but every backing pwrite blocks (in its worker
  thread) until the test opens the gate, to hold a write-out "in flight".

Synchronisation is by events only: ``wait_all_tasks_blocked`` (a task waiting
for a worker thread counts as blocked; the gated thread cannot finish until
the test opens the gate) and ``CachedFile.write_back``/``fsync``, which
return exactly when the write-out finished.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import InlineIO, read_direct, set_faults

from alignfs.backing_io import BackingIO
from alignfs.ranges import RangeSet
from alignfs.stats import Stats
from alignfs.write_cache import WriteCache

B = 64 * 1024  # buffer size used throughout
ALIGN = 4096


# -- helpers -----------------------------------------------------------------------


class GatedIO(BackingIO):
    """Real threads; each backing pwrite waits in its worker thread for the gate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.pwrites_started = 0
        self._count_lock = threading.Lock()

    def pwrite_all(self, fd, view, offset, name):
        with self._count_lock:
            self.pwrites_started += 1
        if not self.gate.wait(timeout=30):
            raise AssertionError("test never opened the gate")
        return super().pwrite_all(fd, view, offset, name)


def key_of(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def reopener(path: Path):
    return lambda flags: os.open(path, flags)


@asynccontextmanager
async def running_cache(io: BackingIO, stats: Stats | None = None, **kwargs):
    params = dict(buffer_size=B, max_dirty=8 * B, buffers_per_file=4, flush_delay=30.0,
                  align=ALIGN)
    params.update(kwargs)
    async with WriteCache.running(io, stats or Stats(), **params) as cache:
        try:
            yield cache
        finally:
            if isinstance(io, GatedIO):
                # A failing test must not leave write-outs held: the cache's
                # exit waits for them.
                io.gate.set()


async def attach(cache: WriteCache, path: Path):
    return await cache.attach(key_of(path), reopener(path), path.name)


def model_write(model: bytearray, off: int, data: bytes) -> None:
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off:off + len(data)] = data


def model_truncate(model: bytearray, size: int) -> None:
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def trace_lines(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        name, off, length = line.rsplit(" ", 2)
        out.append((name, int(off), int(length)))
    return out


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    p = tmp_path / "backing.img"
    p.write_bytes(b"")
    return p


@pytest.fixture
def rfd(backing: Path):
    """Reads the backing file through a plain descriptor, as a Handle without
    read-ahead does (what CachedFile.read takes as *backing_read*)."""
    fd = os.open(backing, os.O_RDONLY)
    calls: list[tuple[int, int]] = []

    async def backing_read(off: int, size: int) -> bytes:
        calls.append((off, size))
        return await trio.to_thread.run_sync(os.pread, fd, size, off)

    backing_read.calls = calls  # type: ignore[attr-defined]
    yield backing_read
    os.close(fd)


# -- RangeSet against a brute-force model ----------------------------------------------


def _runs(covered: set[int], lo: int, hi: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(lo, hi):
        if i in covered:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_rangeset_matches_bruteforce_model(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([16, 64, 300])
    rs = RangeSet()
    model: set[int] = set()
    for _ in range(1500):
        a = rng.randrange(0, n + 1)
        b = rng.randrange(0, n + 1)
        if rng.random() < 0.1:
            b = a  # empty ranges
        s, e = min(a, b), max(a, b)
        if rng.random() < 0.6:
            newly = len(set(range(s, e)) - model)
            assert rs.add(s, e) == newly
            model |= set(range(s, e))
        else:
            gone = len(set(range(s, e)) & model)
            assert rs.remove(s, e) == gone
            model -= set(range(s, e))
        runs = _runs(model, 0, n + 1)
        assert list(rs) == runs
        assert len(rs) == len(runs)
        assert bool(rs) == bool(runs)
        assert rs.total() == len(model)
        if runs:
            assert rs.first() == runs[0][0]
            assert rs.last() == runs[-1][1]
        # queries on another random interval
        a = rng.randrange(0, n + 1)
        b = rng.randrange(0, n + 1)
        qs, qe = min(a, b), max(a, b)
        inside = set(range(qs, qe))
        if qs < qe:  # empty queries: see test_rangeset_intersect_of_empty_interval
            assert list(rs.intersect(qs, qe)) == _runs(model & inside, qs, qe)
        assert rs.gaps(qs, qe) == _runs(inside - model, qs, qe)
        assert rs.covers(qs, qe) == inside.issubset(model)


def test_rangeset_stream_that_rewrites_its_tail() -> None:
    """QEMU's savevm pattern: each chunk is written twice from a point inside
    the covered tail (the last range grows; nothing else may change)."""
    rs = RangeSet()
    rs.add(0, 10)  # an earlier, separate range stays as it is
    model = set(range(0, 10))
    pos = 100
    for step in range(40):
        start = pos - (step % 3)  # at the tail's end or inside it
        for end in (start + 9, start + 33):
            assert rs.add(start, end) == len(set(range(start, end)) - model)
            model |= set(range(start, end))
        pos = start + 33
        assert list(rs) == _runs(model, 0, pos + 1)


def test_rangeset_writer_eating_into_the_hole_ahead() -> None:
    """CachedFile.holes under a sequential writer: each write removes a
    range that starts at or before the first hole and ends inside it (the
    first range shrinks); and removals wholly before it change nothing."""
    rs = RangeSet()
    rs.add(100, 400)
    rs.add(500, 600)
    model = set(range(100, 400)) | set(range(500, 600))
    pos = 90
    for step in range(60):
        start = pos - (step % 4)  # overlapping what was written already
        end = start + 7 + step % 5
        assert rs.remove(start, end) == len(set(range(start, end)) & model)
        model -= set(range(start, end))
        pos = end
        assert list(rs) == _runs(model, 0, 601)
    assert rs.remove(0, 50) == 0 and list(rs) == _runs(model, 0, 601)


def test_rangeset_intersect_of_empty_interval() -> None:
    rs = RangeSet()
    rs.add(30, 40)
    # an empty interval has no covered parts (not a zero-length one)
    assert list(rs.intersect(37, 37)) == []
    assert list(rs.intersect(45, 45)) == []
    assert rs.gaps(37, 37) == []


def test_rangeset_merges_touching_ranges() -> None:
    rs = RangeSet()
    rs.add(10, 20)
    rs.add(30, 40)
    assert rs.add(20, 30) == 10
    assert list(rs) == [(10, 40)]
    assert rs.remove(15, 25) == 10
    assert list(rs) == [(10, 15), (25, 40)]
    assert rs.covers(25, 40) and not rs.covers(14, 26) and rs.covers(5, 5)


# -- filling, sealing, write-out ---------------------------------------------------------


async def test_any_order_fills_window_sealed_once_one_aligned_pwrite(
        backing: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    rng = random.Random(1)
    data = rng.randbytes(B)
    # cut window 1 into unaligned pieces, write them shuffled
    cuts = sorted(rng.sample(range(1, B), 40))
    pieces = list(zip([0, *cuts], [*cuts, B], strict=True))
    rng.shuffle(pieces)
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        for i, (s, e) in enumerate(pieces):
            await cf.write(B + s, data[s:e])
            if i < len(pieces) - 1:
                assert sum(stats.flushes.values()) == 0  # incomplete: kept filling
                assert not cf.queue
        assert cf.size == 2 * B
        # the full window is written either at once or when it is given up (the
        # file moves on, fsync, close): either way as one buffer
        await cf.write_back("fsync")
        assert sum(stats.flushes.values()) == 1
        assert stats.backing_writes == 1
        assert stats.backing_write_bytes == B
        assert stats.rmw_block_reads == 0
        assert stats.unaligned_backing_writes == 0
        assert stats.dirty_bytes == 0
        assert trace_lines(trace) == [(backing.name, B, B)]
        assert read_direct(backing) == bytes(B) + data
        cache.detach(cf)
    io.close()
    assert stats.write_requests == len(pieces)
    assert stats.write_bytes == B


async def test_overlapping_writes_keep_newest_bytes_and_partial_blocks_rmw(
        backing: Path, rfd, tmp_path: Path) -> None:
    old = random.Random(2).randbytes(B + 5000)
    backing.write_bytes(old)
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    model = bytearray(old)
    rng = random.Random(3)
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        for _ in range(60):
            off = rng.randrange(0, 2 * B)
            n = rng.randrange(1, 3000)
            n = min(n, 2 * B - off)  # stay within windows 0 and 1, never filling them
            data = rng.randbytes(n)
            await cf.write(off, data)
            model_write(model, off, data)
        assert stats.flushes["full"] == 0
        assert await cf.read(0, 3 * B, rfd) == bytes(model)
        await cf.fsync(False)
        assert read_direct(backing) == bytes(model)
        assert stats.unaligned_backing_writes == 0
        # one pwrite per contiguous extent, each aligned; only the last block
        # below EOF is written short (through the page cache, never padded)
        for _, off, length in trace_lines(trace):
            assert off % ALIGN == 0
            assert length % ALIGN == 0 or off + length == len(model)
        assert stats.tail_writes == sum(length % ALIGN != 0 for *_, length in
                                        trace_lines(trace))
        assert stats.backing_writes == len(trace_lines(trace))
        # only partly covered blocks inside the old file were read back
        assert 0 < stats.rmw_block_reads
        cache.detach(cf)
    io.close()


async def test_random_writes_truncates_reads_against_model(backing: Path, rfd) -> None:
    """Unaligned, overlapping, sparse, past-EOF writes; truncates; pressure; moved-on."""
    for seed in range(4):
        rng = random.Random(100 + seed)
        backing.write_bytes(rng.randbytes(rng.randrange(0, 3 * B)))
        model = bytearray(backing.read_bytes())
        io = BackingIO(3)
        stats = Stats()
        async with running_cache(io, stats, max_dirty=3 * B, buffers_per_file=2) as cache:
            cf = await attach(cache, backing)
            for step in range(250):
                r = rng.random()
                if r < 0.6:
                    off = rng.randrange(0, 6 * B)
                    n = rng.choice([1, 7, 511, 4096, 5000, rng.randrange(1, 2 * B + 100)])
                    data = rng.randbytes(n)
                    await cf.write(off, data)
                    model_write(model, off, data)
                elif r < 0.7:
                    size = rng.randrange(0, 6 * B)
                    await cf.truncate(size)
                    model_truncate(model, size)
                elif r < 0.75:
                    await cf.fsync(rng.random() < 0.5)
                    assert read_direct(backing) == bytes(model), (seed, step)
                else:
                    off = rng.randrange(0, 7 * B)
                    n = rng.randrange(1, 2 * B)
                    assert await cf.read(off, n, rfd) == bytes(model[off:off + n]), (seed, step)
                assert cf.size == len(model), (seed, step)
                assert stats.buffers_in_use <= 3
            await cf.fsync(False)
            assert read_direct(backing) == bytes(model), seed
            assert stats.dirty_bytes == 0
            assert stats.unaligned_backing_writes == 0
            assert stats.flushes["moved_on"] + stats.flushes["pressure"] > 0
            cache.detach(cf)
        io.close()


async def test_reads_overlay_buffered_data_on_backing(backing: Path, rfd) -> None:
    old = bytes(range(256)) * (3 * B // 256)
    backing.write_bytes(old)
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(100, b"A" * 50)
        await cf.write(B - 10, b"B" * 30)  # spans windows 0 and 1
        expect = bytearray(old)
        expect[100:150] = b"A" * 50
        expect[B - 10:B + 20] = b"B" * 30

        # entirely inside buffered bytes: no backing read
        assert await cf.read(110, 20, rfd) == b"A" * 20
        assert await cf.read(B - 10, 30, rfd) == b"B" * 30
        assert stats.reads_from_buffers == 2
        assert rfd.calls == []

        # straddling buffered and backing bytes: one backing read, overlaid
        assert await cf.read(0, 3 * B, rfd) == bytes(expect)
        assert len(rfd.calls) == 1
        assert stats.reads_from_buffers == 2
        assert await cf.read(90, 70, rfd) == bytes(expect[90:160])
        # beyond EOF
        assert await cf.read(3 * B, 10, rfd) == b""
        assert await cf.read(3 * B - 5, 10, rfd) == bytes(expect[-5:])
        # a hole between BACKING's end and buffered data past it: zeros, and
        # nothing to ask BACKING for
        await cf.write(5 * B, b"C" * 10)
        calls = len(rfd.calls)
        assert await cf.read(4 * B, B + 20, rfd) == bytes(B) + b"C" * 10
        assert len(rfd.calls) == calls
        cache.detach(cf)


async def test_read_sees_buffer_whose_write_out_is_in_flight(backing: Path, rfd) -> None:
    backing.write_bytes(b"o" * (2 * B))
    io = GatedIO(4)
    stats = Stats()
    try:
        async with running_cache(io, stats) as cache:
            cf = await attach(cache, backing)
            await cf.write(10, b"x" * 100)
            cf.start_write_back("fsync")
            await trio.testing.wait_all_tasks_blocked()
            assert cf.flushing and cf.queue  # held at the gate (or on its way there)
            await cf.write(50, b"y" * 10)  # a newer buffer for the same window
            got = await cf.read(0, 200, rfd)
            assert got == b"o" * 10 + b"x" * 40 + b"y" * 10 + b"x" * 50 + b"o" * 90
            io.gate.set()
            await cf.fsync(False)
            assert read_direct(backing)[:200] == got
            cache.detach(cf)
    finally:
        io.gate.set()


async def test_newer_buffer_for_same_window_lands_last(backing: Path) -> None:
    """Two sealed buffers for one window: FIFO write-out, so the newest bytes win.
    A write into a window whose buffer is in write-out starts a new buffer;
    one whose newest buffer is only queued lands there (see queued_open)."""
    io = GatedIO(4)
    stats = Stats()
    try:
        async with running_cache(io, stats) as cache:
            cf = await attach(cache, backing)
            await cf.write(0, b"1" * 6000)
            cf.start_write_back("fsync")
            await trio.testing.wait_all_tasks_blocked()  # its write-out is under way
            await cf.write(4000, b"2" * 100)
            cf.start_write_back("fsync")
            await cf.write(4050, b"3" * 10)  # into the second buffer, still queued
            cf.start_write_back("fsync")
            assert len(cf.queue) == 2 and not cf.filling
            assert cf.queue[0].writing and not cf.queue[1].writing
            io.gate.set()
            await cf.fsync(False)
            assert read_direct(backing) == b"1" * 4000 + b"2" * 50 + b"3" * 10 \
                + b"2" * 40 + b"1" * 1900
            cache.detach(cf)
    finally:
        io.gate.set()


# -- truncate ------------------------------------------------------------------------------


async def test_truncate_shrink_and_grow_with_buffered_data(backing: Path, rfd) -> None:
    old = b"o" * (B + 100)
    backing.write_bytes(old)
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(B - 50, b"w" * (B + 200))  # windows 0..2, size 2B+150
        assert cf.size == 2 * B + 150
        await cf.truncate(B - 20)  # drops window 1 and 2 data, keeps 30 bytes
        assert cf.size == B - 20
        assert os.stat(backing).st_size == B - 20
        assert stats.dirty_bytes == 30
        assert await cf.read(0, 3 * B, rfd) == old[:B - 50] + b"w" * 30
        await cf.truncate(2 * B)  # grow: zeros, never the dropped bytes
        expect = old[:B - 50] + b"w" * 30 + bytes(B + 20)
        assert await cf.read(0, 3 * B, rfd) == expect
        await cf.write(B + 7, b"n" * 3)
        expect = expect[:B + 7] + b"nnn" + expect[B + 10:]
        await cf.fsync(False)
        assert read_direct(backing) == expect
        assert stats.dirty_bytes == 0
        await cf.truncate(5)
        await cf.fsync(True)
        assert read_direct(backing) == b"ooooo"
        cache.detach(cf)


async def test_truncate_waits_for_in_flight_write_out(backing: Path, rfd) -> None:
    io = GatedIO(4)
    stats = Stats()
    try:
        async with running_cache(io, stats) as cache:
            cf = await attach(cache, backing)
            await cf.write(0, b"a" * (B + 10))
            cf.start_write_back("fsync")  # window 0's write-out is held at the gate
            await trio.testing.wait_all_tasks_blocked()  # the flusher holds the lock now
            assert cf.lock.locked()
            done = trio.Event()

            async def shrink():
                await cf.truncate(100)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(shrink)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()  # blocked behind the write-out's lock
                io.gate.set()
            assert cf.size == 100
            await cf.fsync(False)
            # the pwrite of window 0 must not land after the truncate
            assert read_direct(backing) == b"a" * 100
            cache.detach(cf)
    finally:
        io.gate.set()


# -- fsync, close, unmount -----------------------------------------------------------------


async def test_fsync_makes_backing_hold_the_data(backing: Path) -> None:
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        data = random.Random(5).randbytes(3 * B + 1234)
        await cf.write(777, data)
        await cf.fsync(False)
        assert read_direct(backing) == bytes(777) + data
        assert stats.backing_fsyncs == 1
        # windows 1, 2 full (written at once or at the fsync), 0 and 3 partial
        assert stats.flushes["fsync"] + stats.flushes["full"] == 4
        assert stats.flushes["fsync"] >= 2
        assert stats.backing_writes == 4
        assert stats.dirty_bytes == 0 and stats.buffers_in_use == 0
        await cf.fsync(False)  # nothing new: no second backing fsync
        assert stats.backing_fsyncs == 1
        await cf.fsync(True)  # datasync after full sync: also nothing to do
        assert stats.backing_fsyncs == 1
        await cf.write(0, b"z")
        await cf.fsync(True)
        assert stats.backing_fsyncs == 2
        assert read_direct(backing)[:1] == b"z"
        cache.detach(cf)


async def test_last_handle_close_writes_back_and_forgets_file(backing: Path) -> None:
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        cf2 = await attach(cache, backing)
        assert cf2 is cf and cf.handles == 2
        await cf.write(3, b"hello")
        cache.detach(cf)
        assert stats.flushes["close"] == 0  # another handle is open
        assert cf.filling
        cache.detach(cf)
        assert stats.flushes["close"] == 1
        await cf.write_back("close")  # wait for it
        assert read_direct(backing) == b"\0\0\0hello"
        assert key_of(backing) not in cache.files


async def test_unmount_writes_everything_of_every_file(tmp_path: Path) -> None:
    paths = [tmp_path / f"f{i}" for i in range(3)]
    for p in paths:
        p.write_bytes(b"")
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        for i, p in enumerate(paths):
            cf = await attach(cache, p)
            await cf.write(i * 1000, bytes([65 + i]) * (i * B + 10))
            # handles stay open, as at an unmount with open files
    # f0: window 0; f1: windows 0, 1; f2: windows 0, 1 (full), 2
    assert stats.flushes["unmount"] + stats.flushes["full"] == 6
    assert stats.flushes["unmount"] >= 5
    assert stats.backing_fsyncs == 3
    for i, p in enumerate(paths):
        assert read_direct(p) == bytes(i * 1000) + bytes([65 + i]) * (i * B + 10)


async def test_moved_on_seals_least_recently_written_window(backing: Path) -> None:
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats, buffers_per_file=2) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"a")
        await cf.write(B, b"b")
        assert stats.flushes["moved_on"] == 0
        await cf.write(2 * B, b"c")
        assert stats.flushes["moved_on"] == 1
        assert [b.window for b in cf.queue] == [0]
        assert list(cf.filling) == [B, 2 * B]
        await cf.fsync(False)
        cache.detach(cf)
    expect = bytearray(2 * B + 1)
    expect[0], expect[B], expect[2 * B] = ord("a"), ord("b"), ord("c")
    assert read_direct(backing) == bytes(expect)


# -- backpressure --------------------------------------------------------------------------


async def test_backpressure_writer_waits_for_write_out_and_never_fails(
        backing: Path) -> None:
    io = GatedIO(4)
    stats = Stats()
    try:
        async with running_cache(io, stats, max_dirty=2 * B) as cache:
            cf = await attach(cache, backing)
            await cf.write(0, b"0" * B)  # sealed full, write-out held at the gate
            await cf.write(B, b"1" * B)  # sealed full, queued behind it
            assert stats.buffers_in_use == 2
            finished = []

            async def writer(k: int) -> None:
                await cf.write(k * B + 5, bytes([48 + k]) * 10)
                finished.append(k)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, 2)
                nursery.start_soon(writer, 3)
                await trio.testing.wait_all_tasks_blocked()
                assert finished == []  # both wait for memory
                assert stats.buffers_in_use == 2
                assert cf.size == 2 * B
                io.gate.set()  # write-outs complete; writers get buffers
            assert sorted(finished) == [2, 3]
            assert cache.pool._allocated <= 2  # never more memory than max_dirty
            await cf.fsync(False)
            expect = bytearray(b"0" * B + b"1" * B)
            model_write(expect, 2 * B + 5, b"2" * 10)
            model_write(expect, 3 * B + 5, b"3" * 10)
            assert read_direct(backing) == bytes(expect)
            assert stats.peak_dirty_bytes <= 2 * B
            cache.detach(cf)
    finally:
        io.gate.set()


def _window(k: int) -> bytes:
    return bytes([48 + k]) * B


async def _fill_three_windows(cf) -> None:
    """Windows 0..2, one buffer filling at a time (buffers_per_file=1): 0 and 1
    sealed (0 held at the gate), 2 filling."""
    for k in range(3):
        await cf.write(k * B, _window(k))
    assert len(cf.queue) == 2


async def test_writeout_queue_makes_a_stream_wait_for_the_disk_not_for_memory(
        backing: Path) -> None:
    """--writeout-queue: a stream that outruns the disk waits once its file has
    that many buffers sealed, though the pool has memory to spare."""
    io = GatedIO(4)
    stats = Stats()
    async with running_cache(io, stats, max_dirty=8 * B, buffers_per_file=1,
                             writeout_queue=2) as cache:
        cf = await attach(cache, backing)
        await _fill_three_windows(cf)
        finished = []

        async def fourth() -> None:
            await cf.write(3 * B, _window(3))
            finished.append(3)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fourth)
            await trio.testing.wait_all_tasks_blocked()
            assert finished == []
            assert len(cf.queue) == 2
            assert cache.pool.made == 3
            io.gate.set()
        assert finished == [3]
        assert cache.pool.made == 3  # window 3 reused window 0's memory
        assert stats.writer_wait_seconds > 0
        await cf.fsync(False)
        assert read_direct(backing) == b"".join(_window(k) for k in range(4))
        cache.detach(cf)


async def test_without_a_writeout_queue_bound_the_stream_takes_more_memory(
        backing: Path) -> None:
    """The same stream with --writeout-queue 0: only the pool bounds it."""
    io = GatedIO(4)
    async with running_cache(io, Stats(), max_dirty=8 * B, buffers_per_file=1,
                             writeout_queue=0) as cache:
        cf = await attach(cache, backing)
        await _fill_three_windows(cf)
        await cf.write(3 * B, _window(3))
        assert len(cf.queue) == 3
        assert cache.pool.made == 4
        io.gate.set()
        await cf.fsync(False)
        cache.detach(cf)


async def test_writeout_queue_bounds_kernel_writeback_whose_full_windows_seal_at_once(
        backing: Path) -> None:
    """Pages of the kernel's writeback (FUSE writeback cache) fill a window
    and seal it at once, so the file never fills buffers_per_file: the bound
    must hold all the same."""
    io = GatedIO(4)
    async with running_cache(io, Stats(), max_dirty=8 * B, buffers_per_file=4,
                             writeout_queue=2) as cache:
        cache.kernel_times = True
        cf = await attach(cache, backing)
        for k in range(2):
            await cf.write(k * B, _window(k), refuse_failing=False)
        assert (len(cf.queue), len(cf.filling)) == (2, 0)
        finished = []

        async def third() -> None:
            await cf.write(2 * B, _window(2), refuse_failing=False)
            finished.append(2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            assert finished == []
            assert cache.pool.made == 2
            io.gate.set()
        assert finished == [2]
        assert cache.pool.made == 2
        await cf.fsync(False)
        assert read_direct(backing) == b"".join(_window(k) for k in range(3))
        cache.detach(cf)


async def test_writer_waiting_for_the_writeout_queue_gets_the_files_error(
        backing: Path, tmp_path: Path) -> None:
    """The write-out the writer waits for fails: the writer fails with it, and
    the file's data is kept for the retry."""
    faults = tmp_path / "faults.json"
    io = GatedIO(4, fault_file=faults)
    async with running_cache(io, Stats(), max_dirty=8 * B, buffers_per_file=1,
                             writeout_queue=2) as cache:
        cf = await attach(cache, backing)
        await _fill_three_windows(cf)
        raised: list[OSError] = []

        async def fourth() -> None:
            try:
                await cf.write(3 * B, _window(3))
            except OSError as exc:
                raised.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fourth)
            await trio.testing.wait_all_tasks_blocked()
            assert raised == []
            set_faults(faults, {"write": "EIO"})
            io.gate.set()
        assert [e.errno for e in raised] == [errno.EIO]
        assert 3 * B not in cf.filling
        set_faults(faults, None)
        await cf.fsync(False)
        assert read_direct(backing) == b"".join(_window(k) for k in range(3))
        cache.detach(cf)


async def test_pressure_seals_oldest_filling_buffer_of_another_file(tmp_path: Path) -> None:
    paths = [tmp_path / f"p{i}" for i in range(3)]
    for p in paths:
        p.write_bytes(b"")
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats, max_dirty=2 * B) as cache:
        cfs = [await attach(cache, p) for p in paths]
        await cfs[0].write(0, b"a" * 10)
        await cfs[1].write(0, b"b" * 10)
        await cfs[2].write(0, b"c" * 10)  # no memory: the oldest (file 0) is sealed
        assert stats.flushes["pressure"] >= 1
        assert not cfs[0].filling
        assert stats.buffers_in_use <= 2
        for cf in cfs:
            await cf.fsync(False)
            cache.detach(cf)
    for p, c in zip(paths, b"abc", strict=True):
        assert read_direct(p) == bytes([c]) * 10


# -- errors ----------------------------------------------------------------------------------


async def test_failing_pwrite_surfaces_on_fsync_then_recovers(
        backing: Path, rfd, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EIO"})
    io = BackingIO(2, fault_file=faults)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"q" * 5000)
        with pytest.raises(OSError) as info:
            await cf.fsync(False)
        assert info.value.errno == errno.EIO
        assert stats.backing_errors >= 1
        assert stats.backing_fsyncs == 0
        # the file refuses new data while failing ...
        with pytest.raises(OSError) as info:
            await cf.write(10, b"r")
        assert info.value.errno == errno.EIO
        # ... but still reads its buffered data
        assert await cf.read(0, 10000, rfd) == b"q" * 5000
        # still failing: a retry fails again, nothing lost
        with pytest.raises(OSError):
            await cf.fsync(True)
        set_faults(faults, None)  # fault gone
        await cf.fsync(False)
        assert read_direct(backing) == b"q" * 5000
        assert cf.error is None
        await cf.write(10, b"r")
        await cf.fsync(False)
        assert read_direct(backing) == b"q" * 10 + b"r" + b"q" * 4989
        cache.detach(cf)


async def test_fault_on_one_file_does_not_affect_another(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.img", tmp_path / "good.img"
    bad.write_bytes(b"")
    good.write_bytes(b"")
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "ENOSPC", "match": "bad"})
    io = BackingIO(2, fault_file=faults)
    async with running_cache(io, Stats()) as cache:
        cfb, cfg = await attach(cache, bad), await attach(cache, good)
        await cfb.write(0, b"b" * 100)
        await cfg.write(0, b"g" * 100)
        with pytest.raises(OSError) as info:
            await cfb.fsync(False)
        assert info.value.errno == errno.ENOSPC
        await cfg.fsync(False)
        assert read_direct(good) == b"g" * 100
        set_faults(faults, None)
        await cfb.fsync(False)
        assert read_direct(bad) == b"b" * 100
        cache.detach(cfb)
        cache.detach(cfg)


async def test_failing_fsync_is_reported_and_retried(backing: Path, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    set_faults(faults, {"fsync": "EIO"})
    io = BackingIO(2, fault_file=faults)
    async with running_cache(io, Stats()) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"s" * 10)
        with pytest.raises(OSError) as info:
            await cf.fsync(False)
        assert info.value.errno == errno.EIO
        set_faults(faults, None)
        # the failed fsync must not count as done: a retry really syncs
        await cf.fsync(False)
        assert read_direct(backing) == b"s" * 10
        cache.detach(cf)


async def test_unmount_with_persistent_fault_reports_and_keeps_data(
        backing: Path, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EIO"})
    io = BackingIO(2, fault_file=faults)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"u" * 10)
        failures = await cache.flush_all("unmount")
        assert [(name, exc.errno) for name, exc in failures] == [(backing.name, errno.EIO)]
        assert cache.unwritten_bytes() == 10
        set_faults(faults, None)
        assert await cache.flush_all("unmount") == []
        assert cache.unwritten_bytes() == 0
        cache.detach(cf)
    assert read_direct(backing) == b"u" * 10


# -- age -----------------------------------------------------------------------------------


async def test_age_flush_after_flush_delay(backing: Path, autojump_clock) -> None:
    io = InlineIO(1)
    stats = Stats()
    async with running_cache(io, stats, flush_delay=5.0) as cache:
        cf = await attach(cache, backing)
        t0 = trio.current_time()
        await cf.write(0, b"a" * 100)
        await trio.sleep_until(t0 + 3.9)
        assert stats.flushes["age"] == 0
        assert read_direct(backing) == b""
        await trio.sleep_until(t0 + 5.01)  # flushed within flush_delay
        assert stats.flushes["age"] == 1
        assert stats.backing_writes == 1
        assert read_direct(backing) == b"a" * 100
        assert not cf.dirty
        # the age counts from the buffer's first write, not its last
        t1 = trio.current_time()
        for i in range(8):
            await cf.write(i, b"b")
            await trio.sleep(0.45)
        assert stats.flushes["age"] == 1
        await trio.sleep_until(t1 + 5.01)
        assert stats.flushes["age"] == 2
        assert read_direct(backing) == b"b" * 8 + b"a" * 92
        cache.detach(cf)


async def test_failing_write_out_is_retried_by_age_timer(
        backing: Path, tmp_path: Path, autojump_clock) -> None:
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EIO"})
    io = InlineIO(1, fault_file=faults)
    stats = Stats()
    async with running_cache(io, stats, flush_delay=2.0) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"t" * 10)
        cache.detach(cf)  # close: write-out starts and fails
        await trio.testing.wait_all_tasks_blocked()
        assert cf.error is not None and cf.dirty
        errors = stats.backing_errors
        set_faults(faults, None)
        await trio.sleep(5)  # the age timer retries a failing file after flush_delay
        assert cf.error is None and not cf.dirty
        assert stats.backing_errors == errors
        assert read_direct(backing) == b"t" * 10
        assert key_of(backing) not in cache.files


# -- liveness while a file's write-out fails -------------------------------------------------


async def test_writer_waiting_for_memory_gets_the_files_error(
        backing: Path, tmp_path: Path, autojump_clock) -> None:
    """A writer of a failing file that waits for memory must fail, not hang.

    The file's own sealed buffers pin all memory and their write-out fails;
    no buffer will come back until the fault is gone. "Later writes raise"
    must hold for a writer already waiting too.
    """
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EIO"})
    io = InlineIO(1, fault_file=faults)
    async with running_cache(io, Stats(), max_dirty=2 * B, flush_delay=2.0) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"a" * B)
        await cf.write(B, b"b" * B)
        raised: list[OSError] = []
        with trio.move_on_after(30) as scope:  # virtual time: 15 flush delays
            try:
                await cf.write(2 * B, b"c" * 10)
            except OSError as exc:
                raised.append(exc)
        assert not scope.cancelled_caught, \
            "write still waiting for memory pinned by the file's failing write-out"
        assert [e.errno for e in raised] == [errno.EIO]
        set_faults(faults, None)
        await cf.fsync(False)
        assert read_direct(backing) == b"a" * B + b"b" * B
        cache.detach(cf)


async def test_failing_file_does_not_starve_other_files_forever(
        tmp_path: Path, autojump_clock) -> None:
    """Memory pinned by one failing file must not block writers of other files forever."""
    bad, good = tmp_path / "bad.img", tmp_path / "good.img"
    bad.write_bytes(b"")
    good.write_bytes(b"")
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "ENOSPC", "match": "bad"})
    io = InlineIO(1, fault_file=faults)
    async with running_cache(io, Stats(), max_dirty=2 * B, flush_delay=2.0) as cache:
        cfb, cfg = await attach(cache, bad), await attach(cache, good)
        await cfb.write(0, b"a" * B)
        await cfb.write(B, b"b" * B)  # both sealed; their write-out fails
        outcome: list[object] = []
        with trio.move_on_after(30) as scope:  # virtual time: 15 flush delays
            try:
                await cfg.write(0, b"g" * 10)
                outcome.append("written")
            except OSError as exc:
                outcome.append(exc)
        assert not scope.cancelled_caught, \
            "writer of a healthy file waits forever for memory pinned by a failing file"
        assert outcome == ["written"]
        await cfg.fsync(False)
        assert read_direct(good) == b"g" * 10
        set_faults(faults, None)
        await cfb.fsync(False)
        await cfg.fsync(False)
        cache.detach(cfb)
        cache.detach(cfg)


async def test_healthy_file_gets_memory_beyond_buffers_stuck_on_failing_file(
        tmp_path: Path, autojump_clock) -> None:
    """Once a file's write-out has failed, its stuck buffers do not count against
    max_dirty for others: a healthy file's writer gets a buffer at once."""
    bad, good = tmp_path / "bad.img", tmp_path / "good.img"
    bad.write_bytes(b"")
    good.write_bytes(b"")
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "ENOSPC", "match": "bad"})
    io = InlineIO(1, fault_file=faults)
    stats = Stats()
    async with running_cache(io, stats, max_dirty=2 * B, flush_delay=2.0) as cache:
        cfb, cfg = await attach(cache, bad), await attach(cache, good)
        await cfb.write(0, b"a" * B)
        await cfb.write(B, b"b" * B)
        cfb.start_write_back("close")
        await trio.testing.wait_all_tasks_blocked()  # the write-out failed
        assert cfb.error is not None and len(cfb.queue) == 2
        with trio.fail_after(1):
            await cfg.write(0, b"g" * (B + 10))
        await cfg.fsync(False)
        assert read_direct(good) == b"g" * (B + 10)
        set_faults(faults, None)
        await cfb.fsync(False)
        assert read_direct(bad) == b"a" * B + b"b" * B
        cache.detach(cfb)
        cache.detach(cfg)


async def test_clean_file_forgotten_after_truncate_during_last_write_out(
        backing: Path) -> None:
    """A truncate (by path, no handle) that waited for the last write-out must not
    leave the closed file's CachedFile (and its descriptor) behind: a stale entry
    keeps answering size and reads from its own idea of the file forever."""
    io = GatedIO(4)
    try:
        async with running_cache(io, Stats()) as cache:
            cf = await attach(cache, backing)
            await cf.write(0, b"x" * 100)
            cache.detach(cf)  # last handle closed: write-out starts, held at the gate
            await trio.testing.wait_all_tasks_blocked()
            assert cf.lock.locked()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cf.truncate, 50)  # as setattr(size) does via cache.files
                await trio.testing.wait_all_tasks_blocked()
                io.gate.set()
            assert read_direct(backing) == b"x" * 50
            assert key_of(backing) not in cache.files
    finally:
        io.gate.set()


# -- permanent write-out errors (data dropped, reported once) ------------------------------


async def test_permanent_write_error_drops_data_and_fsync_reports_it(
        backing: Path, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EFBIG"})
    io = BackingIO(2, fault_file=faults)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(2 * B, b"p" * 10)
        with pytest.raises(OSError) as info:
            await cf.fsync(False)
        assert info.value.errno == errno.EFBIG
        assert not cf.dirty and stats.dirty_bytes == 0  # dropped, memory back
        assert stats.backing_errors == 1
        await cf.fsync(False)  # reported once
        set_faults(faults, None)
        with pytest.raises(OSError) as info:  # EFBIG from there on: fails at once
            await cf.write(2 * B + 4096, b"x")
        assert info.value.errno == errno.EFBIG
        await cf.write(0, b"n" * 5)
        await cf.fsync(False)
        # the size the client saw stays; the dropped bytes read as a hole
        assert cf.size == 2 * B + 10
        assert read_direct(backing) == b"n" * 5 + bytes(4096 - 5)
        cache.detach(cf)


async def test_permanent_write_error_not_swallowed_by_a_later_write(
        backing: Path, tmp_path: Path) -> None:
    """Data dropped for good must fail the next fsync.

    If the error is handed to whatever call comes first -- here an unrelated
    write -- and the following fsync succeeds, an application that retries
    that write and fsyncs believes everything before is durable, while the
    dropped bytes are gone.
    """
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EFBIG"})
    io = BackingIO(2, fault_file=faults)
    async with running_cache(io, Stats()) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"p" * 10)
        await cf.write_back("close")  # as after close(): the write-out drops the data
        assert not cf.dirty
        set_faults(faults, None)
        try:
            await cf.write(100, b"w")  # may report the loss as well ...
        except OSError as exc:
            assert exc.errno == errno.EFBIG
        with pytest.raises(OSError) as info:  # ... but fsync must
            await cf.fsync(False)
        assert info.value.errno == errno.EFBIG
        cache.detach(cf)


async def test_einval_keeps_the_data_buffered_and_retries(
        backing: Path, tmp_path: Path) -> None:
    """EINVAL is what O_DIRECT answers to a misaligned write: a bug of ours (or a
    backing filesystem that changed its mind), not a property of the data. It
    is not dropped: the write-out is retried and works once the cause is gone."""
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EINVAL"})
    io = BackingIO(2, fault_file=faults)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"p" * 10)
        with pytest.raises(OSError) as info:
            await cf.fsync(False)
        assert info.value.errno == errno.EINVAL
        assert cf.dirty and stats.dirty_bytes == 10  # kept
        with pytest.raises(OSError):
            await cf.write(20, b"w")  # refused while the write-out fails
        set_faults(faults, None)
        await cf.fsync(False)  # the retry writes it
        assert read_direct(backing) == b"p" * 10
        cache.detach(cf)


async def test_lost_write_is_remembered_after_its_file_is_dropped(
        backing: Path, tmp_path: Path) -> None:
    """Data dropped for good (EFBIG) after the last close: the CachedFile is
    forgotten, yet every flush_all and the unmount (close) report the loss,
    naming file and offset, and the next fsync of the file, reopened, fails.

    Before, the loss lived only in the dropped CachedFile: flush_all and
    close returned nothing, so ``alignfs flush``/``umount`` exited 0.
    """
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EFBIG"})
    io = InlineIO(2, fault_file=faults)
    stats = Stats()
    far = 10 * B  # EFBIG lowers the mount's offset limit to this window
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(far + 5, b"L" * 100)
        cache.detach(cf)  # last close: the write-out drops the data, then the file
        await trio.testing.wait_all_tasks_blocked()
        assert key_of(backing) not in cache.files
        set_faults(faults, None)
        for _ in range(2):  # remembered for the rest of the mount
            failures = await cache.flush_all("unmount")
            assert [(name, exc.errno) for name, exc in failures] == \
                [(backing.name, errno.EFBIG)]
            assert f"offset {far + 5}" in str(failures[0][1])
        assert stats.lost_writes == 1 and stats.lost_bytes == 100
        cf = await attach(cache, backing)  # reopened: the loss is not forgotten
        with pytest.raises(OSError) as info:
            cf.raise_error()  # the next flush (close) of the file
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError) as info:
            await cf.fsync(False)
        assert info.value.errno == errno.EFBIG
        await cf.fsync(False)  # reported to fsync once
        cache.detach(cf)
    assert [(name, exc.errno) for name, exc in cache.unmount_failures] == \
        [(backing.name, errno.EFBIG)]


async def test_close_returns_what_it_could_not_write(backing: Path, tmp_path: Path) -> None:
    """close() (unmount) returns its failures, so the daemon can exit 6 (it only
    logged them, and the daemon looked only for files still dirty)."""
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write": "EIO"})
    io = InlineIO(2, fault_file=faults)
    async with running_cache(io, Stats()) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"k" * 10)
        failures = await cache.close()
        assert [(name, exc.errno) for name, exc in failures] == [(backing.name, errno.EIO)]
        assert cf.dirty  # kept
        set_faults(faults, None)
        cache.detach(cf)


def _efbig_offset(tmp_path: Path) -> int | None:
    """An offset at which this filesystem refuses writes with EFBIG (ext4: 16 TiB)."""
    probe = tmp_path / "efbig-probe"
    fd = os.open(probe, os.O_CREAT | os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 1 << 44)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            return 1 << 44
        raise
    finally:
        os.close(fd)
        probe.unlink()
    return None


async def test_write_beyond_backing_max_file_size(backing: Path, tmp_path: Path) -> None:
    limit = _efbig_offset(tmp_path)
    if limit is None:
        pytest.skip("backing filesystem has no file size limit at 16 TiB")
    io = BackingIO(2)
    stats = Stats()
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await cf.write(0, b"ok")
        await cf.write(limit + 10, b"far")  # accepted into a buffer ...
        with pytest.raises(OSError) as info:
            await cf.fsync(False)  # ... dropped at write-out, reported here
        assert info.value.errno == errno.EFBIG
        assert read_direct(backing)[:2] == b"ok"
        with pytest.raises(OSError) as info:
            await cf.write(limit + 5000, b"x")  # refused at once from now on
        assert info.value.errno == errno.EFBIG
        await cf.write(2, b"!")  # below the limit: fine
        await cf.fsync(False)
        assert read_direct(backing)[:3] == b"ok!"
        cache.detach(cf)


# -- coalescing under reordering -------------------------------------------------------------


async def test_straggler_does_not_split_later_windows(backing: Path, tmp_path: Path) -> None:
    """A stream whose requests arrive slightly out of order, as QEMU's parallel
    requests do (each window's even pieces first, its odd pieces during the next
    window), coalesces into one full buffer per window with buffers_per_file=2.
    One late write to an old, already written window (a straggler) must not
    change that: if it takes a filling slot as the "newest" buffer, moved-on
    seals the half-filled frontier window instead, its other half opens a new
    buffer that again pushes out the next frontier window, and from then on
    every window is written in two halves of many small extents.
    (Seen with ``qemu-img bench -d 64``: between 64 and 717 backing writes for
    the same 2000 requests, depending on timing.)
    """
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    piece = 4096
    n_windows = 12
    data = random.Random(12).randbytes(n_windows * B)

    async def pieces(cf, w: int, parity: int) -> None:
        for i in range(parity, B // piece, 2):
            off = w * B + i * piece
            await cf.write(off, data[off:off + piece])

    try:
        async with running_cache(io, stats, buffers_per_file=2, max_dirty=64 * B) as cache:
            cf = await attach(cache, backing)
            await pieces(cf, 0, 0)
            for w in range(1, n_windows):
                await pieces(cf, w, 0)
                await pieces(cf, w - 1, 1)
                if w == 3:
                    await cf.write(10, b"straggler")  # window 0 was written already
            await pieces(cf, n_windows - 1, 1)
            await cf.fsync(False)
            cache.detach(cf)
    finally:
        io.close()
    expect = bytearray(data)
    expect[10:19] = b"straggler"
    assert read_direct(backing) == bytes(expect)
    assert stats.unaligned_backing_writes == 0
    # one full buffer per window, plus the straggler's own block
    assert stats.backing_writes <= n_windows + 2, \
        (stats.backing_writes, stats.flushes, trace_lines(trace)[:20])


@pytest.mark.parametrize("bpf", [2, 4])
async def test_reordered_stream_whose_first_pass_reaches_window_end(
        backing: Path, tmp_path: Path, bpf: int) -> None:
    """Like QEMU's parallel requests: each window's odd pieces arrive first
    (the last piece, which reaches the window's end, among them) and its even
    pieces only while the stream is ``bpf - 1`` windows further on. Every
    window becomes full in turn; each must be written as one buffer. A
    half-filled window that merely *reaches* its end is not done: writing it
    out first splits it in two, and its other half then splits the next one.
    """
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    piece = 4096
    n_windows = 12
    lag = bpf - 1
    data = random.Random(13).randbytes(n_windows * B)

    async def pieces(cf, w: int, parity: int) -> None:
        for i in range(parity, B // piece, 2):
            off = w * B + i * piece
            await cf.write(off, data[off:off + piece])

    try:
        async with running_cache(io, stats, buffers_per_file=bpf, max_dirty=64 * B) as cache:
            cf = await attach(cache, backing)
            for w in range(n_windows + lag):
                if w < n_windows:
                    await pieces(cf, w, 1)  # odd pieces: up to the window's end
                if w >= lag:
                    await pieces(cf, w - lag, 0)  # the rest, lag windows later
            await cf.fsync(False)
            cache.detach(cf)
    finally:
        io.close()
    assert read_direct(backing) == data
    assert stats.backing_writes <= n_windows + 1, \
        (stats.backing_writes, stats.flushes, trace_lines(trace)[:20])


# -- backing reads under the cache (RMW, read-ahead) ------------------------------------------


def test_direct_pread_into_short_read_then_file_grows(tmp_path: Path, monkeypatch) -> None:
    """An O_DIRECT read that comes back short at EOF must not be continued at the
    unaligned position: if a write-out extends the file meanwhile (read-ahead
    reads without the file's lock), that second read fails with EINVAL.
    (Seen in test_model as "internal error in read" from read_ahead.)"""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    real_preadv = os.preadv
    calls: list[tuple[int, int]] = []

    def preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        if not calls:
            os.truncate(path, 3 * ALIGN)  # a write-out lands between the two reads
        calls.append((offset, n))
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    mem = mmap.mmap(-1, 2 * ALIGN)
    view = memoryview(mem)
    try:
        n = BackingIO(1).pread_into(fd, view, 0, "f")
        assert n >= 1000
        assert bytes(view[:1000]) == b"x" * 1000
    finally:
        view.release()
        mem.close()
        os.close(fd)


async def test_read_ahead_fetch_failure_raises_the_backing_error(tmp_path: Path) -> None:
    """A failing backing read in a read-ahead fetch must reach the client as that
    error (EIO), not as BufferError from closing memory a view still exports
    (which the daemon logs as an internal error). The failed window is a miss:
    the reader's own plain read reports the error."""
    from alignfs.read_ahead import ReadAhead, SequentialState

    path = tmp_path / "f"
    path.write_bytes(b"r" * (4 * ALIGN))
    faults = tmp_path / "faults.json"
    set_faults(faults, {"read": "EIO"})
    io = BackingIO(2, fault_file=faults)
    plain_reads = []
    async with trio.open_nursery() as nursery:
        readahead = ReadAhead(io, Stats(), align=ALIGN, max_window=1 << 20, budget=8 << 20,
                              nursery=nursery)
        ra = await readahead.attach(key_of(path), reopener(path), path.name)
        fd = os.open(path, os.O_RDONLY)

        async def plain(off: int, size: int) -> bytes:
            plain_reads.append(off)
            return await io.data(io.pread, fd, size, off, path.name)

        with pytest.raises(OSError) as info:
            await readahead.read(ra, SequentialState(), True, 0, 100, plain)
        assert info.value.errno == errno.EIO
        assert plain_reads == [0]
        os.close(fd)
        readahead.detach(ra)
        assert readahead.held_bytes == 0  # nothing leaked, spare memory given back


# -- known holes: reads and RMW of a sparse file's never-written blocks -----------------------


async def test_known_holes_are_read_as_zeros_without_backing_reads(backing: Path) -> None:
    """A sparse image (``qemu-img create``): QEMU's padding reads of blocks never
    written, and the read-modify-write of partly written blocks in a hole, need
    no backing read; bytes written (and written out) are read back from BACKING."""
    head = random.Random(5).randbytes(8192)
    with open(backing, "r+b") as f:
        f.write(head)
        f.truncate(4 * B)  # data [0, 8192), then a hole to 4 B
    backing_reads: list[tuple[int, int]] = []

    async def read_backing(off: int, size: int) -> bytes:
        backing_reads.append((off, size))
        return os.pread(rfd_, size, off)

    rfd_ = os.open(backing, os.O_RDONLY)
    stats = Stats()
    try:
        async with running_cache(BackingIO(2), stats) as cache:
            cf = await attach(cache, backing)
            assert list(cf.holes) == [(8192, 4 * B)]
            assert await cf.read(B, 4096, read_backing) == bytes(4096)
            assert backing_reads == [] and stats.hole_reads == 1
            await cf.write(B + 100, b"w" * 50)  # a partial block inside the hole
            assert await cf.read(B, 4096, read_backing) == bytes(100) + b"w" * 50 + bytes(3946)
            assert backing_reads == []
            await cf.fsync(False)
            assert stats.rmw_block_reads == 0  # the rest of the block is a known hole
            assert read_direct(backing)[B:B + 4096] == bytes(100) + b"w" * 50 + bytes(3946)
            # written out: those bytes are no hole any more, so they come from BACKING
            assert await cf.read(B + 100, 50, read_backing) == b"w" * 50
            assert backing_reads == [(B + 100, 50)]
            # a partial write next to real data still reads its block back
            await cf.write(4000, b"x" * 10)
            await cf.fsync(False)
            assert stats.rmw_block_reads == 1
            assert read_direct(backing)[:8192] == head[:4000] + b"x" * 10 + head[4010:]
            cache.detach(cf)
    finally:
        os.close(rfd_)


@pytest.mark.parametrize("seed", range(3))
async def test_reads_known_in_memory_need_no_backing_read(backing: Path, seed: int) -> None:
    """Random writes into a sparse file, then random reads within one window:
    each answer matches the model, and a read whose every byte is buffered, in
    a known hole or past the end of BACKING reaches no backing read (the
    in-memory answer, CachedFile._read_known)."""
    rng = random.Random(300 + seed)
    size = 6 * B
    model = bytearray(size)
    with open(backing, "r+b") as f:
        for _ in range(5):  # a few data extents, block aligned; holes between
            off = rng.randrange(0, size // ALIGN) * ALIGN
            data = rng.randbytes(rng.randrange(1, 4) * ALIGN)[:size - off]
            f.seek(off)
            f.write(data)
            model[off:off + len(data)] = data
        f.truncate(size - 3 * B)  # BACKING ends before the model does
    del model[size - 3 * B:]
    rfd = os.open(backing, os.O_RDONLY)
    backing_reads: list[tuple[int, int]] = []

    async def read_backing(off: int, n: int) -> bytes:
        backing_reads.append((off, n))
        return os.pread(rfd, n, off)

    stats = Stats()
    try:
        # Room for every window: nothing is written out, so written bytes stay buffered.
        async with running_cache(BackingIO(2), stats, max_dirty=16 * B,
                                 buffers_per_file=8) as cache:
            cf = await attach(cache, backing)
            known = bytearray(size)  # 1 where a read needs no BACKING
            for s, e in cf.holes:
                known[s:e] = b"\1" * (e - s)
            known[size - 3 * B:] = b"\1" * (3 * B)
            model.extend(bytes(size - len(model)))
            for step in range(300):
                if rng.random() < 0.4:
                    off = rng.randrange(0, size - 1)
                    data = rng.randbytes(min(rng.choice([8, 100, 4096, 5000, 20000]),
                                             size - off))
                    await cf.write(off, data)
                    model[off:off + len(data)] = data
                    known[off:off + len(data)] = b"\1" * len(data)
                    continue
                window = rng.randrange(0, size // B) * B
                off = window + rng.randrange(0, B)
                n = rng.randrange(1, window + B - off + 1)
                end = min(off + n, cf.size)
                before = len(backing_reads)
                assert await cf.read(off, n, read_backing) == bytes(model[off:end]), \
                    (seed, step)
                if all(known[off:end]):
                    assert len(backing_reads) == before, (seed, step, off, n)
            assert stats.hole_reads > 0 and stats.reads_from_buffers > 0
            assert stats.backing_writes == 0
            cache.detach(cf)
    finally:
        os.close(rfd)


async def test_read_in_memory_is_not_taken_past_a_write_out_in_flight(backing: Path) -> None:
    """Bytes of a buffer in write-out are neither in BACKING nor in the filling
    buffer yet: a read must overlay them, not take the rest for zeros past
    BACKING's end."""
    io = GatedIO(4)
    try:
        async with running_cache(io) as cache:
            cf = await attach(cache, backing)  # empty: every byte is past BACKING's end
            await cf.write(10, b"x" * 100)
            cf.start_write_back("fsync")
            await trio.testing.wait_all_tasks_blocked()
            assert cf.queue
            await cf.write(50, b"y" * 10)
            assert await cf.read(40, 30, None) == b"x" * 10 + b"y" * 10 + b"x" * 10
            assert await cf.read(0, 20, None) == bytes(10) + b"x" * 10
            io.gate.set()
            await cf.fsync(False)
            cache.detach(cf)
    finally:
        io.gate.set()


async def test_read_covered_by_the_newer_buffer_needs_nothing_else(backing: Path) -> None:
    """While a window is in write-out, a read that the newer filling buffer of
    that window covers is answered from it alone: its bytes are the newest,
    and neither the buffer in write-out nor BACKING is consulted."""
    io = GatedIO(4)

    async def no_backing_read(off: int, n: int) -> bytes:
        raise AssertionError(f"backing read of {n} at {off}")

    try:
        async with running_cache(io) as cache:
            cf = await attach(cache, backing)
            await cf.write(0, b"o" * 8192)
            cf.start_write_back("fsync")
            await trio.testing.wait_all_tasks_blocked()
            assert cf.queue
            await cf.write(4000, b"n" * 200)  # the newer buffer of the same window
            assert await cf.read(4010, 100, no_backing_read) == b"n" * 100
            # partly covered: the overlay of the buffer in write-out, as before
            assert await cf.read(3990, 30, no_backing_read) == b"o" * 10 + b"n" * 20
            io.gate.set()
            await cf.fsync(False)
            assert read_direct(backing)[:8192] == b"o" * 4000 + b"n" * 200 + b"o" * 3992
            cache.detach(cf)
    finally:
        io.gate.set()


async def test_full_window_of_kernel_writeback_is_written_at_once(backing: Path) -> None:
    """With the FUSE writeback cache (kernel_times), a file with no O_DIRECT
    handle is written by the kernel's writeback: a full window is sealed and
    written at once. A file with an O_DIRECT handle (QEMU cache=none, whose
    qcow2 rewrites clusters just after filling them) keeps full windows open."""
    stats = Stats()
    async with running_cache(BackingIO(2), stats) as cache:
        cache.kernel_times = True
        cf = await attach(cache, backing)
        await cf.write(0, b"a" * B)
        assert stats.flushes["full"] == 1 and not cf.filling
        await cf.write_back("fsync")
        assert read_direct(backing) == b"a" * B
        cf.direct_handles = 1
        await cf.write(B, b"b" * B)
        assert stats.flushes["full"] == 1 and list(cf.filling) == [B]
        cf.direct_handles = 0
        await cf.fsync(False)
        cache.detach(cf)
    assert read_direct(backing) == b"a" * B + b"b" * B


# -- gaps past BACKING's end -------------------------------------------------------------


async def _write_pieces(cf, model: bytearray, pieces: list[tuple[int, int]]) -> None:
    """Write random bytes to each ``[start, end)`` of *pieces*, and to *model*."""
    for start, end in pieces:
        data = random.Random(start).randbytes(end - start)
        await cf.write(start, data)
        model_write(model, start, data)


def _writes_to(trace: Path, path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each backing write to *path*, in order."""
    return [(off, n) for name, off, n in trace_lines(trace) if name == path.name]


async def _dirty_the_pool(cache: WriteCache, tmp_path: Path) -> None:
    """Leave every pool buffer holding junk, as reused memory does."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"")
    cf = await attach(cache, junk)
    for window in range(cache.pool.max_buffers):
        await cf.write(window * B, b"\xff" * B)
    await cf.fsync(False)
    cache.detach(cf)


async def test_gaps_past_backing_end_are_joined_with_zeros(backing: Path, tmp_path: Path) -> None:
    """A growing file's window with holes (writes still in flight, as qcow2
    leaves at an fsync) goes out as one write, its gaps zeros on the disk
    whatever the reused buffer held."""
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    pieces = [(0, 8192), (20480, 28672), (40960, 45000)]  # the last one ends the file
    async with running_cache(io, stats) as cache:
        await _dirty_the_pool(cache, tmp_path)
        cf = await attach(cache, backing)
        model = bytearray()
        await _write_pieces(cf, model, pieces)
        await cf.fsync(False)
        writes = _writes_to(trace, backing)
        # one O_DIRECT write up to the last block, then that block below EOF
        assert writes == [(0, 40960), (40960, 45000 - 40960)]
        assert stats.zero_fill_bytes == (20480 - 8192) + (40960 - 28672)
        assert read_direct(backing) == bytes(model)
        cache.detach(cf)
    io.close()


async def test_gaps_inside_the_file_or_too_wide_are_left_alone(
        backing: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone gap below BACKING's end would need a read costing what the
    write it saves does (or would fill a hole of a sparse file); one wider
    than BRIDGE_LIMIT costs more than a write."""
    old = random.Random(5).randbytes(10000)
    backing.write_bytes(old)
    monkeypatch.setattr("alignfs.write_cache.BRIDGE_LIMIT", 16384)
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    # gap [4096, 16384) reaches below EOF (10000); gap [20480, 40960) is
    # past it but 20480 wide; gap [45056, 53248) is joined
    pieces = [(0, 4096), (16384, 20480), (40960, 45056), (53248, 57344)]
    async with running_cache(io, stats) as cache:
        await _dirty_the_pool(cache, tmp_path)
        cf = await attach(cache, backing)
        model = bytearray(old)
        await _write_pieces(cf, model, pieces)
        await cf.fsync(False)
        writes = _writes_to(trace, backing)
        assert writes == [(0, 4096), (16384, 4096), (40960, 57344 - 40960)]
        assert stats.zero_fill_bytes == 53248 - 45056
        assert read_direct(backing) == bytes(model)
        cache.detach(cf)
    io.close()


async def test_late_write_lands_in_its_windows_queued_buffer(
        backing: Path, tmp_path: Path) -> None:
    """A write into a window that was sealed but not yet written goes into that
    buffer and out with it, in one write; a window whose write-out is under
    way gets a new buffer."""
    trace = tmp_path / "trace"
    io = GatedIO(4, trace_file=trace)
    stats = Stats()
    model = bytearray()
    try:
        async with running_cache(io, stats) as cache:
            cf = await attach(cache, backing)

            async def write(off: int, data: bytes) -> None:
                await cf.write(off, data)
                model_write(model, off, data)

            await write(0, b"a" * 100)
            await write(B, b"b" * 100)
            cf.start_write_back("fsync")  # window 0, then window 1
            await trio.testing.wait_all_tasks_blocked()
            # window 0 is being written (held at the gate), window 1 waits
            assert [b.window for b in cf.queue] == [0, B]
            assert cf.queue[0].writing and not cf.queue[1].writing
            in_use = cache.pool.in_use
            await write(B + 200, b"c" * 100)  # window 1: still only queued
            assert not cf.filling and cache.pool.in_use == in_use
            await write(50, b"d" * 100)  # window 0: a new buffer
            assert list(cf.filling) == [0]
            io.gate.set()
            await cf.fsync(False)
            assert read_direct(backing) == bytes(model)
            writes = [off for name, off, _ in trace_lines(trace) if name == backing.name]
            assert sorted(writes) == [0, 0, B]  # window 1 went out once
            cache.detach(cf)
    finally:
        io.gate.set()
        io.close()


async def test_late_writes_all_over_a_written_window_go_out_as_one_write(
        backing: Path, tmp_path: Path) -> None:
    """Many small extents close together inside the file (qcow2's late writes
    to a window an fsync wrote): one read of their span, one write."""
    old = random.Random(7).randbytes(B)
    backing.write_bytes(old)
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    model = bytearray(old)
    pieces = [(4096, 8192), (16384, 20480), (24576, 36864), (49152, 53248)]
    async with running_cache(io, stats) as cache:
        await _dirty_the_pool(cache, tmp_path)
        cf = await attach(cache, backing)
        await _write_pieces(cf, model, pieces)
        reads = stats.backing_reads
        await cf.fsync(False)
        writes = _writes_to(trace, backing)
        assert writes == [(4096, 53248 - 4096)]
        assert stats.backing_reads == reads + 1
        assert stats.gap_read_bytes == 49152 - 8192
        assert read_direct(backing) == bytes(model)
        # two extents: a read would cost what the one write it saves does
        await cf.write(0, b"x" * 4096)
        await cf.write(12288, b"y" * 4096)
        model_write(model, 0, b"x" * 4096)
        model_write(model, 12288, b"y" * 4096)
        await cf.fsync(False)
        writes = _writes_to(trace, backing)
        assert writes[1:] == [(0, 4096), (12288, 4096)]
        assert stats.backing_reads == reads + 1
        assert read_direct(backing) == bytes(model)
        cache.detach(cf)
    io.close()


async def test_a_run_over_holes_of_a_sparse_file_is_not_joined(
        backing: Path, tmp_path: Path) -> None:
    """Joining by reading would write the gaps back: over a hole that would
    fill it, so such a run goes out as its extents."""
    with open(backing, "wb") as f:
        f.write(b"h" * 4096)
        f.truncate(B)  # a hole from 4096 to the end
    trace = tmp_path / "trace"
    io = BackingIO(2, trace_file=trace)
    stats = Stats()
    model = bytearray(b"h" * 4096 + bytes(B - 4096))
    pieces = [(8192, 12288), (16384, 20480), (24576, 28672), (32768, 36864)]
    async with running_cache(io, stats) as cache:
        cf = await attach(cache, backing)
        await _write_pieces(cf, model, pieces)
        await cf.fsync(False)
        writes = _writes_to(trace, backing)
        assert writes == [(s, e - s) for s, e in pieces]
        assert stats.gap_read_bytes == 0
        assert read_direct(backing) == bytes(model)
        with open(backing, "rb") as f:
            assert os.lseek(f.fileno(), 12288, os.SEEK_HOLE) == 12288  # still a hole
        cache.detach(cf)
    io.close()


async def test_writer_arriving_while_the_pool_grows_waits_instead_of_failing(
        tmp_path: Path) -> None:
    """Every slot of the pool is being made (on worker threads) when a third
    writer needs memory: nothing is filling or being written yet, but memory
    is coming, so it waits (it used to fail with ENOMEM)."""
    io = InlineIO(1)  # growth still yields once before making the buffer
    stats = Stats()
    paths = [tmp_path / f"f{i}" for i in range(3)]
    for path in paths:
        path.write_bytes(b"")
    async with running_cache(io, stats, max_dirty=2 * B, buffers_per_file=1) as cache:
        files = [await attach(cache, path) for path in paths]
        async with trio.open_nursery() as nursery:
            for i, cf in enumerate(files):
                nursery.start_soon(cf.write, 0, bytes([65 + i]) * 100)
        for cf in files:
            await cf.fsync(False)
            cache.detach(cf)
    assert [p.read_bytes() for p in paths] == [bytes([65 + i]) * 100 for i in range(3)]
