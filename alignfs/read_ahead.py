"""Aligned read-ahead for sequential readers.

QEMU's ``loadvm`` (and any reader of a migration stream) reads a file front to
back in small unaligned pieces; with ``cache=none`` on a slow disk each piece
is its own disk request. A handle whose reads follow each other gets
read-ahead: large aligned O_DIRECT reads into memory *segments*, a window that
doubles while the stream stays sequential (like the kernel's read-ahead), the
next window fetched in the background while the reader consumes the current
one. Random readers get none of it: their reads go straight to the backing
file, so they pay no amplification.

Coherence with the write cache: segments hold backing-file bytes only; the
write cache overlays buffered data on top of whatever this module returns.
When the backing file changes (a buffer written out, a truncate) every
segment of that file is dropped and the file's generation bumped; a fetch
started under an older generation is neither installed nor joined by later
readers, so nothing stale is ever served.

Memory is bounded by ``budget`` bytes over all files (least recently used
segments are dropped first).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .backing_io import BackingIO
from .stats import Stats

log = logging.getLogger(__name__)

Key = tuple[int, int]

MIN_WINDOW = 256 << 10
#: Reads in a row at consecutive offsets before read-ahead starts.
SEQUENTIAL_AFTER = 2


class Segment:
    __slots__ = ("start", "data", "served", "eof")

    def __init__(self, start: int, data: bytes, eof: bool) -> None:
        self.start = start
        self.data = data
        self.served = 0
        #: The read came back short: the backing file ends in this segment.
        self.eof = eof

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass
class Fetch:
    start: int
    length: int
    gen: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: OSError | None = None


#: How far from the stream's end a read may start and still count as part of
#: the stream: O_DIRECT clients (QEMU cache=none) widen each read to block
#: boundaries, so it overlaps the previous one, and clients with many reads in
#: flight (qemu-img bench, loadvm) issue them slightly out of order.
NEAR = 128 << 10


@dataclass
class SequentialState:
    """Per-handle stream detection."""

    next_off: int = -(1 << 62)
    run: int = 0
    window: int = MIN_WINDOW

    def note(self, off: int, size: int) -> bool:
        """Record a client read; True if the handle reads (nearly) sequentially."""
        if abs(off - self.next_off) <= NEAR:
            self.run += 1
            self.next_off = max(self.next_off, off + size)
        else:
            self.run = 0
            self.window = MIN_WINDOW
            self.next_off = off + size
        return self.run >= SEQUENTIAL_AFTER


class FileReadAhead:
    def __init__(self, key: Key, fd: int, direct: bool, name: str) -> None:
        self.key = key
        self.fd = fd
        self.direct = direct
        self.name = name
        self.gen = 0
        self.segments: list[Segment] = []
        self.fetches: dict[int, Fetch] = {}
        self.handles = 0


class ReadAhead:
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

    @property
    def enabled(self) -> bool:
        return self.budget > 0

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

    def detach(self, ra: FileReadAhead) -> None:
        ra.handles -= 1
        if ra.handles == 0:
            self._drop_segments(ra)
            ra.gen += 1
            if self.files.get(ra.key) is ra:
                del self.files[ra.key]
            if ra.fetches:
                # A background fetch still uses the descriptor: close it after.
                self.nursery.start_soon(self._close_after_fetches, ra)
            else:
                os.close(ra.fd)

    async def _close_after_fetches(self, ra: FileReadAhead) -> None:
        while ra.fetches:
            await next(iter(ra.fetches.values())).done.wait()
        os.close(ra.fd)

    def invalidate(self, key: Key) -> None:
        """The backing file changed: nothing read ahead so far may be served."""
        ra = self.files.get(key)
        if ra is not None:
            ra.gen += 1
            self._drop_segments(ra)

    def _drop_segments(self, ra: FileReadAhead) -> None:
        for seg in ra.segments:
            self._forget(seg)
        ra.segments.clear()

    def _forget(self, seg: Segment) -> None:
        if self._lru.pop(seg, None) is not None:
            self._bytes -= len(seg.data)
            self.stats.readahead_wasted_bytes += max(0, len(seg.data) - seg.served)

    # -- reading -----------------------------------------------------------------

    async def _gather(self, ra: FileReadAhead, off: int, size: int) -> bytes | None:
        """[off, off+size) from segments and fetches in flight, or None on a miss.

        Only segments and fetches of the current generation are used, each
        looked up when reached, so nothing older than the caller's own overlay
        snapshot is returned.
        """
        out = bytearray()
        pos, end = off, off + size
        while pos < end:
            seg = next((g for g in ra.segments if g.start <= pos < g.end), None)
            if seg is not None:
                take = min(end, seg.end) - pos
                out += seg.data[pos - seg.start:pos - seg.start + take]
                seg.served += take
                self._lru.move_to_end(seg)
                pos += take
                continue
            if any(g.eof and g.end == pos for g in ra.segments):
                break  # end of file
            fetch = self._in_flight(ra, pos, pos + 1)
            if fetch is None:
                return None
            await fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
            assert fetch.data is not None
            chunk = fetch.data[pos - fetch.start:end - fetch.start]
            out += chunk
            pos += len(chunk)
            if fetch.start + len(fetch.data) < fetch.start + fetch.length and \
                    pos >= fetch.start + len(fetch.data):
                break  # the fetch came back short: end of file
        return bytes(out)

    async def read(self, ra: FileReadAhead, seq: SequentialState, sequential: bool,
                   off: int, size: int,
                   fallback: Callable[[int, int], Awaitable[bytes]]) -> bytes:
        """Read [off, off+size) of the backing file (short at EOF).

        *sequential* comes from ``seq.note()`` for the client's read;
        *fallback(off, size)* is the plain read used for random reads.
        """
        data = await self._gather(ra, off, size)
        if data is not None:
            self.stats.readahead_hits += 1
            if sequential:
                self._maybe_prefetch(ra, seq, off + size)
            return data
        start = off - off % self.align
        length = max(seq.window, -(-(off + size - start) // self.align) * self.align)
        if not sequential or self._inflight + length > self.budget:
            return await fallback(off, size)
        data = await self._fetch(ra, start, length)
        seq.window = min(self.max_window, seq.window * 2)
        self._maybe_prefetch(ra, seq, off + size)
        rel = off - start
        return data[rel:rel + size]

    @staticmethod
    def _in_flight(ra: FileReadAhead, start: int, end: int) -> Fetch | None:
        for f in ra.fetches.values():
            if f.gen == ra.gen and f.start <= start and end <= f.start + f.length:
                return f
        return None

    def _maybe_prefetch(self, ra: FileReadAhead, seq: SequentialState, pos: int) -> None:
        """Fetch the next window once the reader is half way through what is ahead."""
        end = pos
        for seg in ra.segments:  # ordered by start
            if seg.start <= end < seg.end or (seg.eof and seg.start <= end <= seg.end):
                if seg.eof:
                    return  # the file ends here: nothing more to fetch
                end = seg.end
        if self._in_flight(ra, end, end + 1) is not None:
            return
        if end - pos > seq.window // 2 or end % self.align:
            return
        window = min(self.max_window, seq.window * 2)
        if self._inflight + window > self.budget // 2:
            return  # many readers at once: no more than half the budget in flight
        seq.window = window
        fetch = Fetch(end, seq.window, ra.gen)
        ra.fetches[end] = fetch  # registered now, so readers can join it at once
        self.nursery.start_soon(self._background_fetch, ra, fetch)

    async def _background_fetch(self, ra: FileReadAhead, fetch: Fetch) -> None:
        try:
            await self._run_fetch(ra, fetch)
        except OSError:
            pass  # the reader that needs these bytes sees the error itself

    async def _fetch(self, ra: FileReadAhead, start: int, length: int) -> bytes:
        """Read [start, start+length) with one aligned read; install it as a segment."""
        fetch = Fetch(start, length, ra.gen)
        ra.fetches[start] = fetch
        return await self._run_fetch(ra, fetch)

    async def _run_fetch(self, ra: FileReadAhead, fetch: Fetch) -> bytes:
        self._inflight += fetch.length
        try:
            fetch.data = await self.io.data(self._read_aligned, ra, fetch.start, fetch.length)
        except OSError as exc:
            fetch.error = exc
            raise
        finally:
            self._inflight -= fetch.length
            if ra.fetches.get(fetch.start) is fetch:
                del ra.fetches[fetch.start]
            fetch.done.set()
        data = fetch.data
        self.stats.backing_reads += 1
        self.stats.backing_read_bytes += len(data)
        self.stats.readahead_bytes += len(data)
        if fetch.gen == ra.gen and data and self.files.get(ra.key) is ra:
            self._install(ra, Segment(fetch.start, data, len(data) < fetch.length))
        return data

    def _read_aligned(self, ra: FileReadAhead, start: int, length: int) -> bytes:
        """Worker thread: one large (O_DIRECT) read into aligned memory."""
        if not ra.direct:
            return self.io.pread(ra.fd, length, start, ra.name)
        mem = mmap.mmap(-1, length)
        view = memoryview(mem)
        try:
            n = self.io.pread_into(ra.fd, view, start, ra.name)
            return bytes(view[:n])
        finally:
            view.release()
            mem.close()

    def _install(self, ra: FileReadAhead, seg: Segment) -> None:
        # Replace segments the new one overlaps; keep the list ordered.
        keep = []
        for old in ra.segments:
            if old.end <= seg.start or old.start >= seg.end:
                keep.append(old)
            else:
                self._forget(old)
        keep.append(seg)
        keep.sort(key=lambda s: s.start)
        ra.segments = keep
        self._lru[seg] = ra
        self._bytes += len(seg.data)
        while self._bytes + self._inflight > self.budget and self._lru:
            victim, owner = next(iter(self._lru.items()))
            self._forget(victim)
            owner.segments.remove(victim)
