"""The lock alignfs gives pyfuse3's request loop (alignfs/fuse_loop.py)."""

from __future__ import annotations

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
    assert pyfuse3.trio.lowlevel is trio.lowlevel  # type: ignore[attr-defined]
    assert fuse_loop.install()  # idempotent
    assert pyfuse3.trio.Lock is fuse_loop.ReadLock  # type: ignore[attr-defined]
    monkeypatch.setattr(pyfuse3, "trio", object())  # a pyfuse3 without the seam
    assert not fuse_loop.install()
