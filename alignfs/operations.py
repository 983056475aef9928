"""The FUSE request handlers: a thin passthrough in front of the write cache.

Every handler translates one FUSE request into backing syscalls (run on
worker threads through :class:`~alignfs.backing_io.BackingIO`) or into calls
on the :class:`~alignfs.write_cache.WriteCache`. Regular-file data goes
through the cache for every writable handle; metadata passes straight through.

Error boundary: any exception leaving a pyfuse3 handler other than
``FUSEError`` ends ``pyfuse3.main()`` and kills the mount, so every handler is
wrapped: ``OSError`` becomes ``FUSEError(errno)``, anything else is logged with
its traceback and answered EIO, and the daemon keeps serving.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from . import syscalls
from .backing_io import BackingIO
from .control import ControlFile
from .inodes import UNKNOWN, Inode, InodeTable
from .read_ahead import FileReadAhead, ReadAhead, SequentialState
from .write_cache import CachedFile, WriteCache

log = logging.getLogger(__name__)

#: Seconds the kernel may cache entries and attributes. All changes normally
#: come through this mount, so the kernel's view stays right; changes made
#: directly in BACKING show up after at most this long.
TIMEOUT = 1.0

#: The xattr the kernel reads before every write(2) to decide whether the
#: write must drop file capabilities (file_remove_privs).
CAPABILITY_XATTR = b"security.capability"

_OPEN_CLIENT_ONLY = (os.O_APPEND | os.O_DIRECT | os.O_SYNC | os.O_DSYNC | os.O_TRUNC
                     | os.O_CREAT | os.O_EXCL | os.O_NOCTTY)


def _fuse_error(exc: Exception, handler: str) -> FUSEError:
    """The answer to a handler that raised *exc* (call it in the except block,
    where an internal error's traceback is logged)."""
    if isinstance(exc, FUSEError):
        return exc
    if isinstance(exc, OSError):
        return FUSEError(exc.errno or errno.EIO)
    log.exception("internal error in %s; answering EIO", handler)
    return FUSEError(errno.EIO)


def _fuse_boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(exc, fn.__name__) from None
    return wrapper


def own_boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a handler that turns its own exceptions into FUSEError (through
    _fuse_error): READ and WRITE, to save a coroutine per request."""
    fn._own_boundary = True  # type: ignore[attr-defined]
    return fn


def fuse_boundary(cls: type) -> type:
    """Wrap every async handler of *cls* in the error boundary."""
    for name, member in list(vars(cls).items()):
        if (inspect.iscoroutinefunction(member) and not name.startswith("_")
                and not getattr(member, "_own_boundary", False)):
            setattr(cls, name, _fuse_boundary(member))
    return cls


@dataclass
class Handle:
    """One open() of a regular file."""

    inode: Inode
    #: Backing descriptor for reads (buffered; O_RDWR for writable handles).
    fd: int
    flags: int
    #: The CachedFile for writable handles, else None.
    cached: CachedFile | None = None
    #: Read-ahead state of the file (None if read-ahead is off).
    ra: FileReadAhead | None = None
    seq: SequentialState = field(default_factory=SequentialState)
    # What the flags say, worked out once (every WRITE reads them).
    append: bool = field(init=False)
    direct: bool = field(init=False)
    sync: bool = field(init=False)
    datasync_only: bool = field(init=False)

    def __post_init__(self) -> None:
        self.append = bool(self.flags & os.O_APPEND)
        self.direct = bool(self.flags & os.O_DIRECT)
        self.sync = bool(self.flags & (os.O_SYNC | os.O_DSYNC))
        self.datasync_only = (self.flags & os.O_SYNC) != os.O_SYNC


@dataclass
class DirHandle:
    inode: Inode
    fd: int
    names: list[bytes] | None = None


@fuse_boundary
class Operations(pyfuse3.Operations):
    """The FUSE handlers of one mount: metadata straight to BACKING, file data
    through the write cache and read-ahead.

    Every backing call runs on a worker thread (:class:`BackingIO`); inodes
    are backing files keyed by (st_dev, st_ino) (:class:`InodeTable`); sizes
    and mtimes come from the write cache while it holds a file, and from
    stats the stat fence vouches for otherwise.
    """

    supports_dot_lookup = True
    #: The kernel's writeback cache (see ``__init__``); read by pyfuse3 at mount.
    enable_writeback_cache = True
    #: The kernel enforces POSIX ACLs (read through getxattr) like mode bits.
    enable_acl = True

    def __init__(self, root_fd: int, io: BackingIO, cache: WriteCache, *,
                 readahead: ReadAhead | None = None,
                 control: ControlFile | None = None,
                 writeback_cache: bool = True, xattr: bool = True) -> None:
        super().__init__()
        #: ``--xattr off``: every xattr request answers ENOSYS, after which the
        #: kernel sends none (it asks for security.capability before each
        #: write(2) otherwise), and POSIX ACLs are not offered.
        self.xattr = xattr
        self.enable_acl = xattr
        #: With the writeback cache the kernel collects buffered writes (and
        #: mmap stores) in its page cache and sends them in requests of up to
        #: max_write (1 MiB) instead of one WRITE per write(2). It then owns
        #: the file's size, mtime and O_APPEND positioning, and may READ
        #: through any handle, write-only ones included (see _open_handle).
        self.enable_writeback_cache = writeback_cache
        cache.kernel_times = writeback_cache
        self.inodes = InodeTable(root_fd)
        self.io = io
        self.cache = cache
        #: Read-ahead for sequential readers, or None when it is off.
        self.readahead = readahead
        self.stats = cache.stats
        self.control = control
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirHandle] = {}
        #: Open handles of the control file: what reading each gives.
        self._control_reads: dict[int, bytes] = {}
        self._next_fh = 1
        self._as_root = os.geteuid() == 0

    # -- helpers ---------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise FUSEError(errno.ESTALE)
        return inode

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _attrs(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        entry.entry_timeout = TIMEOUT
        entry.attr_timeout = TIMEOUT
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        cf = self.cache.cached(inode.key)
        if cf is not None:
            entry.st_size = cf.size
            if cf.mtime_ns is not None:
                entry.st_mtime_ns = cf.mtime_ns
                entry.st_ctime_ns = max(st.st_ctime_ns, cf.mtime_ns)
        return entry

    @staticmethod
    def _open_path(parent_fd: int, name: bytes) -> tuple[int, os.stat_result]:
        """Worker thread: O_PATH descriptor and stat of *name* in *parent_fd*."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def _register(self, fd: int, st: os.stat_result, name: bytes,
                  parent: Inode | None = None) -> pyfuse3.EntryAttributes:
        inode, adopted = self.inodes.remember(fd, st, name, parent.ino if parent else 0)
        if not adopted:
            os.close(fd)  # closing an O_PATH descriptor does no I/O
        return self._attrs(inode, st)

    async def _new_entry_attrs(self, parent: Inode, name: bytes,
                               fn: Callable[..., tuple[int, os.stat_result]],
                               *args: Any) -> pyfuse3.EntryAttributes:
        """Run *fn* (worker thread; returns an O_PATH descriptor and its stat)
        and answer with the entry, stat again if the stat may be stale (see
        stat_fence: a file's last write-out ended while it ran)."""
        fence = self.cache.fence
        with fence.open():
            mark = fence.mark()
            fd, st = await self.io.meta(fn, *args)
            try:
                while fence.stale((st.st_dev, st.st_ino), mark):
                    mark = fence.mark()
                    st = await self.io.meta(os.fstat, fd)
            except BaseException:
                os.close(fd)
                raise
            return self._register(fd, st, name, parent)

    async def _fresh_attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        """Attributes from an fstat of the backing file that no write-out overtook.

        While a CachedFile exists its size and mtime are the file's (``_attrs``);
        if the file's last write-out ends while the fstat runs, the CachedFile
        is gone and the stat may predate the data: stat again (see stat_fence).
        """
        fence = self.cache.fence
        with fence.open():
            while True:
                mark = fence.mark()
                st = await self.io.meta(os.fstat, node.fd)
                if not fence.stale(node.key, mark):
                    return self._attrs(node, st)

    def _new_entry(self, parent_fd: int, name: bytes, mode: int,
                   ctx: pyfuse3.RequestContext) -> tuple[int, os.stat_result]:
        """Worker thread: O_PATH descriptor of a just created *name*, given to the caller."""
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            self._give_to_caller(pfd, parent_fd, mode, ctx)
            return pfd, os.fstat(pfd)
        except BaseException:
            os.close(pfd)
            raise

    async def _lookup_new(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        return await self._new_entry_attrs(parent, name, self._open_path, parent.fd, name)

    def _give_to_caller(self, pfd: int, parent_fd: int, mode: int,
                        ctx: pyfuse3.RequestContext) -> None:
        """Worker thread: hand a file the daemon (root) just created to the caller.

        As the kernel would for the caller itself: owner ctx.uid, group ctx.gid
        unless the directory is setgid (then the directory's group, which the
        backing filesystem already gave it), and setuid/setgid bits kept (chown
        clears them), S_ISGID only if the caller is in the file's group.
        """
        if not self._as_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        parent_setgid = os.fstat(parent_fd).st_mode & stat.S_ISGID
        syscalls.fchown_path_fd(pfd, ctx.uid, -1 if parent_setgid else ctx.gid)
        special = mode & (stat.S_ISUID | stat.S_ISGID)
        st = os.fstat(pfd)
        if not special or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            return
        if special & stat.S_ISGID and st.st_gid != ctx.gid \
                and st.st_gid not in pyfuse3.get_sup_groups(ctx.pid):
            special &= ~stat.S_ISGID
        if special:
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(st.st_mode) | special)

    # -- lookup and attributes -------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        if parent is self.inodes.root and self.control and name == self.control.name:
            return self.control.attrs()
        if name == b".":
            name_to_open = b"."
        elif name == b"..":
            if parent is self.inodes.root:
                name_to_open = b"."  # never leave BACKING
            else:
                name_to_open = b".."
        else:
            name_to_open = name
        return await self._lookup_new(parent, name_to_open)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            fd = self.inodes.forget(ino, n)
            if fd is not None:
                os.close(fd)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.control and inode == self.control.ino:
            return self.control.attrs()
        return await self._fresh_attrs(self._inode(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.control and inode == self.control.ino:
            if fields.update_size or fields.update_mode or fields.update_uid \
                    or fields.update_gid:
                raise FUSEError(errno.EPERM)
            # Times only: with the writeback cache the kernel sends the ctime
            # an xattr command gave the file; refused, it would fail the next
            # read of the file with EIO (an error set on the kernel's mapping).
            return self.control.attrs()
        node = self._inode(inode)
        is_link = stat.S_ISLNK(node.mode)
        if fields.update_size:
            cf = self.cache.cached(node.key)
            if cf is not None:
                await cf.truncate(attr.st_size)
            elif fh is not None and fh in self._handles:
                await self.io.meta(os.ftruncate, self._handles[fh].fd, attr.st_size)
            else:
                await self.io.meta(os.truncate, node.proc_path, attr.st_size)
            if cf is None:
                self.cache.backing_changed(node.key)
        if fields.update_mode:
            if is_link:
                raise FUSEError(errno.EOPNOTSUPP)
            await self.io.meta(os.chmod, node.proc_path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            try:
                await self.io.meta(syscalls.fchown_path_fd, node.fd, uid, gid)
            finally:
                node.forget_capability()  # a chown drops file capabilities
        if fields.update_atime or fields.update_mtime:
            atime = attr.st_atime_ns if fields.update_atime else None
            mtime = attr.st_mtime_ns if fields.update_mtime else None
            cf = self.cache.cached(node.key)
            if cf is None:
                await self.io.meta(self._set_times, node, atime, mtime)
            else:
                if mtime is not None:
                    cf.mtime_ns = mtime  # kept through later write-outs
                # Under the lock: a write-out in flight puts back the mtime it
                # read before it, so it must not end after this.
                async with cf.lock:
                    await self.io.meta(self._set_times, node, atime, mtime)
        return await self._fresh_attrs(node)

    @staticmethod
    def _set_times(node: Inode, atime: int | None, mtime: int | None) -> None:
        if stat.S_ISLNK(node.mode):
            try:
                syscalls.utimens(node.fd, b"", atime, mtime,
                                 syscalls.AT_EMPTY_PATH | syscalls.AT_SYMLINK_NOFOLLOW)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise OSError(errno.EOPNOTSUPP, "cannot set times of a symlink") from exc
                raise
        else:
            syscalls.utimens(syscalls.AT_FDCWD, node.proc_path.encode(), atime, mtime)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        return await self.io.meta(lambda: os.readlink(b"", dir_fd=node.fd))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only called without default_permissions, which alignfs always sets;
        # answer from the mode bits anyway.
        node = self._inode(inode)
        st = await self.io.meta(os.fstat, node.fd)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if ctx.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif ctx.gid == st.st_gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return (bits & mode) == mode

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = await self.io.meta(os.statvfs, self.inodes.root.proc_path)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # -- namespace -------------------------------------------------------------

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)

        def do() -> tuple[int, os.stat_result]:
            os.mknod(name, mode, rdev, dir_fd=parent.fd)
            return self._new_entry(parent.fd, name, mode, ctx)
        return await self._new_entry_attrs(parent, name, do)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)

        def do() -> tuple[int, os.stat_result]:
            os.mkdir(name, mode, dir_fd=parent.fd)
            return self._new_entry(parent.fd, name, mode, ctx)
        return await self._new_entry_attrs(parent, name, do)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)

        def do() -> tuple[int, os.stat_result]:
            os.symlink(target, name, dir_fd=parent.fd)
            return self._new_entry(parent.fd, name, 0, ctx)
        return await self._new_entry_attrs(parent, name, do)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        parent = self._inode(new_parent_inode)

        def do() -> tuple[int, os.stat_result]:
            os.link(node.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
            return self._open_path(parent.fd, new_name)
        return await self._new_entry_attrs(parent, new_name, do)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        await self.io.meta(lambda: os.unlink(name, dir_fd=parent.fd))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        await self.io.meta(lambda: os.rmdir(name, dir_fd=parent.fd))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = self._inode(parent_inode_old)
        new = self._inode(parent_inode_new)
        if self.control and self.control.name in (name_old, name_new) and \
                self.inodes.root in (old, new):
            raise FUSEError(errno.EPERM)
        await self.io.meta(syscalls.renameat2, old.fd, name_old, new.fd, name_new, flags)

    # -- directories -----------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._inode(inode)
        fd = await self.io.meta(os.open, node.proc_path,
                                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node, fd)
        return fh

    @staticmethod
    def _scan(fd: int, names: list[bytes], start: int, count: int) \
            -> list[tuple[int, bytes, int, os.stat_result] | None]:
        """Worker thread: O_PATH descriptors and stats for names[start:start+count]."""
        out: list[tuple[int, bytes, int, os.stat_result] | None] = []
        for i in range(start, min(start + count, len(names))):
            try:
                pfd, st = Operations._open_path(fd, names[i])
            except OSError:
                out.append(None)  # vanished since the listing; skip it
                continue
            out.append((i, names[i], pfd, st))
        return out

    def _dot_entries(self, d: DirHandle) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """Worker thread: "." and ".." with attributes (no lookup count: see readdir)."""
        out = []
        for name in (b".", b".."):
            if name == b".." and d.inode is not self.inodes.root:
                fd = os.open(b"..", os.O_PATH | os.O_CLOEXEC, dir_fd=d.fd)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
            else:
                st = os.fstat(d.fd)
            entry = self._attrs(d.inode, st)
            entry.st_ino = self.inodes.number_of(st)
            out.append((name, entry))
        return out

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entry ids: 0 is ".", 1 is "..", 2 + i is names[i].
        d = self._dirs[fh]
        if d.names is None or start_id == 0:
            listing = await self.io.meta(os.listdir, d.fd)
            d.names = [os.fsencode(n) for n in listing]
            if self.control and d.inode is self.inodes.root:
                # The control file's name is taken; a backing file of that name is hidden.
                d.names = [n for n in d.names if n != self.control.name]
        if start_id < 2:
            dots = await self.io.meta(self._dot_entries, d)
            for i in range(start_id, 2):
                # Replies for "." and ".." never count as lookups (pyfuse3's rule).
                if not pyfuse3.readdir_reply(token, dots[i][0], dots[i][1], i + 1):
                    return
            start_id = 2
        pos = start_id - 2
        while pos < len(d.names):
            with self.cache.fence.open():
                batch = await self._scan_fresh(d, pos)
                pos += 128
                if not self._reply_entries(d, batch, token):
                    return

    async def _scan_fresh(self, d: DirHandle, pos: int) \
            -> list[tuple[int, bytes, int, os.stat_result] | None]:
        """``_scan``, with the stats a file's last write-out may have overtaken
        taken again (see stat_fence); call inside ``fence.open()``."""
        fence = self.cache.fence
        mark = fence.mark()
        batch = await self.io.meta(self._scan, d.fd, d.names, pos, 128)
        try:
            while True:
                stale = [k for k, item in enumerate(batch) if item is not None
                         and fence.stale((item[3].st_dev, item[3].st_ino), mark)]
                if not stale:
                    return batch
                mark = fence.mark()
                fds = [batch[k][2] for k in stale]  # type: ignore[index]
                stats = await self.io.meta(_fstat_all, fds)
                for k, st in zip(stale, stats, strict=True):
                    i, name, pfd, _ = batch[k]  # type: ignore[misc]
                    batch[k] = (i, name, pfd, st)
        except BaseException:
            for item in batch:
                if item is not None:
                    os.close(item[2])
            raise

    def _reply_entries(self, d: DirHandle,
                       batch: list[tuple[int, bytes, int, os.stat_result] | None],
                       token: pyfuse3.ReaddirToken) -> bool:
        """Send a scanned batch; False when the kernel's buffer is full."""
        for k, item in enumerate(batch):
            if item is None:
                continue
            i, name, pfd, st = item
            inode, adopted = self.inodes.remember(pfd, st, name, d.inode.ino)
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode, st), i + 3):
                # Not sent: undo this reference and drop the unsent batch.
                fd = self.inodes.forget(inode.ino, 1)
                if fd is not None:
                    os.close(fd)
                elif not adopted:
                    os.close(pfd)
                for rest in batch[k + 1:]:
                    if rest is not None:
                        os.close(rest[2])
                return False
            if not adopted:
                os.close(pfd)
        return True

    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh)
        os.close(d.fd)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        d = self._dirs[fh]
        await self.io.meta(os.fdatasync if datasync else os.fsync, d.fd)

    # -- regular files ---------------------------------------------------------

    def _reopen(self, node: Inode) -> Callable[[int], int]:
        return lambda flags: os.open(node.proc_path, flags)

    @staticmethod
    def _open_backing(path: str, flags: int, writable: bool) -> int:
        """Worker thread: the handle's backing descriptor.

        Writable handles get O_RDWR: reads through them overlay buffered data
        on the backing file, and with the writeback cache the kernel READs
        through a write-only handle too (to fill a page a write covers only in
        part). A file that this daemon may write but not read (a non-root
        daemon, mode 0200) gets O_WRONLY, as the client asked.
        """
        if not writable:
            return os.open(path, flags | os.O_RDONLY)
        try:
            return os.open(path, flags | os.O_RDWR)
        except PermissionError:
            return os.open(path, flags | os.O_WRONLY)

    async def _open_handle(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if self.enable_writeback_cache:
            # The kernel positions O_APPEND writes at its own i_size (it owns
            # the size) before they reach the page cache; a WRITE from its
            # writeback may come through any writable handle of the file, so
            # no handle may reposition writes itself.
            flags &= ~os.O_APPEND
            if not flags & os.O_DIRECT:
                # O_SYNC/O_DSYNC through the page cache: the kernel sends FSYNC
                # after each such write(2) itself (generic_write_sync).
                flags &= ~(os.O_SYNC | os.O_DSYNC)
        backing_flags = (flags & ~_OPEN_CLIENT_ONLY & ~os.O_ACCMODE) | os.O_CLOEXEC
        fd = await self.io.meta(self._open_backing, node.proc_path, backing_flags, writable)
        handle = Handle(node, fd, flags)
        try:
            if writable:
                handle.cached = await self.cache.attach(node.key, self._reopen(node), node.name)
                if flags & os.O_DIRECT:
                    handle.cached.direct_handles += 1
            if flags & os.O_TRUNC:
                cf = handle.cached or self.cache.cached(node.key)
                if cf is not None:
                    await cf.truncate(0)
                else:
                    await self.io.meta(os.truncate, node.proc_path, 0)
                    self.cache.backing_changed(node.key)
            readable = flags & os.O_ACCMODE != os.O_WRONLY
            if readable and self.readahead is not None:
                handle.ra = await self.readahead.attach(node.key, self._reopen(node), node.name)
        except BaseException:
            if handle.cached is not None:
                if handle.direct:
                    handle.cached.direct_handle_closed()
                self.cache.detach(handle.cached)
            os.close(fd)
            raise
        fh = self._new_fh()
        self._handles[fh] = handle
        # keep_cache: with the writeback cache the kernel's pages are the
        # newest bytes (dirty ones not yet sent), so an open must not drop them.
        return pyfuse3.FileInfo(fh=fh, direct_io=bool(flags & os.O_DIRECT),
                                keep_cache=self.enable_writeback_cache)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) \
            -> pyfuse3.FileInfo:
        if self.control and inode == self.control.ino:
            # Commands as file I/O (for --xattr off; see control.py).
            fh = self._new_fh()
            self._control_reads[fh] = self.control.open(ctx)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        node = self._inode(inode)
        return await self._open_handle(node, flags)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) \
            -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._inode(parent_inode)
        if parent is self.inodes.root and self.control and name == self.control.name:
            raise FUSEError(errno.EEXIST)
        def do() -> tuple[int, os.stat_result]:
            # O_NONBLOCK: an existing FIFO of that name must not block the thread.
            base = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                fd = os.open(name, base | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode),
                             dir_fd=parent.fd)
                created = True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd = os.open(name, base, dir_fd=parent.fd)
                created = False
            try:
                pfd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            finally:
                os.close(fd)
            try:
                if created:
                    self._give_to_caller(pfd, parent.fd, mode, ctx)
                return pfd, os.fstat(pfd)
            except BaseException:
                os.close(pfd)
                raise
        entry = await self._new_entry_attrs(parent, name, do)
        node = self.inodes[entry.st_ino]
        node.forget_capability()  # a new file, or one the kernel did not know
        try:
            info = await self._open_handle(node, flags & ~(os.O_CREAT | os.O_EXCL))
        except BaseException:
            await self.forget([(node.ino, 1)])
            raise
        return info, await self._fresh_attrs(node)

    @own_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Buffered bytes overlaid on BACKING; BACKING read ahead or plainly."""
        try:
            handle = self._handles.get(fh)
            if handle is None:
                return self._control_reads[fh][off:off + size]
            cf = handle.cached or self.cache.cached(handle.inode.key)
            sequential = handle.seq.note(off, size)
            try:
                if cf is not None:
                    # QEMU's read of the block it pads a write to: from
                    # memory, without building the backing reader.
                    known = cf.read_from_memory(off, size)
                    if known is not None:
                        return known
                backing_read = self._backing_reader(handle, sequential, cf)
                if cf is not None:
                    return await cf.read_through(off, size, backing_read)
                self.stats.read_requests += 1
                data = await backing_read(off, size)
                self.stats.read_bytes += len(data)
                return data
            finally:
                handle.seq.done()
        except Exception as exc:
            raise _fuse_error(exc, "read") from None

    def _backing_reader(self, handle: Handle, sequential: bool, cf: CachedFile | None) \
            -> Callable[[int, int], Awaitable[bytes]]:
        """How a read reaches BACKING: through read-ahead, or a plain pread.

        No read-ahead while the file has buffered writes: each write-out drops
        the file's read-ahead, and the reads of a writer (QEMU's and
        qemu-img's read-modify-write of partial blocks) would pull whole
        windows off the disk for a few bytes each.
        """
        plain = functools.partial(self._pread, handle)
        if handle.ra is None or self.readahead is None or (cf is not None and cf.dirty):
            return plain
        return functools.partial(self.readahead.read, handle.ra, handle.seq, sequential,
                                 fallback=plain)

    async def _pread(self, handle: Handle, off: int, size: int) -> bytes:
        data = await self.io.data(self.io.pread, handle.fd, size, off, handle.inode.name)
        self.stats.backing_reads += 1
        self.stats.backing_read_bytes += len(data)
        return data

    @own_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            handle = self._handles.get(fh)
            if handle is None:
                if self.control is None or fh not in self._control_reads:
                    raise FUSEError(errno.EBADF)
                await self.control.command(buf)
                return len(buf)
            cf = handle.cached
            if cf is None:
                raise FUSEError(errno.EBADF)
            if handle.append:
                off = cf.size
            # With the writeback cache, a WRITE through a buffered handle is
            # the kernel's writeback: the client's write(2) returned long ago.
            refuse = handle.direct or not self.enable_writeback_cache
            if not cf.write_now(off, buf, refuse):
                await cf.write(off, buf, refuse)
            if handle.sync:
                await cf.fsync(handle.datasync_only)
            return len(buf)
        except Exception as exc:
            raise _fuse_error(exc, "write") from None

    async def flush(self, fh: int) -> None:
        # FLUSH comes with every close() of a descriptor, including the copies a
        # fork+exec closes, so it only reports a pending write-back error; the
        # write-back itself starts when the last handle is released.
        if fh in self._control_reads:
            return
        handle = self._handles[fh]
        if handle.cached is not None:
            handle.cached.raise_error()

    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self._control_reads:
            return
        handle = self._handles[fh]
        if handle.cached is not None:
            await handle.cached.fsync(datasync)
            return
        # A read-only handle: write out what other handles buffered, then sync
        # through this handle's own descriptor (the CachedFile may be released,
        # and its descriptor closed, meanwhile). Data dropped for good fails
        # this fsync as it would a writer's.
        node = handle.inode
        cf = self.cache.cached(node.key)
        if cf is not None:
            await cf.write_back("fsync")
        await self.io.data(self.io.sync, handle.fd, datasync, node.name)
        lost = cf.take_lost_error() if cf is not None else \
            self.cache.take_unreported_loss(node.key, node.name)
        if lost is not None:
            raise lost

    async def release(self, fh: int) -> None:
        if self._control_reads.pop(fh, None) is not None:
            return
        handle = self._handles.pop(fh)
        self._drop_handle(handle)

    def _drop_handle(self, handle: Handle) -> None:
        if handle.cached is not None:
            if handle.direct:
                handle.cached.direct_handle_closed()
            self.cache.detach(handle.cached)
        if handle.ra is not None and self.readahead is not None:
            self.readahead.detach(handle.ra, handle.seq)
        os.close(handle.fd)

    # -- extended attributes ---------------------------------------------------

    def _xattr_path(self, node: Inode) -> tuple[str, bool]:
        """A path reaching *node* for the xattr calls, and whether to follow it.

        Regular files and directories: their /proc/self/fd link. A symlink has no
        descriptor that xattr calls accept, so it is reached by name in the
        directory it was last seen in, without following it, and checked to be
        the same inode first.
        """
        if not stat.S_ISLNK(node.mode):
            return node.proc_path, True
        parent = self.inodes.get(node.parent)
        if parent is None or not node.raw_name:
            raise FUSEError(errno.EOPNOTSUPP)
        return f"/proc/self/fd/{parent.fd}/{os.fsdecode(node.raw_name)}", False

    @staticmethod
    def _same_inode(node: Inode, path: str, follow: bool) -> None:
        if not follow:
            st = os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != node.key:
                raise OSError(errno.ESTALE, "symlink moved in BACKING")

    def _xattr_inode(self, inode: int) -> Inode:
        """The inode for an xattr request; ENOSYS with ``--xattr off``: the
        kernel then stops sending that request for the whole mount."""
        if not self.xattr:
            raise FUSEError(errno.ENOSYS)
        return self._inode(inode)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if self.control and inode == self.control.ino:
            await self.control.setxattr(name, value, ctx)
            return
        node = self._xattr_inode(inode)
        path, follow = self._xattr_path(node)

        def do() -> None:
            self._same_inode(node, path, follow)
            os.setxattr(path, name, value, follow_symlinks=follow)
        try:
            await self.io.meta(do)
        finally:
            node.forget_capability()

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self.control and inode == self.control.ino:
            return await self.control.getxattr(name, ctx)
        node = self._xattr_inode(inode)
        if name == CAPABILITY_XATTR:
            return await self._capability(node)
        path, follow = self._xattr_path(node)

        def do() -> bytes:
            self._same_inode(node, path, follow)
            return os.getxattr(path, name, follow_symlinks=follow)
        return await self.io.meta(do)

    async def _capability(self, node: Inode) -> bytes:
        """``security.capability``, asked before every write(2) to a file: from
        memory after the first time (no thread hop, no path lookup).

        A change through the mount forgets the value (``forget_capability``);
        a read that such a change overtook is answered but not kept. A change
        made directly in BACKING is not seen until the kernel forgets the inode.
        """
        value = node.capability
        if value is UNKNOWN:
            gen = node.capability_gen
            path, follow = self._xattr_path(node)

            def do() -> bytes | None:
                self._same_inode(node, path, follow)
                try:
                    return os.getxattr(path, CAPABILITY_XATTR, follow_symlinks=follow)
                except OSError as exc:
                    if exc.errno == errno.ENODATA:
                        return None
                    raise
            value = await self.io.meta(do)
            if node.capability_gen == gen:
                node.capability = value
        if value is None:
            raise FUSEError(errno.ENODATA)
        assert isinstance(value, bytes)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if self.control and inode == self.control.ino:
            return self.control.listxattr()
        node = self._xattr_inode(inode)
        path, follow = self._xattr_path(node)

        def do() -> list[str]:
            self._same_inode(node, path, follow)
            return os.listxattr(path, follow_symlinks=follow)
        return [os.fsencode(n) for n in await self.io.meta(do)]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.control and inode == self.control.ino:
            raise FUSEError(errno.EPERM)
        node = self._xattr_inode(inode)
        path, follow = self._xattr_path(node)

        def do() -> None:
            self._same_inode(node, path, follow)
            os.removexattr(path, name, follow_symlinks=follow)
        try:
            await self.io.meta(do)
        finally:
            node.forget_capability()

    # -- shutdown --------------------------------------------------------------

    def close_all(self) -> None:
        """Close every descriptor (after the main loop ended)."""
        for handle in self._handles.values():
            self._drop_handle(handle)
        self._handles.clear()
        for d in self._dirs.values():
            os.close(d.fd)
        self._dirs.clear()


def _fstat_all(fds: list[int]) -> list[os.stat_result]:
    """Worker thread: fstat of each descriptor."""
    return [os.fstat(fd) for fd in fds]
