"""The lock and the readiness wait alignfs gives pyfuse3's request loop
(alignfs/fuse_loop.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pyfuse3
import pytest
import trio
import trio.testing

from alignfs import fuse_loop


async def test_uncontended_lock_does_not_yield() -> None:
    lock = fuse_loop.ReadLock()
    # trio.Lock would checkpoint here; the point of ReadLock is not to.
    with trio.testing.assert_no_checkpoints():
        async with lock:
            pass
        async with lock:
            pass


async def test_lock_excludes_and_wakes_a_waiter() -> None:
    lock = fuse_loop.ReadLock()
    order: list[str] = []
    release = trio.Event()

    async def holder() -> None:
        async with lock:
            order.append("holder in")
            await release.wait()
            order.append("holder out")

    async def waiter() -> None:
        async with lock:
            order.append("waiter in")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["holder in"]  # the waiter is parked
        release.set()
    assert order == ["holder in", "holder out", "waiter in"]


class _StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


async def test_release_retaken_in_the_same_step_wakes_no_waiter(autojump_clock) -> None:
    """pyfuse3's reader releases the lock after reading a request and, when
    the handler does not block, takes it again before yielding: the parked
    spare reader must not be woken for that (one wasted step per request)."""
    lock = fuse_loop.ReadLock()
    counter = _StepCounter()
    next_request = trio.Event()
    done = trio.Event()
    served: list[str] = []

    async def reader() -> None:
        async with lock:
            await next_request.wait()  # "waits for /dev/fuse"
        for _ in range(3):  # three requests answered without blocking
            async with lock:
                pass
        served.append("reader")
        async with lock:
            await done.wait()

    async def spare() -> None:
        async with lock:
            served.append("spare")

    trio.lowlevel.add_instrument(counter)
    try:
        with trio.fail_after(60):  # virtual time: a deadlock fails at once
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, name="reader")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(spare, name="spare")
                await trio.testing.wait_all_tasks_blocked()
                before = dict(counter.steps)
                next_request.set()
                await trio.testing.wait_all_tasks_blocked()
                assert served == ["reader"]
                me = trio.lowlevel.current_task().name
                stepped = {name for name, n in counter.steps.items()
                           if n != before.get(name, 0)} - {me}
                # Neither the spare nor any helper task of the lock ran.
                assert stepped == {"reader"}
                done.set()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert served == ["reader", "spare"]


async def test_release_then_block_lets_the_waiter_in(autojump_clock) -> None:
    """A handler that blocks after the release (a thread hop; a flush that
    needs the kernel's next request) must not leave the next request unread."""
    lock = fuse_loop.ReadLock()
    handler_may_finish = trio.Event()
    order: list[str] = []

    async def reader() -> None:
        async with lock:
            order.append("reader read")
        await handler_may_finish.wait()  # blocks without the lock
        order.append("reader answered")

    async def spare() -> None:
        async with lock:
            order.append("spare read")
            handler_may_finish.set()

    with trio.fail_after(60):  # virtual time: a deadlock fails at once
        async with trio.open_nursery() as nursery:
            async with lock:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(spare)  # parked after the reader
                await trio.testing.wait_all_tasks_blocked()
    assert order == ["reader read", "spare read", "reader answered"]


async def test_cancelled_waiter_leaves_the_lock_as_it_was() -> None:
    lock = fuse_loop.ReadLock()
    async with lock:
        with trio.move_on_after(0.01) as scope:
            async with lock:
                pytest.fail("entered a held lock")
        assert scope.cancelled_caught
    async with lock:  # free again
        pass


def test_install_swaps_pyfuse3s_trio_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "trio", trio)
    assert fuse_loop.install()
    assert pyfuse3.trio.Lock is fuse_loop.ReadLock  # type: ignore[attr-defined]
    lowlevel = pyfuse3.trio.lowlevel  # type: ignore[attr-defined]
    assert isinstance(lowlevel, fuse_loop._LowlevelForPyfuse3)
    assert lowlevel.notify_closing is trio.lowlevel.notify_closing  # the rest is trio's
    assert fuse_loop.install()  # idempotent
    assert pyfuse3.trio.Lock is fuse_loop.ReadLock  # type: ignore[attr-defined]
    monkeypatch.setattr(pyfuse3, "trio", object())  # a pyfuse3 without the seam
    assert not fuse_loop.install()


# -- waiting for /dev/fuse -------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A stand-in for /dev/fuse: requests are bytes sent to the first socket."""
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def trio_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Descriptors passed to trio's own wait_readable (which still does the waiting)."""
    calls: list[int] = []
    real = trio.lowlevel.wait_readable

    async def recording(fd: int) -> None:
        calls.append(fd)
        await real(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", recording)
    return calls


async def test_queued_request_skips_trios_io_manager_but_still_checkpoints(
        pair: tuple[socket.socket, socket.socket], trio_waits: list[int]) -> None:
    queue, fuse = pair
    queue.send(b"request")
    lowlevel = fuse_loop._LowlevelForPyfuse3()
    with trio.testing.assert_checkpoints():
        await lowlevel.wait_readable(fuse.fileno())
    assert trio_waits == []
    with trio.CancelScope() as scope:  # a checkpoint: cancellation is seen
        scope.cancel()
        await lowlevel.wait_readable(fuse.fileno())
        pytest.fail("not cancelled")


async def test_no_request_waits_in_trio_until_one_comes(
        pair: tuple[socket.socket, socket.socket], trio_waits: list[int]) -> None:
    queue, fuse = pair
    lowlevel = fuse_loop._LowlevelForPyfuse3()
    woke = trio.Event()

    async def reader() -> None:
        await lowlevel.wait_readable(fuse.fileno())
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        assert trio_waits == [fuse.fileno()]
        queue.send(b"request")
    assert woke.is_set()


async def test_closing_the_descriptor_ends_the_wait_as_in_trio(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """pyfuse3.terminate() ends its reader's wait with notify_closing."""
    _, fuse = pair
    lowlevel = fuse_loop._LowlevelForPyfuse3()
    raised: list[BaseException] = []

    async def reader() -> None:
        try:
            await lowlevel.wait_readable(fuse.fileno())
        except trio.ClosedResourceError as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        lowlevel.notify_closing(fuse.fileno())
    assert len(raised) == 1
