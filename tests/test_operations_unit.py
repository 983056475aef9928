"""In-process tests of the Operations class: FUSE handlers on the test's trio loop.

Operations runs against a real BACKING directory in ``tmp_path`` with a real
WriteCache, without a kernel mount; requests are plain method calls with a
fake request context. This tier reaches interleavings a mount cannot force:
a backing call whose result is held back while another request runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio
import trio.testing

from alignfs.backing_io import BackingIO
from alignfs.operations import Operations
from alignfs.stats import Stats
from alignfs.write_cache import WriteCache


@dataclass
class FakeContext:
    """What Operations reads from a pyfuse3.RequestContext."""

    uid: int = 0
    gid: int = 0
    pid: int = os.getpid()
    umask: int = 0o022


class HeldStatIO(BackingIO):
    """Real threads; while ``hold`` is set, an fstat's result waits for ``release``."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.hold = False
        self.release = trio.Event()
        self.held = trio.Event()

    async def meta(self, fn, *args):
        result = await super().meta(fn, *args)
        if fn is os.fstat and self.hold:
            self.hold = False
            self.held.set()
            await self.release.wait()
        return result


async def test_getattr_never_returns_a_stat_overtaken_by_the_last_write_out(
        tmp_path: Path) -> None:
    """getattr stats the backing file; meanwhile the file's last write-out ends
    and its CachedFile (whose size getattr reports) is dropped. The stat taken
    before the write-out must not be reported: it has the old size (or, taken
    during it, the O_DIRECT padding past EOF; the 20 s soak saw 5808128 for a
    5805030-byte file after reopen)."""
    backing = tmp_path / "backing"
    backing.mkdir()
    root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
    io = HeldStatIO(2)
    data = b"x" * 5000
    async with WriteCache.running(io, Stats(), buffer_size=64 * 1024, max_dirty=1 << 20,
                                  buffers_per_file=2, flush_delay=60.0, align=4096) as cache:
        ops = Operations(root_fd, io, cache)
        info, entry = await ops.create(pyfuse3.ROOT_INODE, b"img", 0o644,
                                       os.O_RDWR | os.O_CREAT, FakeContext())
        assert await ops.write(info.fh, 0, data) == len(data)
        got: list[pyfuse3.EntryAttributes] = []
        io.hold = True
        async with trio.open_nursery() as nursery:

            async def getattr_() -> None:
                got.append(await ops.getattr(entry.st_ino, FakeContext()))

            nursery.start_soon(getattr_)
            await io.held.wait()  # its fstat saw the file before the write-out
            await ops.release(info.fh)  # the last handle: write-out starts
            await cache.flush_all()
            assert not cache.files  # written, cut back, dropped
            io.release.set()
        assert got[0].st_size == len(data)
    assert (backing / "img").read_bytes() == data
    os.close(root_fd)
