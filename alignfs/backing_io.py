"""Blocking I/O on BACKING, always run on worker threads.

pyfuse3 serves every request on one trio thread, so a single blocking
``pwrite`` or ``fsync`` there would stall every client. Everything that may
touch the disk goes through :class:`BackingIO`, which runs it with
``trio.to_thread.run_sync`` under a limiter of its own. This module also holds
the direct-I/O alignment probe, the test-only fault injector and the
test-only trace of backing writes.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from . import syscalls

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_ALIGN = 4096


class FaultInjector:
    """Makes backing reads/writes fail, for tests only.

    Reads a small JSON file (``{"write": "EIO", "read": "EIO", "match": "name"}``)
    whenever its mtime changes; an absent file means no faults.
    ``{"write_delay": 0.2}`` makes each backing write of a matching file take
    that many seconds longer instead (a slow disk).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self._rules: dict[str, str] = {}
        self._lock = threading.Lock()

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._rules, self._mtime = {}, None
            return
        if mtime != self._mtime:
            try:
                self._rules = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                self._rules = {}
            self._mtime = mtime

    def check(self, kind: str, name: str) -> None:
        with self._lock:
            self._reload()
            code = self._rules.get(kind)
            delay = self._rules.get(f"{kind}_delay")
            match = self._rules.get("match", "")
        if delay and match in name:
            time.sleep(float(delay))
        if code and match in name:
            num = getattr(errno, code)
            raise OSError(num, f"injected fault: {os.strerror(num)}")


class BackingIO:
    """Runs backing syscalls on worker threads; one instance per mount."""

    def __init__(self, io_threads: int, fault_file: Path | None = None,
                 trace_file: Path | None = None) -> None:
        #: Bounds data writes/reads of the write cache.
        self.data_limiter = trio.CapacityLimiter(io_threads)
        #: Bounds metadata calls (lookup, getattr, ...), kept apart so a burst
        #: of large writes cannot starve `ls`.
        self.meta_limiter = trio.CapacityLimiter(32)
        self.faults = FaultInjector(fault_file) if fault_file else None
        self._trace = open(trace_file, "a", buffering=1) if trace_file else None  # noqa: SIM115
        self._trace_lock = threading.Lock()

    async def meta(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.meta_limiter)

    async def data(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.data_limiter)

    # -- the data path, called on worker threads ---------------------------------

    def pwrite_all(self, fd: int, view: memoryview, offset: int, name: str) -> None:
        """Write all of *view* at *offset* (looping on short writes)."""
        if self.faults:
            self.faults.check("write", name)
        if self._trace:
            with self._trace_lock:
                self._trace.write(f"{name} {offset} {len(view)}\n")
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "backing pwrite wrote nothing")
            done += n

    def pread_into(self, fd: int, view: memoryview, offset: int, name: str) -> int:
        """Fill *view* from *offset*; returns bytes read (short only at EOF)."""
        if self.faults:
            self.faults.check("read", name)
        # One read: a short count means end of file (continuing at an unaligned
        # position would fail on an O_DIRECT descriptor if the file grew meanwhile).
        return os.preadv(fd, [view], offset)

    def pread(self, fd: int, size: int, offset: int, name: str) -> bytes:
        if self.faults:
            self.faults.check("read", name)
        return os.pread(fd, size, offset)

    def sync(self, fd: int, datasync: bool, name: str) -> None:
        if self.faults:
            self.faults.check("fsync", name)
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def close(self) -> None:
        if self._trace:
            self._trace.close()


def detect_alignment(backing_dir: str | Path) -> int:
    """The direct-I/O alignment to use for files in *backing_dir*.

    Asks the kernel (statx STATX_DIOALIGN) about a scratch file; where that is
    not reported, probes O_DIRECT writes of growing alignment. Never less than
    4096. Returns 0 if the backing filesystem does not support O_DIRECT at all.
    """
    name = os.path.join(backing_dir, f".alignfs-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("cannot create probe file in %s (%s); assuming %d-byte alignment",
                    backing_dir, exc, MIN_ALIGN)
        return MIN_ALIGN
    try:
        os.unlink(name)
        reported = syscalls.dio_alignment(fd)
        if reported:
            return max(MIN_ALIGN, *reported)
        try:
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return 0
            raise
        try:
            align = MIN_ALIGN
            while align <= 1 << 20:
                mem = mmap.mmap(-1, align)
                try:
                    os.pwrite(dfd, mem, 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        # Cannot tell (e.g. BACKING is full): assume the minimum.
                        log.warning("direct-I/O probe in %s failed (%s); assuming "
                                    "%d-byte alignment", backing_dir, exc.strerror, MIN_ALIGN)
                        return MIN_ALIGN
                finally:
                    mem.close()
                align *= 2
            return 0
        finally:
            os.close(dfd)
    finally:
        os.close(fd)
