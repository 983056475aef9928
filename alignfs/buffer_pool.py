"""The bounded pool of page-aligned write buffers.

All buffered data of all files lives in buffers from this pool, so its size is
the daemon's memory bound (``--max-dirty``). Buffers are anonymous ``mmap``
regions: page-aligned, so they can be handed to an O_DIRECT ``pwrite`` as they
are. A writer that finds the pool empty waits (backpressure); it never fails.

Every such region comes from :func:`anonymous_buffer`: private, so that a
region of whole 2 MiB pages is backed by transparent huge pages when the
system allows them (``madvise`` mode included). A huge page is one fault
instead of 512 and one pin per 2 MiB for the kernel's O_DIRECT path, which
pins every page of a buffer on each write-out (measured in DEVELOPERS.md).

The pool grows on a worker thread (:meth:`BufferPool.grow`), which also
faults the new region in. A first touch is the dearest thing a buffer ever
costs: the kernel zeroes every page, and a virtual machine whose host took
idle memory back (free page reporting) faults each page in on the host too.
Done in the first write's copy, that stalled every client of the mount for
each new 8 MiB (2-3 ms per huge page on the VM the bench runs on); on a
worker it stalls only the writer that needs the buffer. Its CPU time is kept
(``pool_touch_seconds``): a cost paid once per buffer per mount, which a
benchmark of a fresh mount would otherwise count against every GiB.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

#: Runs a blocking call on a worker thread: ``await run(fn, *args)``.
RunInThread = Callable[..., Awaitable[Any]]

#: madvise(2) advice that faults a range in, writable (Linux 5.14); missing
#: from the mmap module of the Pythons alignfs supports.
MADV_POPULATE_WRITE = 23


def anonymous_buffer(size: int) -> mmap.mmap:
    """Zeroed, page-aligned memory of *size* bytes for O_DIRECT I/O.

    Private (a shared anonymous map is shmem, which ``madvise`` THP does not
    cover), asked for huge pages, and left out of any child a fork makes.
    """
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in ("MADV_HUGEPAGE", "MADV_DONTFORK"):
        value = getattr(mmap, advice, None)
        if value is not None:
            try:
                mem.madvise(value)
            except OSError:  # THP compiled out, or an older kernel
                pass
    return mem


def touched_buffer(size: int) -> tuple[mmap.mmap, float]:
    """:func:`anonymous_buffer`, every page faulted in; and the CPU seconds
    that took. Blocks: run it on a worker thread."""
    start = time.thread_time()
    mem = anonymous_buffer(size)
    try:
        mem.madvise(MADV_POPULATE_WRITE)
    except OSError:  # before Linux 5.14: touch each page
        for pos in range(0, size, mmap.PAGESIZE):
            mem[pos] = 0
    return mem, time.thread_time() - start


class BufferPool:
    """At most *max_buffers* mmap buffers of *buffer_size* bytes, made on demand
    (:meth:`grow`) and reused; :meth:`try_take` never blocks,
    :meth:`wait_for_free` parks a writer until :meth:`give_back` (or
    :meth:`wake_waiters`)."""

    def __init__(self, buffer_size: int, max_buffers: int,
                 run_in_thread: RunInThread = trio.to_thread.run_sync) -> None:
        self.buffer_size = buffer_size
        #: How :meth:`grow` gets to a worker thread (the cache's BackingIO.meta).
        self._run_in_thread = run_in_thread
        self.max_buffers = max_buffers
        self._free: list[mmap.mmap] = []
        #: Buffers made, those being made included.
        self._allocated = 0
        self._growing = 0
        #: CPU seconds spent faulting new buffers in (see the module docstring).
        self.touch_seconds = 0.0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def in_use(self) -> int:
        """Buffers handed out and not yet returned."""
        return self._allocated - self._growing - len(self._free)

    @property
    def growing(self) -> int:
        """Buffers being made (see :meth:`grow`)."""
        return self._growing

    @property
    def made(self) -> int:
        """Buffers in existence (free, in use, or being made)."""
        return self._allocated

    def try_take(self) -> mmap.mmap | None:
        """A free buffer, else None (then see :meth:`can_grow`)."""
        return self._free.pop() if self._free else None

    def can_grow(self, extra: int = 0) -> bool:
        """Whether one more buffer may be made. *extra* raises the bound for
        this call (buffers stuck on a failing file)."""
        return self._allocated < self.max_buffers + extra

    async def grow(self) -> None:
        """Make one more buffer, faulted in on a worker thread, and add it to
        the free list (waking waiters). Call only when :meth:`can_grow`; the
        slot is taken at once, so concurrent callers respect the bound."""
        self._allocated += 1
        self._growing += 1
        try:
            mem, seconds = await self._run_in_thread(touched_buffer, self.buffer_size)
        except BaseException:
            self._allocated -= 1
            raise
        finally:
            self._growing -= 1
        self.touch_seconds += seconds
        self.give_back(mem)

    async def wait_for_free(self) -> None:
        """Sleep until some buffer has been returned."""
        await self._lot.park()

    def wake_waiters(self) -> None:
        """Make every waiting writer look again (the rules changed, not the pool)."""
        self._lot.unpark_all()

    def give_back(self, mem: mmap.mmap) -> None:
        self._free.append(mem)
        self._lot.unpark_all()

    def close(self) -> None:
        for mem in self._free:
            try:
                mem.close()
            except BufferError:  # a memoryview still refers to it; the GC frees it
                pass
        self._allocated -= len(self._free)
        self._free.clear()
