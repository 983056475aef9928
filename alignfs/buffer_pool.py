"""The bounded pool of page-aligned write buffers.

All buffered data of all files lives in buffers from this pool, so its size is
the daemon's memory bound (``--max-dirty``). Buffers are anonymous ``mmap``
regions: page-aligned, so they can be handed to an O_DIRECT ``pwrite`` as they
are. A writer that finds the pool empty waits (backpressure); it never fails.
"""

from __future__ import annotations

import mmap

import trio


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
            return mmap.mmap(-1, self.buffer_size)
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
