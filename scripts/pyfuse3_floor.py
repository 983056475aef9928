"""The cheapest pyfuse3 + trio file system that can hold a VM image.

A developer's measuring stick, not part of alignfs: one flat directory whose
files live in memory, with the fewest handlers a client like QEMU or qemu-img
needs. Each file is a fixed-size anonymous map (``--file-capacity``, huge
pages, touched when the file is created), so that serving a request faults
no memory in, as alignfs's reused buffers do not. Every request costs what pyfuse3 and trio charge
for it, plus one copy of a WRITE's data into memory -- the least any file
system that collects writes must do. Run a client through it and through
alignfs on the same machine, and the daemon's CPU per request of each shows
what alignfs adds to the floor under it.

    python3 scripts/pyfuse3_floor.py MOUNTPOINT [--alignfs-loop] [--file-capacity GIB]

It serves until SIGINT/SIGTERM or ``fusermount3 -u MOUNTPOINT``, then prints
its requests and CPU seconds (process and serving thread) on stderr. Opens
with O_DIRECT get ``direct_io``, as alignfs gives them, so a ``cache=none``
client sends the same requests to both. ``--alignfs-loop`` gives pyfuse3
alignfs's read lock (alignfs/fuse_loop.py) instead of ``trio.Lock``.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE


class MemoryFile:
    """A file's bytes: a map of *capacity* bytes, the first *size* of them valid."""

    def __init__(self, capacity: int) -> None:
        self.mem = mmap.mmap(-1, capacity)
        self.mem.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self.mem)
        for pos in range(0, capacity, mmap.PAGESIZE):  # fault it all in now
            self.mem[pos] = 0
        self.size = 0

    def resize(self, size: int) -> None:
        if size > len(self.mem):
            raise pyfuse3.FUSEError(errno.EFBIG)
        if size < self.size:
            self.view[size:self.size] = bytes(self.size - size)
        self.size = size


class FloorFS(pyfuse3.Operations):
    """Files in memory, one directory, no permissions beyond the kernel's."""

    enable_writeback_cache = True

    def __init__(self, file_capacity: int) -> None:
        super().__init__()
        self.file_capacity = file_capacity
        self.names: dict[bytes, int] = {}
        self.data: dict[int, MemoryFile] = {}
        self.modes: dict[int, int] = {}
        self.next_ino = ROOT + 1
        self.requests = 0

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        now = time.time_ns()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = self.modes[ino]
            a.st_nlink = 1
            a.st_size = self.data[ino].size
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = 1.0
        return a

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        self.requests += 1
        if inode != ROOT and inode not in self.data:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        self.requests += 1
        ino = self.names.get(name)
        if parent_inode != ROOT or ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        self.requests += 1
        if fields.update_size:
            self.data[inode].resize(attr.st_size)
        if fields.update_mode:
            self.modes[inode] = stat.S_IFREG | stat.S_IMODE(attr.st_mode)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx) -> int:
        self.requests += 1
        return inode

    async def readdir(self, fh: int, start_id: int, token) -> None:
        self.requests += 1
        entries = sorted(self.names.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def create(self, parent_inode, name, mode, flags, ctx):
        self.requests += 1
        ino = self.next_ino
        self.next_ino += 1
        self.names[name] = ino
        self.data[ino] = MemoryFile(self.file_capacity)
        self.modes[ino] = stat.S_IFREG | stat.S_IMODE(mode)
        return self._info(ino, flags), self._attr(ino)

    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        self.requests += 1
        if flags & os.O_TRUNC:
            self.data[inode].resize(0)
        return self._info(inode, flags)

    @staticmethod
    def _info(ino: int, flags: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=ino, direct_io=bool(flags & os.O_DIRECT), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests += 1
        f = self.data[fh]
        return bytes(f.view[off:min(off + size, f.size)]) if off < f.size else b""

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.requests += 1
        f = self.data[fh]
        end = off + len(buf)
        if end > len(f.mem):
            raise pyfuse3.FUSEError(errno.EFBIG)
        f.view[off:end] = buf
        if end > f.size:
            f.size = end
        return len(buf)

    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        self.requests += 1
        ino = self.names.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # Its memory stays: open handles may still use it (fh is the inode).

    async def flush(self, fh: int) -> None:
        self.requests += 1

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.requests += 1

    async def release(self, fh: int) -> None:
        self.requests += 1

    async def releasedir(self, fh: int) -> None:
        self.requests += 1

    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        self.requests += 1
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 24
        s.f_files = s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        # ENOSYS once, and the kernel stops asking before every write(2).
        raise pyfuse3.FUSEError(errno.ENOSYS)


def _thread_cpu(tid: int) -> float:
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--alignfs-loop", action="store_true",
                        help="give pyfuse3 alignfs's read lock (alignfs/fuse_loop.py)")
    parser.add_argument("--file-capacity", type=float, default=2.0, metavar="GIB",
                        help="most bytes a file may hold, in GiB (default 2)")
    args = parser.parse_args()
    fs = FloorFS(int(args.file_capacity * (1 << 30)))
    pyfuse3.init(fs, args.mountpoint, ["fsname=floor", "subtype=floor", "default_permissions"])

    async def serve() -> None:
        if args.alignfs_loop:
            from alignfs import fuse_loop
            fuse_loop.install()
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            await pyfuse3.main(min_tasks=1, max_tasks=64)
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    cpu = time.process_time()
    serving = _thread_cpu(os.getpid())
    print(f"requests {fs.requests}  cpu {cpu:.2f} s  serving thread {serving:.2f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
