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
