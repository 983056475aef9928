"""Linux system calls that Python's ``os`` module does not offer.

``renameat2`` (RENAME_NOREPLACE/RENAME_EXCHANGE), ``fchownat`` with
AT_EMPTY_PATH (to chown what an O_PATH descriptor refers to, symlinks
included), ``utimensat`` with UTIME_OMIT, and ``statx`` for the direct-I/O
alignment (STATX_DIOALIGN). All raise OSError like the ``os`` functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_OMIT = (1 << 30) - 2
STATX_DIOALIGN = 0x2000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int, what: str, path: bytes | str | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, oldname, newdirfd, newname, flags), "renameat2", oldname)


_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]


def fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH (or any) descriptor refers to, without following it."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]


def utimens(dirfd: int, path: bytes, atime_ns: int | None, mtime_ns: int | None,
            flags: int = 0) -> None:
    """Set atime/mtime; None leaves that time unchanged (UTIME_OMIT)."""
    times = (_Timespec * 2)()
    for i, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            times[i].tv_sec, times[i].tv_nsec = 0, UTIME_OMIT
        else:
            times[i].tv_sec, times[i].tv_nsec = divmod(value, 1_000_000_000)
    _check(_libc.utimensat(dirfd, path, times, flags), "utimensat", path)


_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.c_void_p]


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory alignment, offset alignment) for O_DIRECT on *fd*, or None.

    None means the kernel or filesystem does not report STATX_DIOALIGN, or
    reports that O_DIRECT is unsupported (both alignments 0).
    """
    buf = ctypes.create_string_buffer(256)
    ret = _libc.statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf)
    if ret != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf, 0)
    if not mask & STATX_DIOALIGN:
        return None
    mem_align, offset_align = struct.unpack_from("=II", buf, 152)
    if not mem_align or not offset_align:
        return None
    return mem_align, offset_align


_libc.syncfs.argtypes = [ctypes.c_int]


def syncfs(fd: int) -> None:
    """Flush everything of the filesystem holding *fd* (data and metadata) to disk."""
    _check(_libc.syncfs(fd), "syncfs")


_libc.futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]


def set_mtime(fd: int, mtime_ns: int) -> None:
    """Set the mtime of the file open as *fd*, leaving atime alone."""
    times = (_Timespec * 2)()
    times[0].tv_sec, times[0].tv_nsec = 0, UTIME_OMIT
    times[1].tv_sec, times[1].tv_nsec = divmod(mtime_ns, 1_000_000_000)
    _check(_libc.futimens(fd, times), "futimens")
