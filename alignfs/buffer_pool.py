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
"""

from __future__ import annotations

import mmap

import trio


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


class BufferPool:
    """At most *max_buffers* mmap buffers of *buffer_size* bytes, made on demand
    and reused; :meth:`try_take` never blocks, :meth:`wait_for_free` parks a
    writer until :meth:`give_back` (or :meth:`wake_waiters`)."""

    def __init__(self, buffer_size: int, max_buffers: int) -> None:
        self.buffer_size = buffer_size
        self.max_buffers = max_buffers
        self._free: list[mmap.mmap] = []
        self._allocated = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def in_use(self) -> int:
        """Buffers handed out and not yet returned."""
        return self._allocated - len(self._free)

    def try_take(self, extra: int = 0) -> mmap.mmap | None:
        """A buffer if one is free or may still be allocated, else None.

        *extra* raises the bound for this call (buffers stuck on a failing file).
        """
        if self._free:
            return self._free.pop()
        if self._allocated < self.max_buffers + extra:
            self._allocated += 1
            return anonymous_buffer(self.buffer_size)
        return None

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
