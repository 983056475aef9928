"""In-process tests of the Daemon's signal handling (no mount).

The daemon's signal watcher runs on the test's trio loop with a stand-in
cache whose flush is held open by the test; signals are sent to the test
process itself. SIGTERM, SIGINT and SIGHUP get no-op Python handlers for the
test's duration, so a signal trio has not consumed cannot end pytest.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from alignfs.config import MountConfig
from alignfs.daemon import Daemon


class HeldFlushCache:
    """Stands in for the WriteCache: flush_all waits until the test releases it."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.release = trio.Event()
        self.finished = trio.Event()

    async def flush_all(self, cause: str = "unmount",
                        sync: bool = True) -> list[tuple[str, OSError]]:
        self.started.set()
        await self.release.wait()
        self.finished.set()
        return [("vm.img", OSError(errno.EIO, "Input/output error"))]


async def test_sighup_flush_runs_beside_the_signal_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP's write-back runs as its own task: a SIGTERM during it starts the
    stop at once (it used to wait until the flush ended), and the flush's
    failures are logged, naming the file (they used to be thrown away)."""
    saved = {sig: signal.signal(sig, lambda *_: None)
             for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        daemon = Daemon(MountConfig(mountpoint=tmp_path, backing=tmp_path))
        cache = HeldFlushCache()
        daemon.cache = cache  # type: ignore[assignment]
        stopping = trio.Event()
        daemon._begin_stop = lambda why: stopping.set()  # type: ignore[method-assign]
        caplog.set_level(logging.INFO)
        async with trio.open_nursery() as nursery:
            daemon._nursery = nursery
            nursery.start_soon(daemon._watch_signals)
            await trio.testing.wait_all_tasks_blocked()
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                await cache.started.wait()
            os.kill(os.getpid(), signal.SIGTERM)
            with trio.fail_after(10):
                await stopping.wait()  # while the SIGHUP flush is still running
            assert not cache.finished.is_set()
            cache.release.set()
            with trio.fail_after(10):
                await cache.finished.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    text = caplog.text
    assert "vm.img" in text and "Input/output error" in text, text
