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
uncontended. Waiting for the FUSE descriptor still checkpoints on every
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

    Contended, a task parks until the holder releases, then tries again (no
    FIFO hand-off: the released lock may go to a task that never waited).
    Cancellation while parked leaves the lock as it was.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiters.park()
        self._held = True

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._held = False
        if self._waiters:
            self._waiters.unpark()


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
