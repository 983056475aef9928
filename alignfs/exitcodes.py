"""Exit codes of the ``alignfs`` command, one per failure class.

They are part of the user interface: scripts, mount(8) and systemd act on them,
so they are documented in ``alignfs --help`` and the README and never reused.
"""

from __future__ import annotations

import enum
import textwrap


class ExitCode(enum.IntEnum):
    OK = 0
    #: An unexpected internal error (a bug): see the log.
    INTERNAL = 1
    #: Bad command line: unknown option, missing argument, invalid size.
    USAGE = 2
    #: BACKING is missing, not a directory, or not accessible.
    BAD_BACKING = 3
    #: MOUNTPOINT is missing, not a directory, inside BACKING, or already mounted.
    BAD_MOUNTPOINT = 4
    #: FUSE is unavailable (/dev/fuse missing) or the kernel refused the mount.
    FUSE_UNAVAILABLE = 5
    #: Buffered data could not be written to BACKING (I/O error, disk full), or
    #: writes were dropped earlier in the mount (an error no retry can fix).
    UNWRITTEN_DATA = 6
    #: ``umount --timeout`` expired before the daemon exited, or ``mount
    #: --start-timeout`` before the daemon was serving (it was stopped).
    TIMEOUT = 7
    #: MOUNTPOINT is not an alignfs mount (for umount/stats/flush).
    NOT_ALIGNFS = 8
    #: The control channel refused the caller (not root, not the mounting user).
    PERMISSION = 9
    #: ``alignfs umount``: the daemon exited without leaving its exit status, so
    #: whether all data reached BACKING is unknown (never reported as 0).
    UNKNOWN = 10
    #: ``alignfs bench``: a benchmark run failed (the others ran; see the report).
    BENCH_RUN_FAILED = 11


def describe() -> str:
    """One line per exit code, for ``--help`` and the README."""
    text = {
        ExitCode.OK: "success",
        ExitCode.INTERNAL: "internal error (a bug; see the log)",
        ExitCode.USAGE: "bad command line (unknown option, invalid size, ...)",
        ExitCode.BAD_BACKING: "BACKING missing, not a directory or not accessible",
        ExitCode.BAD_MOUNTPOINT: "MOUNTPOINT missing, not a directory, inside BACKING "
        "or already mounted",
        ExitCode.FUSE_UNAVAILABLE: "FUSE unavailable (/dev/fuse) or the mount was refused",
        ExitCode.UNWRITTEN_DATA: "data is not on BACKING: buffered data could not be "
        "written, or writes were dropped earlier in the mount (permanent errors)",
        ExitCode.TIMEOUT: "umount --timeout expired, or mount --start-timeout (the "
        "daemon was not serving in time; it was stopped)",
        ExitCode.NOT_ALIGNFS: "MOUNTPOINT is not an alignfs mount",
        ExitCode.PERMISSION: "control channel refused (not root or the mounting user)",
        ExitCode.UNKNOWN: "umount: the daemon left no exit status; whether all data "
        "reached BACKING is unknown (see its log)",
        ExitCode.BENCH_RUN_FAILED: "bench: a run failed (see the notes column and the logs)",
    }
    return "\n".join(textwrap.fill(text[code], 78, initial_indent=f"  {int(code):2d}  ",
                                   subsequent_indent=" " * 6) for code in ExitCode)
