"""A cheaper lock and a cheaper readiness wait for pyfuse3's request loop.

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
before the scheduler next waits for I/O. Its ``lowlevel.wait_readable`` (see
:class:`_LowlevelForPyfuse3`) answers from one ``poll`` when a request is
queued already, instead of a trip through trio's epoll manager; measured
side by side, that took the serving thread of ``qemu-img bench -w -t none``
qcow2 (64 requests in flight) from 1.67 to 1.50 CPU s/GiB, and made no
difference at one request in flight. Waiting for the FUSE descriptor still
checkpoints on every request, so the loop keeps yielding to other tasks
exactly as often.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Awaitable, Generator
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

    Release wakes nobody. pyfuse3's reader releases the lock as soon as it has
    read a request; when the handler answers without blocking, which nearly
    every read and write does, the same task is back for the lock within the
    same scheduler step, and a waiter woken at release would only find it held
    again and park: one wasted task step per request (23.5k of them for a
    1 GiB ``qemu-img bench``). Instead, :class:`_IdleReaderWatch` looks at
    the lock each time the scheduler is about to wait for I/O, i.e. once every
    runnable task has run, and wakes a waiter only if the lock is free then:
    the handler really blocked (a thread hop, a full pool, a flush that needs
    the kernel's next request). An earlier version had a system task do that
    check, rescheduled at every contended release; that cost one more task
    step and one more scheduler pass (an ``epoll_wait`` of 0) per request.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()
        self._watch: _IdleReaderWatch | None = None

    # __aenter__ and __aexit__ are plain methods returning awaitables: taking
    # and releasing a free lock, twice per request, creates no coroutine.

    def __aenter__(self) -> Awaitable[None]:
        if not self._held:
            self._held = True
            return _DONE
        return self._acquire_contended()

    async def _acquire_contended(self) -> None:
        while self._held:
            token = trio.lowlevel.current_trio_token()
            if self._watch is None or self._watch.token is not token:
                self._watch = _IdleReaderWatch(self, token)
                trio.lowlevel.add_instrument(self._watch)
            await self._waiters.park()
        self._held = True

    def __aexit__(self, exc_type: type[BaseException] | None,
                  exc: BaseException | None, tb: TracebackType | None) -> Awaitable[None]:
        self._held = False
        return _DONE

    def _wake_if_idle(self) -> bool:
        """Wake a waiter if the lock is free; True if one was woken."""
        if self._held or not self._waiters:
            return False
        self._waiters.unpark()
        return True


class _Done:
    """An awaitable that is complete already."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


_DONE = _Done()


class _IdleReaderWatch(trio.abc.Instrument):
    """Hands a free :class:`ReadLock` to a waiter before the scheduler sleeps.

    ``before_io_wait`` runs once per scheduler pass, after the pass's batch
    of tasks. The waiter it wakes runs in the next pass; if the scheduler was
    about to sleep (timeout > 0), a no-op callback through the trio token
    makes that I/O wait return at once instead of when something else
    happens (this is the rare case of a handler that blocked).
    """

    def __init__(self, lock: ReadLock, token: trio.lowlevel.TrioToken) -> None:
        self.lock = lock
        self.token = token

    def before_io_wait(self, timeout: float) -> None:
        # Once per scheduler pass: nearly always the reader holds the lock
        # while it waits for /dev/fuse, and the first test settles it.
        lock = self.lock
        if not lock._held and lock._wake_if_idle() and timeout > 0:
            self.token.run_sync_soon(_nothing)


def _nothing() -> None:
    pass


class _LowlevelForPyfuse3:
    """``trio.lowlevel`` as pyfuse3 sees it: with :meth:`wait_readable` that
    skips the I/O manager while a request is waiting already."""

    def __init__(self) -> None:
        #: One poll object per descriptor asked about (pyfuse3: just /dev/fuse).
        self._polls: dict[int, select.poll] = {}

    async def wait_readable(self, fd: int) -> None:
        """Return once *fd* is readable; a checkpoint either way.

        trio's own ``wait_readable`` arms the descriptor in epoll
        (``epoll_ctl``), parks the task, and reschedules it from the events of
        the next ``epoll_wait``: a trip through its I/O manager for every FUSE
        request. Under load a request is nearly always queued already; then
        one ``poll`` of the descriptor with no timeout says so, and a plain
        checkpoint lets every other runnable task run before the request is
        read, as the trip would have. Otherwise (idle, or the descriptor is
        closing or in error) trio's way, which also raises what it raises.
        """
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if poller.poll(0) == [(fd, select.POLLIN)]:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.wait_readable(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _TrioForPyfuse3:
    """trio as pyfuse3 sees it: the real module, but with :class:`ReadLock`
    and :meth:`_LowlevelForPyfuse3.wait_readable`."""

    Lock = ReadLock

    def __init__(self) -> None:
        self.lowlevel = _LowlevelForPyfuse3()

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
