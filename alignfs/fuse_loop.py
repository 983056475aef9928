"""A cheaper lock for pyfuse3's request loop.

pyfuse3 lets one task at a time wait for the next FUSE request: each of its
worker tasks takes a ``trio.Lock``, waits for /dev/fuse to be readable, reads
one request and releases the lock before handling it. ``trio.Lock`` checkpoints
on both acquire and release (a trip through the scheduler each), even when, as
nearly always, nobody else holds it. py-spy put about 18% of the trio thread's
busy time there (``qemu-img bench -t none`` through the mount: two requests
per 128 KiB).

pyfuse3 reaches trio through its module global ``pyfuse3.trio`` (its own
``pyfuse3.asyncio`` swaps that global the same way). :func:`install` replaces
it with a view of trio whose ``Lock`` is :class:`ReadLock`: no checkpoint when
uncontended, and no waiter woken by a release the releasing task undoes
before it yields. Waiting for the FUSE descriptor still checkpoints on every
request, so the loop keeps yielding to other tasks exactly as often.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)


class ReadLock:
    """An async mutex for pyfuse3's readers: free to take when nobody holds it.

    Contended, a task parks until the lock is free, then tries again (no FIFO
    hand-off: the released lock may go to a task that never waited).
    Cancellation while parked leaves the lock as it was.

    Release does not wake a parked task itself. pyfuse3's reader releases the
    lock as soon as it has read a request; when the handler answers without
    blocking, which nearly every read and write does, the same task is back
    for the lock within the same scheduler step, and a waiter woken at release
    would only find it held again and park: one wasted task step per request
    (23.5k of them for a 1 GiB ``qemu-img bench``). Instead the release
    schedules the *doorman*, a system task that runs in the next batch and
    wakes a waiter only if the lock is still free then, i.e. only if the
    handler really blocked (a thread hop, a full pool, a flush that needs the
    kernel's next request).
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()
        self._doorman: trio.lowlevel.Task | None = None
        self._doorman_due = False

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiters.park()
        self._held = True

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._held = False
        if self._waiters and not self._doorman_due:
            self._doorman_due = True
            if self._doorman is None:
                trio.lowlevel.spawn_system_task(self._door, name="alignfs read-lock doorman")
            else:
                trio.lowlevel.reschedule(self._doorman)

    async def _door(self) -> None:
        self._doorman = trio.lowlevel.current_task()
        try:
            while True:
                self._doorman_due = False
                if not self._held and self._waiters:
                    self._waiters.unpark()
                await trio.lowlevel.wait_task_rescheduled(_abort_succeeds)
        finally:
            self._doorman = None
            if not self._held and self._waiters:
                self._waiters.unpark_all()


def _abort_succeeds(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


class _TrioForPyfuse3:
    """trio as pyfuse3 sees it: the real module, but with :class:`ReadLock`."""

    Lock = ReadLock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> bool:
    """Give pyfuse3 the cheaper lock; False (and nothing changed) if this
    pyfuse3 does not reach trio through ``pyfuse3.trio``."""
    current = getattr(pyfuse3, "trio", None)
    if isinstance(current, _TrioForPyfuse3):
        return True
    if current is not trio:
        log.warning("pyfuse3 %s: request loop left as it is",
                    getattr(pyfuse3, "__version__", "?"))
        return False
    pyfuse3.trio = _TrioForPyfuse3()  # type: ignore[attr-defined]
    return True
