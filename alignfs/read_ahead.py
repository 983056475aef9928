"""Aligned read-ahead for sequential readers.

QEMU's ``loadvm`` (and any reader of a migration stream) reads a file front to
back in small unaligned pieces; with ``cache=none`` on a slow disk each piece
is its own disk request. A handle whose reads follow each other gets
read-ahead: large aligned O_DIRECT reads into memory *segments*, a window that
doubles while the stream stays sequential (like the kernel's read-ahead), the
next window fetched in the background while the reader consumes the current
one (two windows per stream at most: the one being read and the next).
Random readers get none of it: their reads go straight to the backing
file, so they pay no amplification.

Coherence with the write cache: segments hold backing-file bytes only; the
write cache overlays buffered data on top of whatever this module returns.
When the backing file changes (a buffer written out, a truncate) every
segment of that file is dropped and the file's generation bumped; a fetch
started under an older generation is neither installed nor joined by later
readers, so nothing stale is ever served.

Memory is bounded by ``budget`` bytes over all files, segments plus reads in
flight. Segments live in anonymous mmaps filled by the O_DIRECT read itself
(no copy) and unmapped when dropped, so the bound is what the process holds.
The budget is shared fairly: each stream that read recently gets at most
``budget / active streams``, half of it for the window being consumed and half
for the one fetched ahead, so many readers at once get smaller windows instead
of evicting each other's unread data. When something must go, segments read
through are dropped before unread ones, least recently used first.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .backing_io import BackingIO
from .buffer_pool import anonymous_buffer
from .stats import Stats

log = logging.getLogger(__name__)

Key = tuple[int, int]

MIN_WINDOW = 256 << 10
#: Reads in a row at consecutive offsets before read-ahead starts.
SEQUENTIAL_AFTER = 2


#: Dropped segments' buffers kept for reuse (within the budget).
SPARE_BUFFERS = 4

#: A stream that has not read for this long no longer takes a share of the budget.
STREAM_IDLE = 1.0


class Segment:
    """Backing-file bytes [start, start+length) in an anonymous mmap."""

    __slots__ = ("start", "mem", "length", "lo", "hi", "used")

    def __init__(self, start: int, mem: mmap.mmap, length: int) -> None:
        self.start = start
        self.mem = mem
        self.length = length
        #: The span readers have been served from, [lo, hi) (empty: lo > hi).
        self.lo = start + length
        self.hi = start
        self.used = 0.0

    def evictable(self, now: float) -> bool:
        return self.read_through or now - self.used > STREAM_IDLE

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def read_through(self) -> bool:
        """A reader got to the end: a sequential stream has no more use for it."""
        return self.hi >= self.end

    @property
    def unused(self) -> int:
        """Bytes read from the disk that no reader was served."""
        return self.length - max(0, self.hi - self.lo)

    def take(self, pos: int, end: int) -> bytes:
        """Copy of [pos, min(end, self.end)), counted as served."""
        end = min(end, self.end)
        self.lo = min(self.lo, pos)
        self.hi = max(self.hi, end)
        return self.mem[pos - self.start:end - self.start]



@dataclass(eq=False)
class Fetch:
    start: int
    length: int
    gen: int
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None


#: How far from the stream's end a read may start and still count as part of
#: the stream: O_DIRECT clients (QEMU cache=none) widen each read to block
#: boundaries, so it overlaps the previous one. Clients with many reads in
#: flight (qemu-img bench, loadvm) issue them out of order, by up to the bytes
#: they have in flight: that much more is tolerated.
NEAR = 128 << 10


@dataclass(eq=False)
class SequentialState:
    """Per-handle stream detection (hashed by identity: one per handle).

    Every ``note()`` must be followed by ``done()`` when that read finishes:
    the reads in flight widen what counts as "near the stream's end".
    """

    next_off: int = -(1 << 62)
    run: int = 0
    window: int = MIN_WINDOW
    #: trio time of the stream's last sequential read (for the fair share).
    last_read: float = 0.0
    #: Client reads of this handle being served now, and the most seen at once.
    in_flight: int = 0
    depth: int = 0

    def near(self, size: int) -> int:
        """How far from the stream's end a read of *size* bytes still belongs to it.

        A client that keeps *depth* reads in flight may deliver them in any
        order, so the next one can be up to that many reads away.
        """
        return NEAR + self.depth * max(size, 4096)

    def behind(self, size: int) -> int:
        """How far behind this read others of the same queue may still come."""
        return max(0, self.depth - 1) * max(size, 4096)

    def note(self, off: int, size: int) -> bool:
        """Record a client read; True if the handle reads (nearly) sequentially."""
        near = self.near(size)
        self.in_flight += 1
        self.depth = max(self.depth, self.in_flight)
        if abs(off - self.next_off) <= near:
            self.run += 1
            self.next_off = max(self.next_off, off + size)
        else:
            self.run = 0
            self.window = MIN_WINDOW
            self.next_off = off + size
        return self.run >= SEQUENTIAL_AFTER

    def done(self) -> None:
        self.in_flight -= 1


class FileReadAhead:
    def __init__(self, key: Key, fd: int, direct: bool, name: str) -> None:
        self.key = key
        self.fd = fd
        self.direct = direct
        self.name = name
        self.gen = 0
        self.segments: list[Segment] = []
        self.fetches: set[Fetch] = set()
        self.handles = 0
        #: Where the backing file ends, once a fetch of this generation came back short.
        self.eof: int | None = None

    def past_eof(self, pos: int) -> bool:
        return self.eof is not None and pos >= self.eof


class ReadAhead:
    """Read-ahead of every file of one mount, within one memory budget.

    Kept coherent by the write cache: ``invalidate(key)`` whenever a file's
    backing bytes change. Handles ``attach``/``detach``; reads go through
    ``read`` with the handle's :class:`SequentialState`.
    """

    def __init__(self, io: BackingIO, stats: Stats, *, align: int, max_window: int,
                 budget: int, nursery: trio.Nursery) -> None:
        self.io = io
        self.stats = stats
        self.align = max(align, 4096)
        self.max_window = max(max_window, MIN_WINDOW)
        self.budget = budget
        self.nursery = nursery
        self.files: dict[Key, FileReadAhead] = {}
        self._lru: OrderedDict[Segment, FileReadAhead] = OrderedDict()
        self._bytes = 0
        #: Bytes of fetches under way; they count against the budget too.
        self._inflight = 0
        #: Memory of dropped segments kept for the next fetch of the same size:
        #: a fresh mmap costs page faults and zeroing, and unmapping costs the
        #: trio thread time per request. Counted in held_bytes, dropped first.
        self._spare: list[mmap.mmap] = []
        #: Sequential streams, oldest read first; idle ones are pruned lazily.
        self._streams: OrderedDict[SequentialState, None] = OrderedDict()

    @classmethod
    @asynccontextmanager
    async def running(cls, io: BackingIO, stats: Stats, *, align: int, max_window: int,
                      budget: int) -> AsyncIterator[ReadAhead]:
        """Read-ahead with a nursery for its background fetches, cancelled on exit."""
        async with trio.open_nursery() as nursery:
            readahead = cls(io, stats, align=align, max_window=max_window, budget=budget,
                            nursery=nursery)
            try:
                yield readahead
            finally:
                nursery.cancel_scope.cancel()

    @property
    def held_bytes(self) -> int:
        """Memory in use now: segments, fetches in flight and spare buffers."""
        return self._bytes + self._inflight + sum(len(mem) for mem in self._spare)

    # -- files -------------------------------------------------------------------

    async def attach(self, key: Key, reopen: Callable[[int], int], name: str) -> FileReadAhead:
        ra = self.files.get(key)
        if ra is None:
            fd, direct = await self.io.meta(self._open, reopen)
            ra = self.files.get(key)
            if ra is None:
                ra = FileReadAhead(key, fd, direct, name)
                self.files[key] = ra
            else:
                os.close(fd)
        ra.handles += 1
        return ra

    @staticmethod
    def _open(reopen: Callable[[int], int]) -> tuple[int, bool]:
        try:
            return reopen(os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return reopen(os.O_RDONLY | os.O_CLOEXEC), False

    def detach(self, ra: FileReadAhead, seq: SequentialState | None = None) -> None:
        if seq is not None:
            self._streams.pop(seq, None)
        ra.handles -= 1
        if ra.handles == 0:
            self._drop_segments(ra)
            ra.gen += 1
            if self.files.get(ra.key) is ra:
                del self.files[ra.key]
            if not self.files:  # nothing open reads ahead: give the spare memory back
                while self._spare:
                    self._unmap_spare()
            if ra.fetches:
                # A background fetch still uses the descriptor: close it after.
                self.nursery.start_soon(self._close_after_fetches, ra)
            else:
                os.close(ra.fd)

    async def _close_after_fetches(self, ra: FileReadAhead) -> None:
        while ra.fetches:
            await next(iter(ra.fetches)).done.wait()
        os.close(ra.fd)

    def invalidate(self, key: Key) -> None:
        """The backing file changed: nothing read ahead so far may be served."""
        ra = self.files.get(key)
        if ra is not None:
            ra.gen += 1
            ra.eof = None
            self._drop_segments(ra)

    def _drop_segments(self, ra: FileReadAhead) -> None:
        for seg in ra.segments:
            self._forget(seg)
        ra.segments.clear()

    def _forget(self, seg: Segment) -> None:
        if self._lru.pop(seg, None) is not None:
            self._bytes -= seg.length
            self.stats.readahead_wasted_bytes += seg.unused
            self._release(seg.mem)

    def _release(self, mem: mmap.mmap) -> None:
        """A segment's memory is free: keep a few buffers for reuse, unmap the rest."""
        if len(self._spare) < SPARE_BUFFERS and len(mem) <= self.max_window:
            self._spare.append(mem)
        else:
            mem.close()

    def _unmap_spare(self) -> None:
        self._spare.pop(0).close()

    def _buffer(self, length: int) -> mmap.mmap:
        for i, mem in enumerate(self._spare):
            if len(mem) == length:
                del self._spare[i]
                return mem
        return anonymous_buffer(length)

    def _room(self) -> int:
        """Bytes a new fetch may take without pushing out data nobody has read yet.

        Segments still being read count whole: only read-through ones may be
        dropped to make room, so admitting no more than this never evicts
        unread bytes.
        """
        now = trio.current_time()
        in_use = sum(s.length for s in self._lru if not s.evictable(now))
        return self.budget - self._inflight - in_use

    # -- fair share --------------------------------------------------------------

    def _window_cap(self, seq: SequentialState) -> int:
        """Largest window *seq* may use: half its share of the budget, aligned."""
        now = trio.current_time()
        seq.last_read = now
        self._streams[seq] = None
        self._streams.move_to_end(seq)
        while True:  # oldest first: stop at the first stream still active
            oldest = next(iter(self._streams))
            if now - oldest.last_read <= STREAM_IDLE:
                break
            del self._streams[oldest]
        share = self.budget // len(self._streams)
        cap = min(self.max_window, share // 2)
        return max(self.align, cap - cap % self.align)

    # -- reading -----------------------------------------------------------------

    async def _gather(self, ra: FileReadAhead, off: int, size: int) -> bytes | None:
        """[off, off+size) from segments and fetches in flight, or None on a miss.

        Only segments and fetches of the current generation are used, each
        looked up when reached, so nothing older than the caller's own overlay
        snapshot is returned. After waiting for a fetch the segments are looked
        at again: the fetch installed its bytes there (or, if the file changed
        meanwhile, did not, and this is a miss).
        """
        pos, end = off, off + size
        for seg in ra.segments:  # the usual case: one segment holds it all
            if seg.start <= off and end <= seg.end:
                seg.used = trio.current_time()
                self._lru.move_to_end(seg)
                return seg.take(off, end)
        out = bytearray()
        waited: set[Fetch] = set()
        while pos < end:
            seg = next((g for g in ra.segments if g.start <= pos < g.end), None)
            if seg is not None:
                out += seg.take(pos, end)
                seg.used = trio.current_time()
                self._lru.move_to_end(seg)
                pos = min(end, seg.end)
                continue
            if ra.past_eof(pos):
                break
            fetch = self._in_flight(ra, pos, pos + 1)
            if fetch is None or fetch in waited:
                return None
            waited.add(fetch)
            await fetch.done.wait()
            if fetch.error is not None:
                return None  # the caller's plain read reports an error in its own bytes
        return bytes(out)

    async def read(self, ra: FileReadAhead, seq: SequentialState, sequential: bool,
                   off: int, size: int,
                   fallback: Callable[[int, int], Awaitable[bytes]]) -> bytes:
        """Read [off, off+size) of the backing file (short at EOF).

        *sequential* comes from ``seq.note()`` for the client's read;
        *fallback(off, size)* is the plain read used for random reads.
        """
        cap = self._window_cap(seq) if sequential else self.max_window
        data = await self._gather(ra, off, size)
        if data is not None:
            self.stats.readahead_hits += 1
            if sequential:
                self._maybe_prefetch(ra, seq, off + size, cap)
            return data
        gap = self._first_gap(ra, off, off + size) if sequential else None
        if gap is None:
            return await fallback(off, size)
        # Fetch from the first byte nothing covers or brings yet: with many reads
        # in flight (qemu-img bench, QEMU's queue), their fetches tile the file
        # instead of overlapping.
        start, limit = self._hole(ra, gap, seq.near(size), seq.behind(size))
        needed = -(-(off + size - start) // self.align) * self.align
        room = self._room()
        length = max(min(seq.window, cap, room, limit - start), needed)
        length -= length % self.align
        if length > room:
            return await fallback(off, size)
        seq.window = min(cap, seq.window * 2)  # now, so reads arriving meanwhile see it
        fetch = self._register(ra, start, length)
        try:
            seg = await self._run_fetch(ra, fetch)
        except Exception as exc:
            self._fetch_failed(ra, fetch, exc)
            seq.window = MIN_WINDOW
            return await fallback(off, size)
        if seg not in self._lru:
            self._release(seg.mem)  # the file changed meanwhile (or nothing was read)
        data = await self._gather(ra, off, size)
        if data is None:  # changed or dropped while other bytes were awaited
            return await fallback(off, size)
        self._maybe_prefetch(ra, seq, off + size, cap)
        return data

    def _hole(self, ra: FileReadAhead, gap: int, near: int,
              behind: int) -> tuple[int, int]:
        """Where a fetch for the uncovered byte *gap* starts, and where the next
        covered range (a segment or a fetch) begins.

        A fetch starts at the end of the covered range just before *gap* when
        that is *near*: the bytes between belong to reads still on their way
        (a deep queue delivers them in any order), so no sliver is left for a
        later read to fetch a window of its own for. With nothing covered near
        below, it starts *behind* bytes early, for the reads of the same queue
        that arrive after this one (trio may run a batch of requests in
        reverse order).
        """
        frontier = -1  # the end of the covered range closest below gap
        limit = 1 << 62
        for lo, hi in self._covered(ra):
            if hi <= gap:
                frontier = max(frontier, hi)
            elif lo > gap:
                limit = min(limit, lo)
        if frontier >= 0 and gap - frontier <= near:
            return frontier, limit
        start = max(0, frontier, gap - behind)
        return start - start % self.align, limit

    @staticmethod
    def _covered(ra: FileReadAhead) -> list[tuple[int, int]]:
        """Ranges of the current generation held in segments or being fetched."""
        out = [(g.start, g.end) for g in ra.segments]
        out += [(f.start, f.start + f.length) for f in ra.fetches if f.gen == ra.gen]
        return out

    def _first_gap(self, ra: FileReadAhead, off: int, end: int) -> int | None:
        """First position in [off, end) no segment holds and no fetch brings, or None."""
        pos = off
        while pos < end:
            seg = next((g for g in ra.segments if g.start <= pos < g.end), None)
            if seg is not None:
                pos = seg.end
                continue
            if ra.past_eof(pos):
                return None
            fetch = self._in_flight(ra, pos, pos + 1)
            if fetch is None:
                return pos
            pos = fetch.start + fetch.length
        return None

    @staticmethod
    def _in_flight(ra: FileReadAhead, start: int, end: int) -> Fetch | None:
        for f in ra.fetches:
            if f.gen == ra.gen and f.start <= start and end <= f.start + f.length:
                return f
        return None

    def _maybe_prefetch(self, ra: FileReadAhead, seq: SequentialState, pos: int,
                        cap: int) -> None:
        """Fetch the next window once the reader has entered the last one ahead.

        So one window is always on its way while the reader consumes the one
        before (the kernel's async read-ahead marker): a reader faster than the
        disk finds the disk busy the whole time, not idle between windows.
        """
        end = pos
        for seg in ra.segments:  # ordered by start
            if seg.start <= end < seg.end:
                end = seg.end
        if ra.past_eof(end) or self._in_flight(ra, end, end + 1) is not None:
            return
        if end - pos > seq.window or end % self.align:
            return
        window = min(cap, seq.window * 2, self._room())
        window -= window % self.align
        if window < min(seq.window, MIN_WINDOW):
            return  # no room: the reader catches up with a plain or small read
        seq.window = window
        # Registered now, so readers can join it and others' room shrinks at once.
        self.nursery.start_soon(self._background_fetch, ra, self._register(ra, end, window))

    def _register(self, ra: FileReadAhead, start: int, length: int) -> Fetch:
        """A fetch about to run: visible to readers, counted against the budget."""
        fetch = Fetch(start, length, ra.gen)
        ra.fetches.add(fetch)
        self._inflight += length
        self._shrink()
        return fetch

    async def _background_fetch(self, ra: FileReadAhead, fetch: Fetch) -> None:
        """Run a fetch ahead of the reader; a failure is a miss of that window only.

        Whatever it raised, it must not escape: this task runs in the cache's
        nursery, where an exception would end the mount. The readers of the
        window fall back to plain reads, which report a disk error in their
        own bytes.
        """
        try:
            seg = await self._run_fetch(ra, fetch)
        except Exception as exc:
            self._fetch_failed(ra, fetch, exc)
            return
        if seg not in self._lru:
            self._release(seg.mem)  # stale or empty: nobody will read it

    def _fetch_failed(self, ra: FileReadAhead, fetch: Fetch, exc: Exception) -> None:
        """Count and log a failed fetch (a miss; its readers use plain reads)."""
        self.stats.readahead_errors += 1
        if isinstance(exc, OSError):
            log.warning("%s: read-ahead of %d bytes at offset %d failed: %s (a miss: "
                        "reads there go to the backing file)", ra.name, fetch.length,
                        fetch.start, exc.strerror or exc)
        else:
            log.error("%s: read-ahead of %d bytes at offset %d failed with an internal "
                      "error (a miss: reads there go to the backing file)", ra.name,
                      fetch.length, fetch.start, exc_info=exc)

    async def _run_fetch(self, ra: FileReadAhead, fetch: Fetch) -> Segment:
        """One aligned read of the fetch's range; installed as a segment unless stale.

        Returns the segment, installed or not; the caller releases one that is not.
        """
        mem = None
        try:
            mem = self._buffer(fetch.length)
            n = await self.io.data(self._read_aligned, ra, mem, fetch.start)
        except BaseException as exc:
            if mem is not None:
                self._release(mem)
            if isinstance(exc, OSError):
                fetch.error = exc
            raise
        finally:
            self._inflight -= fetch.length
            ra.fetches.discard(fetch)
            fetch.done.set()
        self.stats.backing_reads += 1
        self.stats.backing_read_bytes += n
        self.stats.readahead_bytes += n
        seg = Segment(fetch.start, mem, n)
        if fetch.gen == ra.gen and self.files.get(ra.key) is ra:
            if n < fetch.length:  # a short read: the file ends here
                end = fetch.start + n
                ra.eof = end if ra.eof is None else min(ra.eof, end)
            if n:
                self._install(ra, seg)
        return seg

    def _read_aligned(self, ra: FileReadAhead, mem: mmap.mmap, start: int) -> int:
        """Worker thread: one large read straight into the segment's memory."""
        view = memoryview(mem)
        try:
            return self.io.pread_into(ra.fd, view, start, ra.name)
        finally:
            view.release()

    def _install(self, ra: FileReadAhead, seg: Segment) -> None:
        # Drop segments the new one holds entirely; partial overlaps (same bytes,
        # same generation) stay, as readers may be in them. Keep the list ordered.
        keep = []
        for old in ra.segments:
            if seg.start <= old.start and old.end <= seg.end:
                self._forget(old)
            else:
                keep.append(old)
        keep.append(seg)
        keep.sort(key=lambda s: s.start)
        ra.segments = keep
        seg.used = trio.current_time()
        self._lru[seg] = ra
        self._bytes += seg.length
        self._shrink(keep=seg)

    def _shrink(self, keep: Segment | None = None) -> None:
        """Drop segments until the budget holds: read-through ones first, LRU order.

        Admission (``_room``) makes dropping unread ones a last resort; *keep*,
        the segment just read, is never dropped: its reader is about to use it.
        """
        while self.held_bytes > self.budget:
            if self._spare:
                self._unmap_spare()
                continue
            now = trio.current_time()
            victim = next((s for s in self._lru if s.evictable(now)), None) \
                or next(iter(self._lru), None)
            if victim is None or victim is keep:
                break
            owner = self._lru[victim]
            self._forget(victim)
            owner.segments.remove(victim)
