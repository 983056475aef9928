"""In-process tests of the Operations class: FUSE handlers on the test's trio loop.

Operations runs against a real BACKING directory in ``tmp_path`` with a real
WriteCache, without a kernel mount; requests are plain method calls with a
fake request context. This tier reaches interleavings a mount cannot force:
a backing call whose result is held back while another request runs.
"""

from __future__ import annotations

import errno
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from conftest import set_faults

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


# -- a stat overtaken by a file's last write-out (issue 14.1) ---------------------------
#
# Every answer that carries a size (getattr, lookup, readdirplus, create, open's
# CachedFile) comes from a backing stat taken on a worker thread and turned into
# attributes on the trio thread later. If the file's last write-out ends and its
# CachedFile is dropped in between, the stat is older than what clients wrote: it
# has the size before the write-out (data "cut short"), or, taken in the middle of
# an O_DIRECT write-out, its padding past EOF (size "rounded up to 4 KiB").


class HeldCallIO(BackingIO):
    """Real threads; the first ``meta`` call of the function named ``hold`` has its
    result held back (after it ran) until ``release`` is set."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.hold: str | None = None
        self.release = trio.Event()
        self.held = trio.Event()

    async def meta(self, fn, *args):
        result = await super().meta(fn, *args)
        if self.hold is not None and getattr(fn, "__name__", "") == self.hold:
            self.hold = None
            self.held.set()
            await self.release.wait()
        return result


@asynccontextmanager
async def ops_over(tmp_path: Path, io: BackingIO):
    """Operations and its WriteCache over a fresh BACKING in *tmp_path*."""
    backing = tmp_path / "backing"
    backing.mkdir()
    root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
    try:
        async with WriteCache.running(io, Stats(), buffer_size=64 * 1024,
                                      max_dirty=1 << 20, buffers_per_file=2,
                                      flush_delay=60.0, align=4096) as cache:
            yield Operations(root_fd, io, cache), cache
    finally:
        os.close(root_fd)


async def create_img(ops: Operations) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
    return await ops.create(pyfuse3.ROOT_INODE, b"img", 0o644, os.O_RDWR | os.O_CREAT,
                            FakeContext())


@asynccontextmanager
async def ops_with_buffered_file(tmp_path: Path, data: bytes):
    """Operations over BACKING with one file "img" holding *data* in a buffer only."""
    io = HeldCallIO(2)
    async with ops_over(tmp_path, io) as (ops, cache):
        info, entry = await create_img(ops)
        assert await ops.write(info.fh, 0, data) == len(data)
        assert os.stat(tmp_path / "backing" / "img").st_size == 0  # still buffered
        yield ops, cache, io, info.fh, entry.st_ino


async def _end_last_write_out(ops: Operations, cache: WriteCache, fh: int) -> None:
    await ops.release(fh)  # the last handle: write-out starts
    await cache.flush_all()
    assert not cache.files  # written and dropped


async def _getattr(ops: Operations, ino: int) -> pyfuse3.EntryAttributes:
    return await ops.getattr(ino, FakeContext())


async def _lookup(ops: Operations, ino: int) -> pyfuse3.EntryAttributes:
    return await ops.lookup(pyfuse3.ROOT_INODE, b"img", FakeContext())


@pytest.mark.parametrize(("held", "answer"), [("fstat", _getattr), ("_open_path", _lookup)],
                         ids=["getattr", "lookup"])
async def test_no_answer_is_a_stat_overtaken_by_the_last_write_out(
        tmp_path: Path, held: str, answer) -> None:
    """getattr (lookup) stats the backing file; meanwhile the file's last
    write-out ends and its CachedFile (whose size the answer reports) is
    dropped. The stat taken before the write-out must not be reported: it has
    the old size (the soak under CPU pressure saw sizes cut short and, with the
    O_DIRECT padding past EOF of the time, rounded up to 4 KiB after reopen)."""
    data = b"x" * 5000
    async with ops_with_buffered_file(tmp_path, data) as (ops, cache, io, fh, ino):
        io.hold = held
        got: list[pyfuse3.EntryAttributes] = []
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                got.append(await answer(ops, ino))

            nursery.start_soon(ask)
            await io.held.wait()  # its stat saw the file before the write-out
            await _end_last_write_out(ops, cache, fh)
            io.release.set()
        assert got[0].st_size == len(data)
        if answer is _lookup:
            await ops.forget([(got[0].st_ino, 1)])
    assert (tmp_path / "backing" / "img").read_bytes() == data


async def test_readdirplus_never_returns_a_stat_overtaken_by_the_last_write_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"y" * 7000
    sent: dict[bytes, pyfuse3.EntryAttributes] = {}

    def readdir_reply(token, name, attrs, next_id):  # the kernel's side of readdirplus
        sent[name] = attrs
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    async with ops_with_buffered_file(tmp_path, data) as (ops, cache, io, fh, ino):
        dfh = await ops.opendir(pyfuse3.ROOT_INODE, FakeContext())
        io.hold = "_scan"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.readdir, dfh, 0, None)
            await io.held.wait()
            await _end_last_write_out(ops, cache, fh)
            io.release.set()
        await ops.releasedir(dfh)
        assert sent[b"img"].st_size == len(data)
        await ops.forget([(sent[b"img"].st_ino, 1)])
    assert (tmp_path / "backing" / "img").read_bytes() == data


async def test_open_never_sizes_its_cached_file_from_an_overtaken_stat(
        tmp_path: Path) -> None:
    """Two opens of a file with no CachedFile race: B's backing stat is taken
    first, then A attaches, writes, closes, and A's data is written out and its
    CachedFile dropped before B goes on. B's CachedFile must have the size A
    wrote (a smaller one would cut the file back at B's next write-out)."""
    data = b"z" * 6000
    async with ops_with_buffered_file(tmp_path, data) as (ops, cache, io, fh, ino):
        await _end_last_write_out(ops, cache, fh)
        io.hold = "_open_backing"
        opened: list[int] = []
        async with trio.open_nursery() as nursery:

            async def open_b() -> None:
                opened.append((await ops.open(ino, os.O_RDWR, FakeContext())).fh)

            nursery.start_soon(open_b)
            await io.held.wait()  # B's stat sees 6000 bytes
            info = await ops.open(ino, os.O_RDWR, FakeContext())  # A
            assert await ops.write(info.fh, 6000, b"w" * 1000) == 1000
            await _end_last_write_out(ops, cache, info.fh)
            io.release.set()
        attrs = await ops.getattr(ino, FakeContext())
        assert attrs.st_size == 7000
        assert await ops.write(opened[0], 100, b"q") == 1
        await ops.release(opened[0])
        await cache.flush_all()
    assert (tmp_path / "backing" / "img").read_bytes() == \
        data[:100] + b"q" + data[101:] + b"w" * 1000


class SizeWatchIO(BackingIO):
    """Real threads; records the backing file's size right after every pwrite."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sizes: list[int] = []

    def pwrite_all(self, fd, view, offset, name):
        super().pwrite_all(fd, view, offset, name)
        self.sizes.append(os.fstat(fd).st_size)


async def test_a_write_out_never_makes_backing_larger_than_the_file(tmp_path: Path) -> None:
    """O_DIRECT writes whole blocks; a write-out ending in a partial block past
    EOF must not pad the backing file, not even for a moment (a crash then, or
    a stat then, would keep a size no client set)."""
    backing = tmp_path / "img"
    backing.write_bytes(b"")
    io = SizeWatchIO(2)
    async with WriteCache.running(io, Stats(), buffer_size=64 * 1024, max_dirty=1 << 20,
                                  buffers_per_file=2, flush_delay=60.0, align=4096) as cache:
        st = os.stat(backing)
        cf = await cache.attach((st.st_dev, st.st_ino),
                                lambda flags: os.open(backing, flags), "img")
        await cf.write(0, b"a" * 10000)
        await cf.fsync(False)
        await cf.write(10000, b"b" * 70000)  # two windows, the last one partial
        await cf.fsync(False)
        cache.detach(cf)
    assert io.sizes and max(io.sizes) <= 80000, io.sizes
    assert backing.read_bytes() == b"a" * 10000 + b"b" * 70000


async def test_fsync_of_a_read_only_handle_reports_dropped_data(tmp_path: Path) -> None:
    """A write-out that fails for good (EFBIG) drops the data; an fsync through
    a read-only handle of the file must fail as a writer's would, once."""
    faults = tmp_path / "faults.json"
    io = BackingIO(2, fault_file=faults)
    try:
        async with ops_over(tmp_path, io) as (ops, cache):
            info, entry = await create_img(ops)
            reader = await ops.open(entry.st_ino, os.O_RDONLY, FakeContext())
            assert await ops.write(info.fh, 1 << 20, b"x" * 100) == 100
            set_faults(faults, {"write": "EFBIG"})
            await ops.release(info.fh)  # the last writer: the write-out drops the data
            await cache.flush_all(sync=False)
            set_faults(faults, None)
            with pytest.raises(pyfuse3.FUSEError) as err:
                await ops.fsync(reader.fh, False)
            assert err.value.errno == errno.EFBIG
            await ops.fsync(reader.fh, False)  # reported once
            await ops.release(reader.fh)
    finally:
        io.close()


# -- the error boundary ---------------------------------------------------------------


class _Broken(Exception):
    """A bug inside a handler (not an OSError)."""


@pytest.mark.parametrize("handler", ["read", "write", "getattr"])
async def test_handlers_answer_errno_for_oserror_and_eio_for_a_bug(
        tmp_path: Path, handler: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """READ and WRITE turn their exceptions into FUSEError themselves (no
    wrapper); every handler must answer the same way: an OSError's errno,
    and EIO with the traceback logged for anything else. A bare exception
    would end pyfuse3's main loop and the mount with it."""
    io = BackingIO(2)
    try:
        async with ops_over(tmp_path, io) as (ops, cache):
            info, entry = await create_img(ops)
            await ops.write(info.fh, 0, b"d" * 100)
            cf = cache.files[ops._handles[info.fh].inode.key]

            async def call() -> object:
                if handler == "read":
                    return await ops.read(info.fh, 0, 10)
                if handler == "write":
                    return await ops.write(info.fh, 0, b"x")
                return await ops.getattr(entry.st_ino, FakeContext())

            for exc, want in ((OSError(errno.ENOSPC, "full"), errno.ENOSPC),
                              (_Broken("bug"), errno.EIO)):
                def fail(*args: object, exc: Exception = exc) -> object:
                    raise exc
                target = {"read": (cf, "read_from_memory"), "write": (cf, "write_now"),
                          "getattr": (ops, "_fresh_attrs")}[handler]
                with monkeypatch.context() as m:
                    m.setattr(*target, fail)
                    caplog.clear()
                    with pytest.raises(pyfuse3.FUSEError) as err:
                        await call()
                assert err.value.errno == want
                logged = [r for r in caplog.records if "internal error" in r.getMessage()]
                assert bool(logged) == (want == errno.EIO)
            assert await call() is not None  # and the handler works again
            await ops.release(info.fh)
    finally:
        io.close()
