"""Running one mount: mount, serve, and on every way out write everything back.

Order of events: open BACKING, detect the direct-I/O alignment, mount
(``pyfuse3.init``), serve requests on the trio thread, report readiness once
the mountpoint answers (checked from a worker thread: the trio thread that
serves the mount must never touch it). On SIGTERM/SIGINT, on ``alignfs
umount`` and on an external unmount, all buffered data is written out and
fsync'd before the daemon unmounts and exits; the exit code says whether it
all reached BACKING (6 if anything did not: still buffered, or dropped earlier
in the mount). SIGHUP writes everything back without unmounting, in a task of
its own so that a SIGTERM meanwhile is not held up.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import fuse_loop, sdnotify, syscalls
from .backing_io import BackingIO, detect_alignment
from .config import ConfigError, MountConfig
from .control import ControlFile
from .exitcodes import ExitCode
from .operations import Operations
from .read_ahead import ReadAhead
from .sizes import format_size
from .stats import Stats
from .write_cache import WriteCache

log = logging.getLogger(__name__)

#: pyfuse3 worker tasks; requests overlap only at awaits, so this bounds how
#: many requests can wait on backing I/O (or on buffer memory) at once.
MAX_TASKS = 64


class DaemonError(Exception):
    """A failure before the mount went live; carries the exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _first(group: BaseExceptionGroup, kind: type[DaemonError]) -> DaemonError | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kind)
            if found is not None:
                return found
    return None


class Daemon:
    """One mount from start to exit: :meth:`run` returns the exit code.

    It opens BACKING, composes the engine (read-ahead, write cache,
    Operations, control file) around one BackingIO, mounts, serves until
    unmount, ``alignfs umount`` or a signal, and writes everything back on
    each of those ways out; the exit code is UNWRITTEN_DATA if any data did
    not reach BACKING. A failure before the mount is live raises DaemonError,
    which carries its own exit code.
    """

    def __init__(self, config: MountConfig, on_ready: Callable[[], None] | None = None,
                 status_file: Path | None = None) -> None:
        self.config = config
        self.on_ready = on_ready
        #: Where the exit code will be left for ``alignfs umount`` (told in stats).
        self.status_file = status_file
        self.stats = Stats()
        self.cache: WriteCache | None = None
        self.ops: Operations | None = None
        self.align = 0
        self._stopping = False
        self._sighup_running = False
        self._io: BackingIO | None = None
        #: st_dev of the mounted filesystem, once it answers.
        self._mount_dev: int | None = None
        self._nursery: trio.Nursery | None = None
        self.exit_code = ExitCode.OK

    # -- control channel -------------------------------------------------------

    def stats_dict(self) -> dict[str, Any]:
        out = self.stats.as_dict()
        out.update(pid=os.getpid(), mountpoint=str(self.config.mountpoint),
                   backing=str(self.config.backing), buffer_size=self.config.buffer_size,
                   max_dirty=self.config.max_dirty, align=self.align,
                   buffers_per_file=self.config.effective_buffers_per_file,
                   writeout_queue=self.config.writeout_queue,
                   open_files=len(self.cache.files) if self.cache else 0,
                   status_file=str(self.status_file) if self.status_file else None)
        return out

    @staticmethod
    def _log_failures(what: str, failures: list[tuple[str, OSError]]) -> None:
        for name, exc in failures:
            log.error("%s: %s: %s", what, name, exc.strerror or exc)

    async def _kernel_writeback(self) -> None:
        """Make the kernel send the dirty pages it holds for this mount.

        With the writeback cache, bytes written before a flush, unmount or
        SIGTERM may still be in the kernel's page cache; once the daemon
        stops serving they could no longer reach it. A syncfs of the mount
        from a worker thread sends them (this thread serves the WRITEs) and
        returns when they are answered. Skipped when the mount is gone.
        """
        def sync_mount(path: str, dev: int | None) -> None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_dev == dev:
                    syscalls.syncfs(fd)
            finally:
                os.close(fd)
        if self._mount_dev is None:
            return
        try:
            await trio.to_thread.run_sync(sync_mount, str(self.config.mountpoint),
                                          self._mount_dev)
        except OSError as exc:
            log.warning("could not make the kernel write back its pages: %s", exc)

    async def _flush_request(self) -> None:
        """``alignfs flush``: fails (exit 6) if any data is not on BACKING, lost
        earlier in this mount included."""
        assert self.cache is not None
        await self._kernel_writeback()
        failures = await self.cache.flush_all("unmount")
        if failures:
            self._log_failures("alignfs flush", failures)
            raise FUSEError(failures[0][1].errno or errno.EIO)

    async def _umount_request(self) -> None:
        """``alignfs umount``: write everything out, then stop.

        While data stays buffered because its write-out fails, refuse (the
        mount stays, so nothing is lost; a retry may work). Data already
        dropped cannot be saved by staying: then stop, and exit 6.
        """
        assert self.cache is not None
        await self._kernel_writeback()
        failures = await self.cache.flush_all("unmount")
        if failures:
            self._log_failures("alignfs umount", failures)
            if any(cf.error is not None and cf.dirty for cf in self.cache.files.values()):
                raise FUSEError(failures[0][1].errno or errno.EIO)
            self.exit_code = ExitCode.UNWRITTEN_DATA
        self._begin_stop("alignfs umount")

    def _begin_stop(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping (%s)", why)
        assert self._nursery is not None
        self._nursery.start_soon(self._stop)

    async def _stop(self) -> None:
        assert self.cache is not None
        sdnotify.notify("STOPPING=1")
        # Write out while still mounted, reporting progress so systemd extends
        # its stop timeout for as long as data keeps moving.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_progress)
            await self._kernel_writeback()
            failures = await self.cache.flush_all("unmount")
            nursery.cancel_scope.cancel()
        if failures:
            self.exit_code = ExitCode.UNWRITTEN_DATA
        pyfuse3.terminate()

    async def _report_progress(self) -> None:
        assert self.cache is not None
        while True:
            left = self.cache.unwritten_bytes()
            sdnotify.notify(f"STATUS=writing back {format_size(left)}",
                            "EXTEND_TIMEOUT_USEC=30000000")
            await trio.sleep(1)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    # A task of its own: a SIGTERM must not wait behind it.
                    assert self._nursery is not None
                    self._nursery.start_soon(self._write_back_on_sighup)
                    continue
                self._begin_stop(signal.Signals(signum).name)

    async def _write_back_on_sighup(self) -> None:
        """SIGHUP: write everything out and sync, without unmounting; log the outcome."""
        assert self.cache is not None
        if self._sighup_running:
            log.info("SIGHUP: a write-back is already running")
            return
        self._sighup_running = True
        log.info("SIGHUP: writing everything back")
        try:
            await self._kernel_writeback()
            failures = await self.cache.flush_all("unmount")
        finally:
            self._sighup_running = False
        if failures:
            self._log_failures("SIGHUP write-back", failures)
        else:
            log.info("SIGHUP: everything is on BACKING")

    async def _announce_ready(self) -> None:
        faults = self._io.faults if self._io is not None else None
        if faults is not None:
            try:  # test hook: {"ready": "EIO"} in the fault file
                await trio.to_thread.run_sync(faults.check, "ready", "")
            except OSError:
                log.warning("fault injected: never reporting readiness")
                await trio.sleep_forever()
        # A worker thread stats the mountpoint while this thread serves it.
        st = await trio.to_thread.run_sync(os.stat, str(self.config.mountpoint))
        self._mount_dev = st.st_dev
        log.info("mounted %s on %s (buffers %s, max dirty %s, alignment %d)",
                 self.config.backing, self.config.mountpoint,
                 format_size(self.config.buffer_size), format_size(self.config.max_dirty),
                 self.align)
        sdnotify.notify("READY=1", f"STATUS=serving {self.config.mountpoint}",
                        f"MAINPID={os.getpid()}")
        if self.on_ready:
            self.on_ready()

    # -- main ------------------------------------------------------------------

    def _fuse_options(self) -> set[str]:
        opts = {"default_permissions", f"fsname={self.config.backing}", "subtype=alignfs"}
        if self.config.allow_other:
            opts.add("allow_other")
        if os.geteuid() == 0:
            opts.update({"dev", "suid"})
        return opts

    def run(self) -> ExitCode:
        cfg = self.config
        try:
            root_fd = os.open(cfg.backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DaemonError(ExitCode.BAD_BACKING,
                              f"cannot open BACKING {cfg.backing}: {exc.strerror}") from exc
        self.align = cfg.align if cfg.align is not None else detect_alignment(cfg.backing)
        try:
            cfg.check_alignment(self.align)
        except ConfigError as exc:
            os.close(root_fd)
            raise DaemonError(ExitCode.BAD_BACKING, str(exc)) from exc
        if self.align == 0:
            log.warning("%s does not support O_DIRECT: buffered writes of aligned buffers",
                        cfg.backing)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.umask(0)  # the kernel already applied the caller's umask
        try:
            return trio.run(self._main, root_fd)
        except BaseExceptionGroup as group:
            # Raised inside the cache's nursery, a DaemonError arrives wrapped.
            found = _first(group, DaemonError)
            if found is not None:
                raise found from None
            raise

    async def _main(self, root_fd: int) -> ExitCode:
        cfg = self.config
        io = self._io = BackingIO(cfg.io_threads, cfg.fault_file, cfg.trace_file)
        sync_fd = os.open(f"/proc/self/fd/{root_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        mounted = False
        try:
            readahead_running = ReadAhead.running(
                io, self.stats, align=self.align, max_window=cfg.readahead,
                budget=cfg.readahead_memory) if cfg.readahead else nullcontext(None)
            async with readahead_running as readahead, WriteCache.running(
                    io, self.stats, buffer_size=cfg.buffer_size, max_dirty=cfg.max_dirty,
                    buffers_per_file=cfg.effective_buffers_per_file,
                    writeout_queue=cfg.writeout_queue, flush_delay=cfg.flush_delay,
                    align=self.align, sync_fd=sync_fd,
                    on_backing_changed=readahead.invalidate if readahead else None) as cache:
                self.cache = cache
                st = os.stat(cfg.mountpoint)
                control = ControlFile(st.st_uid if os.geteuid() == 0 else os.geteuid(),
                                      st.st_gid, self.stats_dict, self._flush_request,
                                      self._umount_request)
                self.ops = Operations(root_fd, io, cache, readahead=readahead, control=control,
                                      xattr=cfg.xattr)
                try:
                    pyfuse3.init(self.ops, str(cfg.mountpoint), self._fuse_options())
                except RuntimeError as exc:
                    raise DaemonError(ExitCode.FUSE_UNAVAILABLE,
                                      f"cannot mount {cfg.mountpoint}: {exc}") from exc
                mounted = True
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._watch_signals)
                    nursery.start_soon(self._announce_ready)
                    fuse_loop.install()
                    await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
                    nursery.cancel_scope.cancel()
                self.ops.close_all()
                # Leaving WriteCache.running writes out whatever is left.
            if cache.unmount_failures or any(cf.dirty for cf in cache.files.values()):
                # Whatever ended the mount (alignfs umount, umount -l,
                # fusermount3 -u, a signal): data not on BACKING, still
                # buffered or dropped earlier, means exit 6.
                self.exit_code = ExitCode.UNWRITTEN_DATA
        finally:
            if mounted:
                pyfuse3.close(unmount=True)
            io.close()
        if self.exit_code == ExitCode.OK:
            log.info("unmounted %s; all data written", cfg.mountpoint)
        else:
            log.error("unmounted %s; some data could NOT be written to BACKING",
                      cfg.mountpoint)
        return self.exit_code
