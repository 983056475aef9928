"""The command side of the control file: requests to a running daemon.

``alignfs stats``, ``flush`` and ``umount`` (and the bench's sampler) read
and write extended attributes of ``MOUNTPOINT/.alignfs-control`` (see
:mod:`alignfs.control` for the daemon's side). Before asking, a command makes
sure MOUNTPOINT is a live alignfs mount; a refused request becomes the exit
code of its failure class.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from .control_protocol import CONTROL_NAME, FILE_COMMANDS, XATTR_STATS
from .exitcodes import ExitCode
from .mounts import fuse_mount_type, is_stale


def query_stats(mountpoint: str) -> dict[str, Any]:
    """The daemon's counters (raises OSError if not an alignfs mount)."""
    path = os.path.join(mountpoint, CONTROL_NAME.decode())
    try:
        raw = os.getxattr(path, XATTR_STATS)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        with open(path, "rb") as f:  # --xattr off
            raw = f.read()
    return json.loads(raw)


def request(mountpoint: str, what: bytes) -> None:
    """Send a command (XATTR_FLUSH or XATTR_UMOUNT); blocks until done."""
    path = os.path.join(mountpoint, CONTROL_NAME.decode())
    try:
        os.setxattr(path, what, b"1")
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        fd = os.open(path, os.O_WRONLY)  # --xattr off
        try:
            os.write(fd, FILE_COMMANDS[what])
        finally:
            os.close(fd)


def control_error(mountpoint: Path, exc: OSError, writes_back: bool = False) -> int:
    """Exit code (and message) for a failed control request.

    A request that *writes_back* (flush, umount) fails with the errno of the
    data it could not write, whatever that is (EIO, ENOSPC, EFBIG, ...).
    """
    if exc.errno in (errno.EACCES, errno.EPERM):
        print(f"alignfs: permission denied: only root or the user who mounted "
              f"{mountpoint} may control it", file=sys.stderr)
        return ExitCode.PERMISSION
    if exc.errno in (errno.ENOENT, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTDIR):
        print(f"alignfs: {mountpoint} is not an alignfs mount", file=sys.stderr)
        return ExitCode.NOT_ALIGNFS
    print(f"alignfs: {mountpoint}: {exc.strerror}", file=sys.stderr)
    if writes_back or exc.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
        return ExitCode.UNWRITTEN_DATA
    return ExitCode.INTERNAL


def is_alignfs(mountpoint: Path) -> bool:
    return fuse_mount_type(os.path.realpath(mountpoint)) == "fuse.alignfs"


def refuse_stale(mountpoint: Path) -> int | None:
    if is_stale(str(mountpoint)):
        print(f"alignfs: {mountpoint} is a stale mount (its daemon died); remove it with "
              f"'alignfs umount {mountpoint}'", file=sys.stderr)
        return ExitCode.BAD_MOUNTPOINT
    return None


def live_mount(mountpoint: str) -> tuple[Path, int | None]:
    """The absolute mount point, and an exit code if it is not a live alignfs mount."""
    mp = Path(os.path.abspath(mountpoint))
    refused = refuse_stale(mp)
    if refused is None and not is_alignfs(mp):
        print(f"alignfs: {mp} is not an alignfs mount", file=sys.stderr)
        refused = ExitCode.NOT_ALIGNFS
    return mp, refused
