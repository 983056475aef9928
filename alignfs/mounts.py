"""What the kernel says about mount points (from /proc/self/mountinfo).

Used to refuse a second mount on the same place, to recognise an alignfs
mount before talking to it, and to detect a stale mount left by a daemon that
died (every access fails with ENOTCONN).
"""

from __future__ import annotations

import errno
import os
import re


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_entries() -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, source) for every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return out


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True if *path* (symlinks resolved) is a mount point."""
    target = os.path.realpath(path)
    return any(mountpoint == target for mountpoint, _, _ in mount_entries())


def fuse_mount_type(path: str) -> str | None:
    """Filesystem type of the topmost mount exactly at *path*, or None."""
    found = None
    for mountpoint, fstype, _ in mount_entries():
        if mountpoint == path:
            found = fstype
    return found


def is_stale(path: str) -> bool:
    """True if *path* is a FUSE mount whose daemon is gone."""
    # statvfs, not stat: the kernel answers stat of the mount root from its
    # attribute cache for a while after the daemon died.
    try:
        os.statvfs(path)
    except OSError as exc:
        # ECONNABORTED: the request was queued as the connection was torn down.
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False
