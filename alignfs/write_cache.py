"""The write-coalescing engine: aligned, N-buffered, asynchronous write-back.

Every file being written gets a :class:`CachedFile`. Its bytes are collected in
fixed windows of ``buffer_size`` (window ``k`` covers file offsets
``[k*B, (k+1)*B)``), each held by a page-aligned :class:`Buffer` from the
shared :class:`~alignfs.buffer_pool.BufferPool`. Writes fill buffers in any
order; a buffer is *sealed* (queued for write-out; until that starts, only
a late write to its window still lands there, see ``queued_open``) when the
file needs a new window and already fills ``buffers_per_file`` (full buffers
first: they are kept until then, see ``_seal_one_of``), when it is older
than ``flush_delay``, under memory pressure, on fsync/close and at unmount.
Sealed buffers are written by one flusher task per file, strictly in order
(FIFO), so a newer buffer for a window always lands after an older one. A
write is one aligned O_DIRECT ``pwrite`` per contiguous extent, extents close
together joined first when that saves seeks (``SEEK_BYTES``); only blocks
that are partly covered are read back first (read-modify-write). BACKING is
never made larger than the file, not even for a moment: the part of a last
block below EOF goes through a buffered descriptor (see ``_plan_writes``).

Concurrency model (trio, one thread): everything here runs on the trio thread
and is atomic between ``await`` points; the only awaits are the pool (its
wait, and its growth: a new buffer is made on a worker thread), thread hops
for backing I/O, and ``CachedFile.lock``, which is held for every operation
that changes the backing file (a buffer's write-out, truncate) so
those never overlap for one file. Worker threads touch a sealed buffer's
memory only once its write-out started (``Buffer.writing``), and only its
uncovered bytes (filled by read-modify-write, or for a join) and for the
pwrite; readers copy covered bytes only.

Errors: a failed write-out leaves the buffer at the head of the queue and
stops the flusher; the file then refuses writes with that error until a retry
(fsync, flush of the last handle, age tick, unmount) succeeds. A permanent
error drops the buffer: the cache remembers the loss (file, offset, errno)
for the rest of the mount, tells the file's next write or flush once and its
next fsync (even through a handle opened after the file was forgotten), and
every later ``flush_all`` and ``close`` report it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from itertools import chain
from typing import NamedTuple

import trio

from . import syscalls
from .backing_io import BackingIO
from .buffer_pool import BufferPool
from .ranges import RangeSet
from .stat_fence import StatFence
from .stats import Stats

log = logging.getLogger(__name__)

#: A backing key: (st_dev, st_ino) of the backing file.
Key = tuple[int, int]


class Span(NamedTuple):
    """A run of a buffer's extents to join by reading (WriteCache._bridge_by_reading)."""

    #: What is read from BACKING (buffer offsets).
    start: int
    end: int
    #: The gaps in it that the buffer does not cover.
    gaps: list[tuple[int, int]]
    #: The run: extents[first:last + 1].
    first: int
    last: int


#: Write-out errors that no retry can fix: an offset beyond the backing
#: filesystem's maximum file size. The data is dropped and the error reported,
#: as the kernel's page cache does. Every other error keeps the data buffered
#: and is retried: EIO and ENOSPC may pass, and EINVAL is what O_DIRECT answers
#: to a misaligned write, a bug of ours rather than a property of the data.
PERMANENT_ERRNOS = frozenset({errno.EFBIG})

#: Largest file offset Linux allows.
MAX_OFFSET = (1 << 63) - 1

#: Dropped writes remembered one by one; beyond this they are only counted.
MAX_LOST_RECORDS = 100


@dataclasses.dataclass(frozen=True)
class LostWrite:
    """Buffered bytes that a permanent write-out error dropped."""

    name: str
    offset: int
    length: int
    errno: int

    def error(self) -> OSError:
        return OSError(self.errno, f"{os.strerror(self.errno)}: {self.length} bytes at "
                       f"offset {self.offset} could never be written and were dropped")


#: What one more backing I/O costs on a disk that seeks, in bytes of
#: transfer (5 ms is ~750 KiB at the model's 200 IOPS and 150 MiB/s; a real
#: HDD's seek and rotation cost more). A write-out joins the extents of a
#: buffer across a gap when that moves fewer bytes than the writes it saves
#: would cost (see WriteCache._bridge_past_end and _bridge_by_reading).
SEEK_BYTES = 512 << 10
#: Widest gap a write-out fills to join the extents on either side.
BRIDGE_LIMIT = SEEK_BYTES
_ZEROS = bytes(BRIDGE_LIMIT)

#: Seconds without a write after which a buffer filled by the kernel's
#: writeback is sealed (see WriteCache._seal_idle).
IDLE_SEAL = 0.5


def again(exc: OSError) -> OSError:
    """A new exception like the stored *exc*, to raise.

    Raising the stored instance itself appends each raise's traceback to it,
    and the frames in it keep their locals alive: every refused WRITE's data
    (1 MiB from the kernel's writeback) stayed in memory while a disk was full.
    """
    return OSError(exc.errno, exc.strerror)


class Buffer:
    """One window's worth of buffered data, in page-aligned memory."""

    __slots__ = ("mem", "view", "window", "ranges", "filled", "born", "touched", "sealed",
                 "writing", "done", "file")

    def __init__(self, file: CachedFile, mem: mmap.mmap, window: int, born: float) -> None:
        self.file = file
        self.mem = mem
        self.view = memoryview(mem)
        self.window = window
        self.ranges = RangeSet()
        #: Bytes covered (== ranges.total(), kept up to date cheaply).
        self.filled = 0
        self.born = born
        #: When a write last landed here (for sealing idle kernel-fed buffers).
        self.touched = born
        #: True once in the file's write-out queue.
        self.sealed = False
        #: True once a write-out of it started: from then on nothing more lands
        #: here (until then a late write may, see CachedFile.queued_open).
        self.writing = False
        #: True once written to BACKING (or dropped) and returned to the pool.
        self.done = False


class CachedFile:
    """Buffered state of one backing file, shared by all its open handles."""

    def __init__(self, cache: WriteCache, key: Key, fd: int, direct: bool, size: int,
                 name: str, holes: RangeSet | None = None) -> None:
        self.cache = cache
        self.key = key
        #: Backing descriptor used for write-out, RMW reads and fsync (O_DIRECT if direct).
        self.fd = fd
        self.direct = direct
        #: A buffered descriptor of the same file, for the part of a block below
        #: EOF (see WriteCache._plan_writes); opened on first use, under ``lock``.
        self.tail_fd: int | None = None
        self.name = name
        #: Logical size: what clients see, buffered data included.
        self.size = size
        #: Size of the backing file as this daemon last left it.
        self.backing_size = size
        #: Ranges of BACKING known to read as zeros: holes found when the file
        #: was attached, less everything written since. A read of them needs no
        #: backing read (QEMU's padding reads of a sparse image's next block).
        self.holes = holes if holes is not None else RangeSet()
        #: Buffers still accepting writes, by window start, least recently written first.
        self.filling: OrderedDict[int, Buffer] = OrderedDict()
        #: Sealed buffers waiting for (or in) write-out, in write order.
        self.queue: deque[Buffer] = deque()
        self.flushing = False
        self.lock = trio.Lock()
        self.progress = trio.lowlevel.ParkingLot()
        self.handles = 0
        #: Handles opened with O_DIRECT: while there is none, every WRITE
        #: comes from the kernel's writeback (see WriteCache._seal_idle).
        self.direct_handles = 0
        #: Set when the cache dropped this file and closed fd.
        self.closed = False
        #: A failing write-out (data kept, retried); refuses writes until it works.
        self.error: OSError | None = None
        self.error_time = 0.0
        #: A write-out that failed for good (data dropped): reported to the next
        #: write or flush once, and to fsync until one fsync has reported it.
        self.lost_error: OSError | None = None
        self.lost_reported = False
        #: The file's mtime as clients see it: the time of the last write or
        #: truncate, or what a client set. Re-applied to BACKING after every
        #: write-out, which would otherwise leave the write-out's time there.
        self.mtime_ns: int | None = None
        self.write_gen = 0
        self.synced_data_gen = -1
        self.synced_full_gen = -1

    # -- client operations ---------------------------------------------------

    async def write(self, off: int, data: bytes, refuse_failing: bool = True) -> None:
        """Accept *data* at *off* into buffers (waits only for free memory).

        While the file's write-out fails, a client's write is refused with
        that error. Not so the kernel's writeback (*refuse_failing* False): a
        refused WRITE would make the kernel drop those pages, so they are kept
        like the rest and retried, as long as memory allows (new_buffer).
        """
        if self.write_now(off, data, refuse_failing):
            return
        cache = self.cache
        bsize = cache.buffer_size
        pos, end = off, off + len(data)
        if end > cache.max_offset:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        if self.holes:
            self.holes.remove(off, end)
        filling = self.filling
        view = memoryview(data)
        while pos < end:
            window = pos - pos % bsize
            buf = filling.get(window)
            if buf is not None:
                # Least recently written first when the file must give one up.
                filling.move_to_end(window)
            else:
                buf = self.queued_open(window)
                if buf is None:
                    buf = await cache.new_buffer(self, window, refuse_failing)
                if refuse_failing:
                    # The file may have failed while an earlier window of this
                    # write waited: refuse the rest, queued buffer or not.
                    self.raise_error()
            n = min(end, window + bsize) - pos
            self._put(buf, pos - window, view[pos - off:pos - off + n])
            pos += n
        self._count_write(len(data))

    def write_now(self, off: int, data: bytes, refuse_failing: bool = True) -> bool:
        """:meth:`write` when it need not wait: *data* lies in one window whose
        buffer is filling. True if the write is done; False, with nothing
        changed, if :meth:`write` must be awaited. Every QEMU write but the
        first of each window takes this path, with no coroutine to run."""
        # (A late write into a queued buffer, see queued_open, takes the slow
        # path: rare, and then its cost does not matter.)
        if refuse_failing and (self.error is not None or self.lost_error is not None):
            self.raise_error()
        cache = self.cache
        rel = off % cache.buffer_size
        if rel + len(data) > cache.buffer_size:
            return False
        buf = self.filling.get(off - rel)
        if buf is None:
            return False
        end = off + len(data)
        if end > cache.max_offset:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        if self.holes:
            self.holes.remove(off, end)
        # Least recently written first when the file must give one up.
        self.filling.move_to_end(off - rel)
        self._put(buf, rel, data)
        self._count_write(len(data))
        return True

    def queued_open(self, window: int) -> Buffer | None:
        """The buffer of *window* that is sealed but whose write-out has not
        started, if it is the newest buffer of the window (there is no
        filling one): a late write can still go there.

        A window sealed when the writers moved on, or by an fsync, often gets
        a few more writes: qcow2 with many requests in flight writes its new
        clusters' COW parts with zeros, then the data there some windows
        later. Each such late write used to start a new buffer of the
        window, written as its own handful of small writes (a seek each on a
        disk). Landing in the queued buffer, it goes out in that buffer's one
        write. The write-out takes the buffer's ranges when it starts
        (``writing``), and until then no worker touches the buffer; it is the
        window's newest data, so reads overlay it last, as they would a
        filling buffer.
        """
        for buf in reversed(self.queue):
            if buf.window == window:
                return None if buf.writing else buf
        return None

    def _put(self, buf: Buffer, rel: int, piece: bytes | memoryview) -> None:
        """Copy *piece* to *rel* in *buf* and account for it."""
        cache = self.cache
        end = rel + len(piece)
        buf.view[rel:end] = piece
        if self.direct_handles == 0:
            # Only then does ``touched`` count (_seal_idle); direct_handle_closed
            # refreshes it when the last O_DIRECT handle goes.
            buf.touched = trio.current_time()
        added = buf.ranges.add(rel, end)
        buf.filled += added
        stats = cache.stats
        stats.dirty_bytes += added
        if stats.dirty_bytes > stats.peak_dirty_bytes:
            stats.peak_dirty_bytes = stats.dirty_bytes
        if buf.filled == cache.buffer_size and self.direct_handles == 0 and cache.kernel_times \
                and not buf.sealed:
            # Pages from the kernel's writeback: it already gathered and
            # delayed them, so a full window waits for nothing more. Written
            # now, an fsync (dd conv=fsync, cp; sync FILE) finds only the
            # last window left to write.
            cache.seal(buf, "full")
        if buf.window + end > self.size:
            self.size = buf.window + end
        self.write_gen += 1

    def _count_write(self, n: int) -> None:
        cache = self.cache
        cache.stats.write_requests += 1
        cache.stats.write_bytes += n
        if not cache.kernel_times:
            self.mtime_ns = time.time_ns()

    def direct_handle_closed(self) -> None:
        """An O_DIRECT handle of the file was released.

        Writes through O_DIRECT handles do not stamp ``touched``; once the
        last one is gone the file's buffers count as written just now, so
        that _seal_idle gives them their full idle time.
        """
        self.direct_handles -= 1
        if self.direct_handles == 0:
            now = trio.current_time()
            for buf in self.filling.values():
                buf.touched = now

    async def read(self, off: int, size: int,
                   backing_read: Callable[[int, int], Awaitable[bytes]]) -> bytes:
        """Read with buffered and in-flight data overlaid on the backing file.

        *backing_read(off, size)* reads the backing file (plain or read-ahead).
        """
        known = self.read_from_memory(off, size)
        if known is not None:
            return known
        return await self.read_through(off, size, backing_read)

    def read_from_memory(self, off: int, size: int) -> bytes | None:
        """The answer to a read when memory alone gives it (see _read_known,
        and reads at or past EOF), counted as a read; else None, counted as
        nothing (then read_through answers)."""
        end = min(off + size, self.size)
        if off >= end:
            known = b""
        else:
            known = self._read_known(off, end)
            if known is None:
                return None
        stats = self.cache.stats
        stats.read_requests += 1
        stats.read_bytes += len(known)
        return known

    async def read_through(self, off: int, size: int,
                           backing_read: Callable[[int, int], Awaitable[bytes]]) -> bytes:
        """A read that read_from_memory could not answer: buffered and
        in-flight bytes overlaid on what *backing_read* returns."""
        cache = self.cache
        stats = cache.stats
        stats.read_requests += 1
        end = min(off + size, self.size)
        if off >= end:  # only if the caller awaited since read_from_memory
            return b""
        bsize = cache.buffer_size
        out = bytearray(end - off)
        bufs = [b for b in chain(self.queue, self.filling.values())
                if b.window < end and b.window + bsize > off]
        covered = RangeSet()
        for b in bufs:
            for s, e in b.ranges.intersect(off - b.window, end - b.window):
                covered.add(b.window + s, b.window + e)
        if self.holes:
            known_zero = list(self.holes.intersect(off, end))
            for s, e in known_zero:
                covered.add(s, e)  # ``out`` starts as zeros
            if known_zero:
                stats.hole_reads += 1
        gaps = covered.gaps(off, min(end, self.backing_size))
        if gaps:
            # Snapshot buffered bytes before awaiting: a buffer may be written
            # out and reused while the backing read runs.
            pieces = [(b.window + s, bytes(b.view[s:e])) for b in bufs
                      for s, e in b.ranges.intersect(off - b.window, end - b.window)]
            start, stop = gaps[0][0], gaps[-1][1]
            data = await backing_read(start, stop - start)
            out[start - off:start - off + len(data)] = data
            for pos, piece in pieces:
                out[pos - off:pos - off + len(piece)] = piece
        else:
            if bufs:
                stats.reads_from_buffers += 1
            for b in bufs:
                for s, e in b.ranges.intersect(off - b.window, end - b.window):
                    out[b.window + s - off:b.window + e - off] = b.view[s:e]
        stats.read_bytes += len(out)
        return bytes(out)

    def _read_known(self, off: int, end: int) -> bytes | None:
        """``[off, end)`` from memory alone, or None if that takes more work.

        The common read of a writer, answered without building range sets:
        QEMU's read of the block it pads a write to. The range lies in one
        window, and either the window's filling buffer holds all of it (it is
        newer than any buffer of the window in write-out), or no buffer of the
        window is in write-out and every byte is in the filling buffer, in a
        known hole, or past the end of BACKING.
        """
        cache = self.cache
        bsize = cache.buffer_size
        window = off - off % bsize
        if end > window + bsize:
            return None
        buf = self.filling.get(window)
        if buf is not None and buf.ranges.covers(off - window, end - window):
            # All in the filling buffer, which is newer than any buffer of
            # this window still in write-out.
            cache.stats.reads_from_buffers += 1
            return bytes(buf.view[off - window:end - window])
        for b in self.queue:
            if b.window == window:
                return None
        segs = list(buf.ranges.intersect(off - window, end - window)) if buf else []
        # Every byte outside the buffer must be known to read as zeros.
        pos = off
        backing_size = self.backing_size
        holes = self.holes
        in_hole = False
        for s, e in segs + [(end - window, end - window)]:
            gap_start, gap_end = pos, min(window + s, backing_size)
            if gap_start < gap_end:
                if not holes.covers(gap_start, gap_end):
                    return None
                in_hole = True
            pos = window + e
        stats = cache.stats
        if in_hole:
            stats.hole_reads += 1
        if not segs:
            return bytes(end - off)
        stats.reads_from_buffers += 1
        out = bytearray(end - off)
        assert buf is not None
        for s, e in segs:
            out[window + s - off:window + e - off] = buf.view[s:e]
        return bytes(out)

    async def truncate(self, new_size: int) -> None:
        """Set the file size to *new_size*, buffered data included."""
        cache = self.cache
        async with self.lock:
            # The lock keeps write-outs away, so no pwrite can land after this.
            await cache.io.meta(os.ftruncate, self.fd, new_size)
            if new_size < self.size:
                bsize = cache.buffer_size
                for buf in list(chain(self.queue, self.filling.values())):
                    if buf.window + bsize > new_size:
                        dropped = buf.ranges.remove(max(0, new_size - buf.window), bsize)
                        buf.filled -= dropped
                        cache.stats.dirty_bytes -= dropped
                        if not buf.ranges and buf.window in self.filling \
                                and self.filling[buf.window] is buf:
                            cache.drop_filling(buf)
            self.size = new_size
            self.backing_size = new_size
            self.write_gen += 1
            self.mtime_ns = None  # ftruncate set the backing mtime itself
            cache.backing_changed(self.key)
        cache.maybe_drop(self)

    async def fsync(self, datasync: bool) -> None:
        """Return once every byte written before the call is durable on BACKING."""
        cache = self.cache
        cache.stats.fsyncs += 1
        gen = self.write_gen
        synced = self.synced_data_gen if datasync else self.synced_full_gen
        if synced == gen and self.error is None:
            return
        await self.write_back("fsync")
        await self.sync_backing(datasync)
        lost = self.take_lost_error()
        if lost is not None:
            raise lost
        self.synced_data_gen = max(self.synced_data_gen, gen)
        if not datasync:
            self.synced_full_gen = max(self.synced_full_gen, gen)

    def take_lost_error(self) -> OSError | None:
        """The error of data dropped since the last fsync that reported one (once)."""
        exc, self.lost_error = self.lost_error, None
        if exc is not None:
            self.cache.unreported_losses.pop(self.key, None)
        return exc

    async def sync_backing(self, datasync: bool) -> None:
        """fsync/fdatasync the backing file.

        Under the lock: the descriptor cannot be closed (see WriteCache.maybe_drop)
        while the worker thread uses it.
        """
        async with self.lock:
            if self.closed:
                raise OSError(errno.EBADF, "file already released")
            await self.cache.io.data(self.cache.io.sync, self.fd, datasync, self.name)
        self.cache.stats.backing_fsyncs += 1
        self.cache.maybe_drop(self)

    async def write_back(self, cause: str) -> None:
        """Write out everything buffered now; raise the backing error if that fails."""
        self.start_write_back(cause, force=True)
        if not self.queue:
            return
        last = self.queue[-1]
        while not last.done:
            if not self.flushing:
                if self.error is not None:
                    raise again(self.error)
                self.cache.kick(self, force=True)
            await self.progress.park()

    def start_write_back(self, cause: str, force: bool = False) -> None:
        """Seal every filling buffer and make sure the flusher runs; do not wait."""
        for buf in list(self.filling.values()):
            self.cache.seal(buf, cause, kick=False)
        if self.queue:
            self.cache.kick(self, force=force)

    def raise_error(self) -> None:
        """For write and flush: a failing write-out's error, or once a permanent one."""
        if self.error is not None:
            raise again(self.error)
        if self.lost_error is not None and not self.lost_reported:
            self.lost_reported = True
            raise again(self.lost_error)

    @property
    def dirty(self) -> bool:
        return bool(self.filling or self.queue)

    def buffered_bytes(self) -> int:
        return sum(b.filled for b in chain(self.queue, self.filling.values()))


class WriteCache:
    """All buffered files of one mount, their pool and their flusher tasks."""

    def __init__(self, io: BackingIO, stats: Stats, *, buffer_size: int, max_dirty: int,
                 buffers_per_file: int, flush_delay: float, align: int,
                 writeout_queue: int = 0, sync_fd: int | None = None,
                 on_backing_changed: Callable[[Key], None] | None = None) -> None:
        self.io = io
        #: A descriptor on BACKING for syncfs (flush/unmount), or None.
        self.sync_fd = sync_fd
        self.stats = stats
        self.buffer_size = buffer_size
        self.buffers_per_file = buffers_per_file
        #: Most buffers one file may have sealed and not yet written (the one
        #: being written included) before its writers wait; 0: no bound but
        #: the pool's (see _queue_is_full).
        self.writeout_queue = writeout_queue
        self.flush_delay = flush_delay
        #: Direct-I/O alignment of BACKING; 0 if it has no O_DIRECT.
        self.align = align or 4096
        self.use_direct = align != 0
        self.pool = BufferPool(buffer_size, max_dirty // buffer_size, io.meta)
        self.files: dict[Key, CachedFile] = {}
        #: Lowered to the offset of the first EFBIG, so later writes fail at once.
        self.max_offset = MAX_OFFSET
        #: Every filling buffer of every file, oldest first (for pressure and age).
        self.filling: OrderedDict[Buffer, None] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._warned_no_direct = False
        #: Told when a file's backing bytes change (read-ahead drops what it holds).
        self._on_backing_changed = on_backing_changed
        #: Tells stats of BACKING taken while a CachedFile ended (see stat_fence).
        self.fence = StatFence()
        #: Every write dropped by a permanent error in this mount (the first
        #: MAX_LOST_RECORDS; stats count them all): flush_all reports them.
        self.lost: list[LostWrite] = []
        #: Per file, (name, error) of a loss no fsync has reported yet: a file
        #: forgotten and opened again reports it all the same.
        self.unreported_losses: dict[Key, tuple[str, OSError]] = {}
        #: What close() could not write (set when running() ends).
        self.unmount_failures: list[tuple[str, OSError]] = []
        #: The kernel keeps the files' mtime (FUSE writeback cache) and sends it
        #: with SETATTR when it changes: a WRITE does not set it, and a
        #: write-out puts back the backing mtime it found (see _pwrite_plan).
        self.kernel_times = False

    @classmethod
    @asynccontextmanager
    async def running(cls, io: BackingIO, stats: Stats, **kwargs: int | float) \
            -> AsyncIterator[WriteCache]:
        """The cache with its flushers and age timer; writes everything out on exit."""
        cache = cls(io, stats, **kwargs)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            cache._nursery = nursery
            nursery.start_soon(cache._age_loop)
            try:
                yield cache
            finally:
                with trio.CancelScope(shield=True):
                    cache.unmount_failures = await cache.close()
                nursery.cancel_scope.cancel()

    # -- files -----------------------------------------------------------------

    async def attach(self, key: Key, reopen: Callable[[int], int], name: str) -> CachedFile:
        """The CachedFile for *key*, created on first use; counts one more handle.

        *reopen(flags)* opens the backing file and returns a descriptor.
        """
        cf = self.files.get(key)
        if cf is None:
            with self.fence.open():
                mark = self.fence.mark()
                fd, direct = await self.io.meta(self._open_backing, reopen)
                size, holes = await self.io.meta(_layout, fd)
                cf = self.files.get(key)
                if cf is None:
                    # The layout is the file's only if no CachedFile of it ended
                    # since (another open's, written out meanwhile).
                    while self.fence.stale(key, mark):
                        mark = self.fence.mark()
                        size, holes = await self.io.meta(_layout, fd)
                    cf = self.files.get(key)
                if cf is None:
                    cf = CachedFile(self, key, fd, direct, size, name, holes)
                    self.files[key] = cf
                    lost = self.unreported_losses.get(key)
                    if lost is not None and lost[0] == name:
                        # Forgotten since its data was dropped: the loss is not.
                        # (The name must match too: an inode number may be reused.)
                        cf.lost_error = lost[1]
                else:
                    await self.io.meta(os.close, fd)
        cf.handles += 1
        return cf

    def _open_backing(self, reopen: Callable[[int], int]) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_CLOEXEC
        direct = self.use_direct
        if direct:
            try:
                fd = reopen(flags | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False
                fd = reopen(flags)
                if not self._warned_no_direct:
                    self._warned_no_direct = True
                    log.warning("backing file refuses O_DIRECT; using buffered writes of "
                                "the same aligned buffers (fsync still exact)")
        else:
            fd = reopen(flags)
        return fd, direct

    def detach(self, cf: CachedFile) -> None:
        """One handle of *cf* was released."""
        cf.handles -= 1
        if cf.handles == 0:
            cf.start_write_back("close")
            self.maybe_drop(cf)

    def maybe_drop(self, cf: CachedFile) -> None:
        if cf.handles or cf.dirty or cf.flushing or cf.lock.locked():
            return
        if self.files.get(cf.key) is cf:
            del self.files[cf.key]
            self.fence.file_ended(cf.key)
            self._close_file(cf)

    @staticmethod
    def _close_file(cf: CachedFile) -> None:
        cf.closed = True
        # close() of a descriptor with nothing dirty does no I/O; the tail
        # descriptor's page cache was written by the fsync/syncfs that counts.
        os.close(cf.fd)
        if cf.tail_fd is not None:
            os.close(cf.tail_fd)

    # -- buffers ---------------------------------------------------------------

    async def new_buffer(self, cf: CachedFile, window: int,
                         refuse_failing: bool = True) -> Buffer:
        """A filling buffer for *window* of *cf*; waits (backpressure) for memory.

        A failing file gets none unless *refuse_failing* is False; then it
        gets one while the pool (with its allowance for stuck buffers) has one.
        """
        waited_since: float | None = None
        made_room = False
        while True:
            buf = cf.filling.get(window)
            if buf is not None:
                break
            if cf.error is not None and refuse_failing:
                raise again(cf.error)
            if not made_room and self._queue_is_full(cf):
                if waited_since is None:
                    waited_since = trio.current_time()
                await cf.progress.park()
                continue
            if len(cf.filling) >= self.buffers_per_file:
                self._seal_one_of(cf)
                # Queued for this writer: it must not then wait for the queue.
                made_room = True
            mem = self.pool.try_take()
            if mem is not None:
                buf = Buffer(cf, mem, window, trio.current_time())
                cf.filling[window] = buf
                self.filling[buf] = None
                self.stats.buffers_in_use = self.pool.in_use
                break
            if self.pool.can_grow(extra=self._stuck_buffers()):
                # Then look again: others ran while the buffer was made.
                await self.pool.grow()
                self.stats.pool_bytes = self.pool.made * self.buffer_size
                self.stats.pool_touch_seconds = self.pool.touch_seconds
                continue
            if self.filling and not self._memory_coming_back():
                # Only filling buffers hold memory: give one up (a passed one first).
                done = next((b for b in self.filling if self._passed(b)), None)
                victim = done or next(iter(self.filling))
                self.seal(victim, "pressure", kick=False)
                self.kick(victim.file, force=True)
            if not self._memory_coming_back():
                # All memory is held by write-outs that keep failing (a full
                # disk): waiting could last forever, so fail like they do.
                failing = next((c.error for c in self.files.values() if c.error), None)
                raise again(failing) if failing else OSError(errno.ENOMEM, "no buffer memory")
            if waited_since is None:
                waited_since = trio.current_time()
            await self.pool.wait_for_free()
        if waited_since is not None:
            self.stats.writer_wait_seconds += trio.current_time() - waited_since
        return buf

    def _queue_is_full(self, cf: CachedFile) -> bool:
        """*cf* has --writeout-queue buffers queued while its flusher makes
        progress: a writer that needs another buffer waits for the disk.

        A stream that outruns the disk gains nothing from a longer queue (the
        flusher writes one buffer at a time anyway); it would only take more
        memory (each new buffer a first touch), and make every fsync of the
        file wait for all of it. Checked before any buffer is taken, not only
        before one is sealed for room: pages of the kernel's writeback fill a
        window at once and are sealed when full (``_put``), so their file
        never has ``buffers_per_file`` filling. Not while the file's
        write-out fails (its writers get the error) or its flusher is not
        running: then nothing would wake the writer.
        """
        return (0 < self.writeout_queue <= len(cf.queue) and cf.flushing
                and cf.error is None)

    def _seal_one_of(self, cf: CachedFile) -> None:
        """The file needs a new window but fills buffers_per_file: write one out.

        A full buffer is kept filling until then, not written at once: writers
        often come back to a window just after it became full (qcow2 on FUSE
        merges COW with data and rewrites clusters it just allocated; with the
        buffer written at once, every such rewrite became another small backing
        write). So the least recently written buffer that the writers have
        passed (see ``_passed``) goes first; else the lowest window (the one
        furthest behind the stream's frontier, or a straggler patching an old
        window; never the frontier the writers are filling out of order).
        Judging by "passed" rather than "full" keeps one split window from
        splitting every later one.
        """
        done = next((b for b in cf.filling.values() if self._passed(b)), None)
        if done is not None:
            self.seal(done, "full" if done.filled == self.buffer_size else "moved_on")
        else:
            self.seal(min(cf.filling.values(), key=lambda b: b.window), "moved_on")

    def _passed(self, buf: Buffer) -> bool:
        """The writers are done with this buffer's window: it is covered from its
        first byte to the window's end without a hole (full, or the rest of a
        window split by an fsync or pressure). A window whose pieces arrive out
        of order reaches its end before it is complete: that does not count."""
        return len(buf.ranges) == 1 and buf.ranges.last() == self.buffer_size

    def take_unreported_loss(self, key: Key, name: str) -> OSError | None:
        """For a file with no CachedFile now: the loss no fsync has reported yet (once)."""
        lost = self.unreported_losses.get(key)
        if lost is None or lost[0] != name:
            return None
        del self.unreported_losses[key]
        return lost[1]

    def cached(self, key: Key) -> CachedFile | None:
        """The CachedFile of *key*, if the file has one now."""
        return self.files.get(key)

    def backing_changed(self, key: Key) -> None:
        """BACKING changed (write-out, truncate): tell whoever holds copies of it."""
        if self._on_backing_changed is not None:
            self._on_backing_changed(key)

    def _memory_coming_back(self) -> bool:
        """Some sealed buffer is being written out, or the pool is making a
        buffer: waiting gives memory back.

        Then a writer waits rather than sealing a filling buffer early: under a
        slow disk that would split the stream's windows into small writes
        (each one more IOPS) exactly when the disk is the bottleneck.
        """
        return self.pool.growing > 0 or any(cf.flushing and cf.queue and cf.error is None
                                            for cf in self.files.values())

    def _stuck_buffers(self) -> int:
        """Buffers held by files whose write-out is failing.

        They may be held for long (a full disk), so the pool may grow by as
        many, so that other files keep working while one cannot be written;
        never by more than the pool itself (memory stays within 2x --max-dirty).
        """
        stuck = sum(len(cf.queue) for cf in self.files.values() if cf.error is not None)
        return min(stuck, self.pool.max_buffers)

    def seal(self, buf: Buffer, cause: str, kick: bool = True) -> None:
        """Stop filling *buf* and queue it for write-out."""
        cf = buf.file
        del cf.filling[buf.window]
        del self.filling[buf]
        buf.sealed = True
        cf.queue.append(buf)
        self.stats.flushes[cause] += 1
        if kick:
            self.kick(cf)

    def drop_filling(self, buf: Buffer) -> None:
        """Return an empty filling buffer to the pool (after truncate)."""
        del buf.file.filling[buf.window]
        del self.filling[buf]
        self._release(buf)

    def _release(self, buf: Buffer) -> None:
        self.stats.dirty_bytes -= buf.filled
        buf.done = True
        self.pool.give_back(buf.mem)
        self.stats.buffers_in_use = self.pool.in_use

    def kick(self, cf: CachedFile, force: bool = False) -> None:
        """Start the flusher of *cf* unless it runs (or is failing and not forced)."""
        if cf.flushing or not cf.queue:
            return
        if cf.error is not None and not force \
                and trio.current_time() - cf.error_time < self.flush_delay:
            return
        assert self._nursery is not None, "WriteCache used outside running()"
        cf.flushing = True
        self._nursery.start_soon(self._flusher, cf)

    # -- write-out -------------------------------------------------------------

    async def _flusher(self, cf: CachedFile) -> None:
        try:
            while cf.queue:
                buf = cf.queue[0]
                try:
                    async with cf.lock:
                        if buf.ranges:
                            await self._write_out(cf, buf)
                except Exception as exc:
                    self.stats.backing_errors += 1
                    if not isinstance(exc, OSError):
                        # A bug, not the disk: keep the data, report EIO, go on serving.
                        log.exception("%s: internal error writing back", cf.name)
                        exc = OSError(errno.EIO, "internal error in write-back (see log)")
                    if exc.errno not in PERMANENT_ERRNOS:
                        self._write_out_failed(cf, buf, exc)
                        return
                    self._drop_unwritable(cf, buf, exc)
                cf.queue.popleft()
                self._release(buf)
                if cf.error is not None:
                    log.info("%s: write-back works again after: %s", cf.name, cf.error)
                    cf.error = None
                cf.progress.unpark_all()
        finally:
            cf.flushing = False
            cf.progress.unpark_all()
            self.maybe_drop(cf)

    def _write_out_failed(self, cf: CachedFile, buf: Buffer, exc: OSError) -> None:
        """Keep *buf* at the head of the queue; the file refuses writes until a retry works."""
        if cf.error is None or cf.error.errno != exc.errno:
            log.error("%s: backing write at offset %d failed: %s (data kept buffered, "
                      "will retry)", cf.name, buf.window + (buf.ranges.first() if buf.ranges
                                                             else 0), exc.strerror)
        cf.error = exc
        cf.error_time = trio.current_time()
        # Writers waiting for memory re-check: this file's ones must fail now, and
        # the others may use the pool's allowance for buffers stuck here.
        self.pool.wake_waiters()

    def _drop_unwritable(self, cf: CachedFile, buf: Buffer, exc: OSError) -> None:
        """*buf* can never be written: drop it, remember the loss for the mount.

        The file's next write or flush fails once, its next fsync fails, and
        every flush_all (``alignfs flush``, unmount) reports the loss.
        """
        first = buf.window + buf.ranges.first()
        lost = LostWrite(cf.name, first, buf.ranges.total(), exc.errno or errno.EIO)
        log.error("%s: %d bytes at offset %d can never be written (%s); dropped, the "
                  "error goes to the next fsync, alignfs flush and unmount", cf.name,
                  lost.length, first, exc.strerror)
        if exc.errno == errno.EFBIG:
            self.max_offset = min(self.max_offset, buf.window)
        self.stats.lost_writes += 1
        self.stats.lost_bytes += lost.length
        if len(self.lost) < MAX_LOST_RECORDS:
            self.lost.append(lost)
        self.unreported_losses[cf.key] = (cf.name, exc)
        cf.lost_error = exc
        cf.lost_reported = False

    async def _write_out(self, cf: CachedFile, buf: Buffer) -> None:
        """Write *buf* to BACKING (caller holds cf.lock)."""
        buf.writing = True  # before the first await: no late write lands here now
        align, bsize, window = self.align, self.buffer_size, buf.window
        extents: list[list[int]] = []
        partial: set[int] = set()
        for s, e in buf.ranges:
            es, ee = s - s % align, min(bsize, -(-e // align) * align)
            if extents and es <= extents[-1][1]:
                extents[-1][1] = max(extents[-1][1], ee)
            else:
                extents.append([es, ee])
            for edge in (s, e):
                if edge % align:
                    block = edge - edge % align
                    if not buf.ranges.covers(block, block + align):
                        partial.add(block)
        to_read = sorted(b for b in partial if window + b < cf.backing_size
                         and not self._gaps_in_holes(cf, buf, b))
        for block in partial.difference(to_read):
            for gs, ge in buf.ranges.gaps(block, block + align):
                buf.view[gs:ge] = bytes(ge - gs)
        if to_read:
            await self.io.data(self._fill_partial_blocks, cf, buf, to_read)
            self.stats.rmw_block_reads += len(to_read)
            self.stats.backing_reads += len(to_read)
            self.stats.backing_read_bytes += len(to_read) * align
        zeros = self._bridge_past_end(cf, window, extents)
        spans = self._bridge_by_reading(extents)
        if spans:
            spans = await self.io.data(self._read_gaps, cf, buf, spans)
            self._join_runs(extents, spans)
            self.stats.backing_reads += len(spans)
            read = sum(span.end - span.start for span in spans)
            self.stats.backing_read_bytes += read
            self.stats.gap_read_bytes += read
        # The file's size now: truncate waits for the lock this write-out holds,
        # so it can only grow meanwhile, by writes to other buffers.
        plan = self._plan_writes(cf, window, extents, cf.size)
        try:
            await self.io.data(self._pwrite_plan, cf, buf, plan, zeros)
        finally:
            # Even a failed pwrite may have changed part of the file.
            self.backing_changed(cf.key)
        for start, end, direct in plan:
            self.stats.backing_writes += 1
            self.stats.backing_write_bytes += end - start
            if not direct:
                self.stats.tail_writes += 1
            elif (window + start) % align or (end - start) % align:
                self.stats.unaligned_backing_writes += 1
        cf.backing_size = max(cf.backing_size, window + plan[-1][1])

    def _bridge_past_end(self, cf: CachedFile, window: int,
                         extents: list[list[int]]) -> list[tuple[int, int]]:
        """Join aligned *extents* (in place) across gaps of at most BRIDGE_LIMIT
        that lie past BACKING's end; return those gaps, to be zeroed in the
        buffer before the write. Nothing else can have put data there: every
        byte written below the file's size since it was attached went through
        this cache, so past ``backing_size`` BACKING holds zeros (the read
        path relies on that too), and the lock held keeps other write-outs
        of the file away. A gap inside the file is left alone: filling it
        would cost a read, or make a sparse file less sparse."""
        zeros: list[tuple[int, int]] = []
        if len(extents) < 2 or window + extents[-1][0] <= cf.backing_size:
            return zeros
        joined = [extents[0]]
        for es, ee in extents[1:]:
            last = joined[-1]
            if es - last[1] <= BRIDGE_LIMIT and window + last[1] >= cf.backing_size:
                zeros.append((last[1], es))
                last[1] = ee
            else:
                joined.append([es, ee])
        extents[:] = joined
        if zeros:
            self.stats.zero_fill_bytes += sum(e - s for s, e in zeros)
        return zeros

    @staticmethod
    def _bridge_by_reading(extents: list[list[int]]) -> list[Span]:
        """Runs of aligned *extents* whose gaps, each at most BRIDGE_LIMIT,
        would cost more as separate writes than one read of the run's span
        plus writing the gaps back: each as its span, its gaps and the range
        of *extents* it joins (see _join_runs).

        A window that was written and then gets late writes all over (qcow2
        after an fsync: the data of the clusters whose COW parts it had just
        written as zeros) used to go out as dozens of small writes, a seek
        each. Run of k+1 extents: k - 1 I/Os saved (k writes, less the read)
        against the span read and the gaps written again.
        """
        spans: list[Span] = []
        i, n = 0, len(extents)
        while i < n:
            j = i
            while j + 1 < n and extents[j + 1][0] - extents[j][1] <= BRIDGE_LIMIT:
                j += 1
            gaps = [(extents[k][1], extents[k + 1][0]) for k in range(i, j)]
            moved = (extents[j][0] - extents[i][1]) + sum(e - s for s, e in gaps)
            if len(gaps) >= 2 and (len(gaps) - 1) * SEEK_BYTES > moved:
                spans.append(Span(extents[i][1], extents[j][0], gaps, i, j))
            i = j + 1
        return spans

    @staticmethod
    def _join_runs(extents: list[list[int]], spans: list[Span]) -> None:
        """Merge each span's run of *extents* into one extent (in place)."""
        for span in reversed(spans):
            i, j = span.first, span.last
            extents[i:j + 1] = [[extents[i][0], extents[j][1]]]

    def _read_gaps(self, cf: CachedFile, buf: Buffer, spans: list[Span]) -> list[Span]:
        """Worker thread: for each span, read it from BACKING and copy its gaps
        (bytes the buffer does not cover) into the buffer; past BACKING's
        end, zeros. A span with a hole of BACKING in a gap is left out (the
        joined write would fill the hole: a sparse file stays sparse).
        Returns the spans whose gaps were filled."""
        filled = []
        eof = os.fstat(cf.fd).st_size
        for span in spans:
            if any(_has_hole(cf.fd, buf.window + gs, min(buf.window + ge, eof))
                   for gs, ge in span.gaps):
                continue
            scratch = mmap.mmap(-1, span.end - span.start)
            view = memoryview(scratch)
            try:
                n = self.io.pread_into(cf.fd, view, buf.window + span.start, cf.name)
                if n < len(view):
                    view[n:] = bytes(len(view) - n)
                for gs, ge in span.gaps:
                    buf.view[gs:ge] = view[gs - span.start:ge - span.start]
            finally:
                view.release()
                scratch.close()
            filled.append(span)
        return filled

    def _gaps_in_holes(self, cf: CachedFile, buf: Buffer, block: int) -> bool:
        """The bytes of *block* the buffer lacks are all in known holes (zeros)."""
        base = buf.window
        return all(cf.holes.covers(base + gs, base + ge)
                   for gs, ge in buf.ranges.gaps(block, block + self.align))

    def _plan_writes(self, cf: CachedFile, window: int, extents: list[list[int]],
                     size: int) -> list[tuple[int, int, bool]]:
        """The writes of one buffer: (start, end, through the O_DIRECT descriptor).

        Aligned extents go out with O_DIRECT, except past the file's *size*: a
        whole last block would make BACKING larger than the file, visible to
        any stat and kept by a crash before a truncate could cut it back. The
        part of that block below EOF is written through the buffered tail
        descriptor instead (at most one block per write-out, and only at the
        file's end). The kernel keeps the two coherent: an O_DIRECT read or
        write of that block later writes back and drops its cached page first,
        and fsync/syncfs cover both descriptors of the one file.
        """
        plan: list[tuple[int, int, bool]] = []
        align = self.align
        for es, ee in extents:
            end = min(ee, size - window)  # > es: buffered data lies below the size
            direct_end = end - end % align if cf.direct else end
            if direct_end > es:
                plan.append((es, direct_end, True))
            if end > max(es, direct_end):
                plan.append((max(es, direct_end), end, False))
        return plan

    def _fill_partial_blocks(self, cf: CachedFile, buf: Buffer, blocks: list[int]) -> None:
        """Worker thread: read partly covered blocks and fill their uncovered bytes."""
        align = self.align
        scratch = mmap.mmap(-1, align)
        sview = memoryview(scratch)
        try:
            for block in blocks:
                n = self.io.pread_into(cf.fd, sview, buf.window + block, cf.name)
                if n < align:
                    sview[n:] = bytes(align - n)
                for gs, ge in buf.ranges.gaps(block, block + align):
                    buf.view[gs:ge] = sview[gs - block:ge - block]
        finally:
            sview.release()
            scratch.close()

    def _pwrite_plan(self, cf: CachedFile, buf: Buffer, plan: list[tuple[int, int, bool]],
                     zeros: list[tuple[int, int]]) -> None:
        """Worker thread: the gaps *zeros* (uncovered bytes) zeroed in the
        buffer, the planned pwrites, then the client's mtime put back (each
        pwrite sets it to now). With kernel_times and no mtime known, the one
        the file had before: the kernel shows that one until it sends its own."""
        for start, end in zeros:
            buf.view[start:end] = _ZEROS[:end - start]
        found = os.fstat(cf.fd).st_mtime_ns if self.kernel_times else None
        for start, end, direct in plan:
            fd = cf.fd if direct else self._tail_fd(cf)
            self.io.pwrite_all(fd, buf.view[start:end], buf.window + start, cf.name)
        mtime = cf.mtime_ns if cf.mtime_ns is not None else found
        if mtime is not None:
            syscalls.set_mtime(cf.fd, mtime)

    @staticmethod
    def _tail_fd(cf: CachedFile) -> int:
        """Worker thread, under cf.lock: the buffered descriptor, opened on first use."""
        if cf.tail_fd is None:
            if not cf.direct:
                return cf.fd
            cf.tail_fd = os.open(f"/proc/self/fd/{cf.fd}", os.O_WRONLY | os.O_CLOEXEC)
        return cf.tail_fd

    # -- timers and shutdown ---------------------------------------------------

    def _idle_delay(self) -> float | None:
        """How long a kernel-fed buffer may go without a write before it is
        sealed (None: only the age rule applies)."""
        return min(IDLE_SEAL, self.flush_delay) if self.kernel_times else None

    def _seal_idle(self, now: float, idle: float) -> None:
        """Seal buffers of files written only by the kernel's writeback that
        got no write for *idle* seconds.

        The kernel held those bytes in its page cache already (until its
        dirty limits, its 30 s expiry, sync(2), fsync or close sent them);
        keeping them for --flush-delay more only delays durability: after
        ``sync`` alignfs starts writing at once. A writeback pass sends a
        file's pages back to back in up to 1 MiB requests, so a pause means
        the pass is over. Files with an O_DIRECT handle (QEMU cache=none)
        are left to the usual rules: their writers send small requests
        themselves, with pauses, into windows they come back to.
        """
        for buf in [b for b in self.filling if b.file.direct_handles == 0
                    and now - b.touched >= idle]:
            self.seal(buf, "idle")

    async def _age_loop(self) -> None:
        tick = min(self.flush_delay / 4, 1.0)
        idle = self._idle_delay()
        if idle is not None:
            tick = min(tick, idle / 2)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if idle is not None:
                self._seal_idle(now, idle - tick)
            while self.filling:
                buf = next(iter(self.filling))
                if now - buf.born < self.flush_delay - tick:
                    break
                self.seal(buf, "age")
            for cf in list(self.files.values()):
                if cf.error is not None:
                    self.kick(cf)

    async def flush_all(self, cause: str = "unmount",
                        sync: bool = True) -> list[tuple[str, OSError]]:
        """Write out every file, then make BACKING durable; return the failures.

        Durability is one syncfs of BACKING (it also covers files already
        written and released, and metadata such as renames), or an fsync per
        cached file when no sync_fd was given. The failures are (name, error)
        of files whose data stays buffered (the error says from which offset),
        of BACKING's syncfs, and of every write dropped earlier in this mount:
        data that is not on BACKING is never reported as written.
        """
        failures: list[tuple[str, OSError]] = []
        for cf in list(self.files.values()):
            try:
                await cf.write_back(cause)
                if sync and self.sync_fd is None and not cf.closed:
                    await cf.sync_backing(False)
            except OSError as exc:
                failures.append((cf.name, _kept_buffered(cf, exc)))
        if sync and self.sync_fd is not None:
            try:
                await self.io.data(syscalls.syncfs, self.sync_fd)
                self.stats.backing_fsyncs += 1
            except OSError as exc:
                failures.append(("BACKING", exc))
        failures += [(lost.name, lost.error()) for lost in self.lost]
        unlisted = self.stats.lost_writes - len(self.lost)
        if unlisted > 0:
            failures.append(("BACKING", OSError(errno.EIO, f"{unlisted} more writes were "
                                                 "dropped (see the log)")))
        return failures

    def unwritten_bytes(self) -> int:
        return sum(cf.buffered_bytes() for cf in self.files.values())

    async def close(self) -> list[tuple[str, OSError]]:
        """Write everything out; log and return what is not on BACKING."""
        failures = await self.flush_all("unmount")
        for name, exc in failures:
            log.error("%s: not on BACKING at unmount: %s", name, exc.strerror or exc)
        if failures:
            log.error("%d bytes could not be written to BACKING, %d were dropped earlier",
                      self.unwritten_bytes(), self.stats.lost_bytes)
        for cf in list(self.files.values()):
            if not cf.dirty:
                del self.files[cf.key]
                self._close_file(cf)
        self.pool.close()
        return failures


def _kept_buffered(cf: CachedFile, exc: OSError) -> OSError:
    """*exc* (writing *cf* out failed) restated with the data it keeps buffered."""
    starts = [b.window + b.ranges.first()
              for b in chain(cf.queue, cf.filling.values()) if b.ranges]
    if not starts:
        return exc
    return OSError(exc.errno, f"{exc.strerror or exc}: {cf.buffered_bytes()} bytes from "
                   f"offset {min(starts)} are kept buffered, not written")


def _has_hole(fd: int, start: int, end: int) -> bool:
    """Worker thread: whether BACKING has a hole in ``[start, end)`` (below
    its end; past it there is nothing to keep sparse)."""
    if start >= end:
        return False
    try:
        return os.lseek(fd, start, os.SEEK_HOLE) < end
    except OSError:  # ENXIO: start is at or past the end
        return False


#: At most this many holes are remembered per file (a fragmented sparse file
#: keeps the first ones; the rest are read from BACKING as before).
MAX_HOLES = 64


def _layout(fd: int) -> tuple[int, RangeSet]:
    """Worker thread: the backing file's size and (some of) its holes."""
    size = os.fstat(fd).st_size
    holes = RangeSet()
    pos = 0
    try:
        while pos < size and len(holes) < MAX_HOLES:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size  # nothing but a hole up to EOF
            if data > pos:
                holes.add(pos, min(data, size))
            if data >= size:
                break
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return size, RangeSet()  # no SEEK_DATA here: no holes known
    return size, holes
