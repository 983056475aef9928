"""The control file: how ``alignfs stats/flush/umount`` talk to a running daemon.

A hidden regular file ``MOUNTPOINT/.alignfs-control`` (found by lookup, never
listed) whose extended attributes are commands, as s3ql and mergerfs do it:
reading ``user.alignfs.stats`` returns the counters as JSON, writing
``user.alignfs.flush`` writes out and fsyncs everything, writing
``user.alignfs.umount`` does that and then ends the daemon. The file is mode
0600 and owned by the mounting user, and the handler checks the caller too:
only root and the mounting user may use it.

With ``--xattr off`` the kernel gets ENOSYS for xattrs and stops sending any,
the control file's too, so the same commands also work as plain file I/O:
reading the file gives the stats JSON, writing ``flush`` or ``umount`` to it
runs that command (the write returns when it is done). The client side tries
the xattr first and falls back to the file.

This module is the daemon's side; the commands' side is
:mod:`alignfs.control_client`; the names both use are in
:mod:`alignfs.control_protocol`.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from .control_protocol import (
    CONTROL_NAME,
    FILE_FLUSH,
    FILE_UMOUNT,
    XATTR_FLUSH,
    XATTR_STATS,
    XATTR_UMOUNT,
)
from .inodes import SYNTHETIC_BASE

log = logging.getLogger(__name__)

CONTROL_INO = SYNTHETIC_BASE


class ControlFile:
    name = CONTROL_NAME
    ino = CONTROL_INO

    def __init__(self, owner_uid: int, owner_gid: int,
                 get_stats: Callable[[], dict[str, Any]],
                 flush: Callable[[], Awaitable[None]],
                 umount: Callable[[], Awaitable[None]]) -> None:
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid
        self._get_stats = get_stats
        self._flush = flush
        self._umount = umount
        self._born_ns = time.time_ns()

    def attrs(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self.ino
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        entry.st_mode = 0o100600
        entry.st_nlink = 1
        entry.st_uid = self.owner_uid
        entry.st_gid = self.owner_gid
        entry.st_blksize = 4096
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._born_ns
        return entry

    def _check(self, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid not in (0, self.owner_uid):
            log.warning("control request from uid %d refused", ctx.uid)
            raise FUSEError(errno.EACCES)

    async def getxattr(self, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._check(ctx)
        if name == XATTR_STATS:
            return json.dumps(self._get_stats(), sort_keys=True).encode()
        raise FUSEError(errno.ENODATA)

    async def setxattr(self, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check(ctx)
        if name == XATTR_FLUSH:
            await self._flush()
        elif name == XATTR_UMOUNT:
            await self._umount()
        else:
            raise FUSEError(errno.EINVAL)

    def listxattr(self) -> list[bytes]:
        return [XATTR_STATS]

    def open(self, ctx: pyfuse3.RequestContext) -> bytes:
        """An open of the file: what reading it gives (the stats now)."""
        self._check(ctx)
        return json.dumps(self._get_stats(), sort_keys=True).encode()

    async def command(self, data: bytes) -> None:
        """A write to the file: ``flush`` or ``umount``."""
        what = data.strip()
        if what == FILE_FLUSH:
            await self._flush()
        elif what == FILE_UMOUNT:
            await self._umount()
        else:
            raise FUSEError(errno.EINVAL)

