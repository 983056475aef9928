"""Every way a mount ends says whether all data reached BACKING.

Each end of a mount -- ``alignfs umount``, umount(8) without the helper
(``umount -i``; with the helper it *is* ``alignfs umount``), ``fusermount3
-u``, ``umount -l``, SIGTERM, SIGINT, SIGHUP then SIGTERM -- meets a
persistent write fault injected with ``--fault-file``:

* EFBIG, a permanent error: the write-out after the file's last close drops
  the data (before the end, so the loss was already "reported" once);
* EIO: the data stays buffered, every retry fails.

The daemon's exit status (its status file, or ``alignfs umount``'s own exit)
must be 6, its log must name the file and the offset at the end, and the data
must be on BACKING (EIO under ``alignfs umount``: the mount stays, the fault
is cleared, the retry writes it) or reported lost. systemd stop is covered by
``scripts/systemd-check.sh`` (tests/test_service.py).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Mount,
    daemon_exit_status,
    errno_of,
    is_mounted,
    pid_gone,
    read_direct,
    set_faults,
    wait_until,
)

NOBODY = 65534
FAR = (1 << 30) + 123  # EFBIG lowers the mount's offset limit to this window
LOST = b"L" * 3000

WAYS = ["alignfs umount", "umount -i", "fusermount3 -u", "umount -l", "SIGTERM", "SIGINT",
        "SIGHUP then SIGTERM"]


def _end(m: Mount, pid: int, way: str) -> subprocess.CompletedProcess[str] | None:
    """End the mount *way*; returns ``alignfs umount``'s result for that way."""
    mp = str(m.mountpoint)
    if way == "alignfs umount":
        return m.umount()
    if way in ("umount -i", "fusermount3 -u", "umount -l"):
        res = subprocess.run([*way.split(), mp], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    elif way == "SIGHUP then SIGTERM":
        os.kill(pid, signal.SIGHUP)
        # SIGHUP writes back without unmounting; its failures are logged.
        assert wait_until(lambda: any("SIGHUP" in line and "lost.img" in line
                                      for line in m.log.read_text().splitlines()), 10), \
            m.log.read_text()
        os.kill(pid, signal.SIGTERM)
    else:
        os.kill(pid, getattr(signal, way))
    return None


@pytest.mark.parametrize("fault", ["EFBIG", "EIO"])
@pytest.mark.parametrize("way", WAYS)
def test_every_way_a_mount_ends_reports_unwritten_data(
        mount_alignfs: Callable[..., Mount], tmp_path: Path, way: str, fault: str) -> None:
    faults = tmp_path / "faults.json"
    m = mount_alignfs("--fault-file", str(faults), "--flush-delay", "300",
                      "--buffer-size", "1M")
    pid = m.pid
    set_faults(faults, {"write": fault, "match": "lost"})
    (m.mountpoint / "kept").write_bytes(b"k" * 5000)
    fd = os.open(m.mountpoint / "lost.img", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, LOST, FAR)
    os.close(fd)  # the last close starts the write-out, which fails
    assert wait_until(lambda: "lost.img" in m.log.read_text(), 30), m.log.read_text()
    if fault == "EFBIG":
        # The loss is told to the next fsync of the file, even reopened.
        fd = os.open(m.mountpoint / "lost.img", os.O_RDWR)
        try:
            assert errno_of(lambda: os.fsync(fd)) == errno.EFBIG
        finally:
            os.close(fd)
    logged = len(m.log.read_text())

    res = _end(m, pid, way)

    if res is not None and fault == "EIO":
        # Still buffered: the mount stays so nothing is lost; once BACKING
        # works again the retry writes everything.
        assert res.returncode == 6, (res.returncode, res.stderr)
        assert "stays mounted" in res.stderr and is_mounted(m.mountpoint)
        set_faults(faults, None)
        res = m.umount()
        assert res.returncode == 0, res.stderr
        assert read_direct(m.backing / "lost.img")[FAR:] == LOST
        end_log = m.log.read_text()[logged:]
    else:
        if res is not None:
            assert res.returncode == 6, (res.returncode, res.stderr)
            assert "exit 6" in res.stderr, res.stderr
        else:
            assert wait_until(lambda: pid_gone(pid), 60), "daemon did not exit"
            assert daemon_exit_status(pid) == 6
        assert wait_until(lambda: not is_mounted(m.mountpoint), 10)
        end_log = m.log.read_text()[logged:]
        assert "some data could NOT be written" in end_log, end_log
        assert os.stat(m.backing / "lost.img").st_size <= FAR  # not there: reported lost
    # The end names the file and where its data was.
    assert "lost.img" in end_log and f"offset {FAR}" in end_log, end_log
    assert (m.backing / "kept").read_bytes() == b"k" * 5000


def _daemons_of(path: Path) -> list[int]:
    """Live alignfs processes whose command line mentions *path*."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"alignfs" in cmd and str(path).encode() in cmd and not pid_gone(int(p.name)):
            found.append(int(p.name))
    return found
