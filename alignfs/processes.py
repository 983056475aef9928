"""Other processes, as /proc shows them, and children that run this package.

A detached daemon is not the child of the command that waits for it (``alignfs
umount``, the bench, the tests), so whether it still runs is read from /proc,
and a zombie counts as gone. ``python -m alignfs`` run as a child must import
the very package its parent runs, even from a source tree that is not
installed: :func:`source_env` puts it first on PYTHONPATH.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

#: The directory holding the ``alignfs`` package (a checkout, or site-packages).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def pid_alive(pid: int) -> bool:
    """True while process *pid* exists and is not a zombie (another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; its /proc entry may still be readable
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # The command name in parentheses may itself contain ") ".
    return stat[stat.rindex(")") + 2] != "Z"


def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, arguments) of every process whose command line can be read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        yield int(entry.name), args


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...), in bytes.

    Raises OSError if the process is gone and KeyError if it has no such
    field (a zombie has no memory fields).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def source_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """*environ* (default: this process') with this package's directory first on
    PYTHONPATH, once, so a child ``python -m alignfs`` runs this same code."""
    env = dict(os.environ if environ is None else environ)
    paths = [str(PACKAGE_PARENT), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env
