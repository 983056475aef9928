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

The rest: the status channel for a mount by a user who cannot write
/run/alignfs, a status that cannot be left at all ("unknown", exit 10), and
``alignfs mount`` giving up on a daemon that never reports ready (exit 7).
Private mount namespaces keep their mounts off the host.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    Mount,
    alignfs_env,
    daemon_exit_status,
    errno_of,
    is_mounted,
    pid_gone,
    read_direct,
    run_alignfs,
    set_faults,
    wait_until,
)

from alignfs.processes import command_lines

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
    # The end names the file and where its data was (the kernel's writeback
    # cache sends the page that holds FAR, from its start).
    assert "lost.img" in end_log and f"offset {FAR - FAR % 4096}" in end_log, end_log
    assert (m.backing / "kept").read_bytes() == b"k" * 5000


def _daemons_of(path: Path) -> list[int]:
    """Live alignfs processes whose command line mentions *path*."""
    found = []
    for pid, args in command_lines():
        cmd = b"\0".join(args)
        if b"alignfs" in cmd and str(path).encode() in cmd and not pid_gone(pid):
            found.append(pid)
    return found


# -- the status channel ------------------------------------------------------------------


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory under /tmp that nobody can reach (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="alignfs-exit-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for pid in _daemons_of(d):  # left in a namespace by a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def _in_namespace(script: str, *args: str, timeout: float = 120) \
        -> subprocess.CompletedProcess[str]:
    """*script* (sh) in a private mount namespace: its mounts die with it."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, "sh", *args], capture_output=True, text=True,
                          env=alignfs_env(), timeout=timeout, cwd="/")


AS_NOBODY = (f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups "
             f"env -u XDG_RUNTIME_DIR PYTHONPATH={ROOT} {sys.executable}")


def test_umount_of_a_non_root_mount_learns_exit_6(world_dir: Path) -> None:
    """A mount by a user who cannot write /run/alignfs: the daemon's late exit
    6 (data dropped) must reach ``alignfs umount`` (it read as 0: the status
    was not written and a missing status counted as success).

    The user is nobody, in a private mount namespace where /dev/fuse is
    usable by everyone (it is 0600 on the host).
    """
    mp, back, logs = world_dir / "mnt", world_dir / "back", world_dir / "logs"
    for d in (mp, back, logs):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    faults = world_dir / "faults.json"
    faults.write_text(json.dumps({"write": "EFBIG", "match": "lost"}))
    faults.chmod(0o644)
    log = logs / "log"
    writer = (f"import os; fd = os.open('{mp}/lost.img', os.O_WRONLY | os.O_CREAT, 0o644); "
              f"os.pwrite(fd, b'L' * 3000, {FAR}); os.close(fd)")
    script = f"""
        set -e
        mknod {world_dir}/fuse c 10 229 && chmod 666 {world_dir}/fuse
        mount --bind {world_dir}/fuse /dev/fuse
        trap 'umount -l {mp} 2>/dev/null || true' EXIT
        {AS_NOBODY} -m alignfs mount {mp} {back} --log {log} --fault-file {faults} \
            --flush-delay 300
        {AS_NOBODY} -c "{writer}"
        i=0
        until grep -q 'can never be written' {log}; do
            i=$((i + 1)); [ $i -lt 500 ] || exit 99; sleep 0.02
        done
        rc=0; {AS_NOBODY} -m alignfs umount {mp} || rc=$?
        echo "umount-exit=$rc"
    """
    private = Path(f"/tmp/alignfs-{NOBODY}")  # where nobody's daemon leaves its status
    made = not private.exists()
    try:
        res = _in_namespace(script)
    finally:
        if made:
            shutil.rmtree(private, ignore_errors=True)
    assert "umount-exit=" in res.stdout, (res.returncode, res.stdout, res.stderr)
    assert "umount-exit=6" in res.stdout, (res.stdout, res.stderr, log.read_text())
    assert "unmounted" in log.read_text()


def test_umount_with_no_exit_status_says_unknown(world_dir: Path) -> None:
    """The daemon cannot leave its exit status (here: its status directory
    became read-only): ``alignfs umount`` must say the outcome is unknown and
    exit 10, not 0 as if everything had been written."""
    mp, back = world_dir / "mnt", world_dir / "back"
    mp.mkdir()
    back.mkdir()
    alignfs = f"{sys.executable} -m alignfs"
    status_dir = ("import json, os, sys; s = json.load(sys.stdin); "
                  "print(os.path.dirname(s.get('status_file', '/run/alignfs/x')))")
    script = f"""
        set -e
        {alignfs} mount {mp} {back} --log {world_dir}/log
        trap 'umount -l {mp} 2>/dev/null || true' EXIT
        dir=$({alignfs} stats {mp} --json | {sys.executable} -c "{status_dir}")
        mkdir -p "$dir"
        mount -t tmpfs -o ro none "$dir"
        rc=0; {alignfs} umount {mp} || rc=$?
        echo "umount-exit=$rc"
    """
    res = _in_namespace(script)
    assert "umount-exit=10" in res.stdout, (res.stdout, res.stderr)
    assert "unknown" in res.stderr, res.stderr


def test_mount_gives_up_on_a_daemon_that_never_gets_ready(tmp_path: Path) -> None:
    """``alignfs mount`` waits for the daemon's readiness report for at most
    --start-timeout seconds: then it stops the daemon, leaves no mount, and
    exits 7 with one clear line (it used to wait forever)."""
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    faults = tmp_path / "faults.json"
    set_faults(faults, {"ready": "EIO"})  # test hook: the daemon never reports ready
    try:
        res = run_alignfs("mount", str(mp), str(back), "--log", str(tmp_path / "log"),
                          "--fault-file", str(faults), "--start-timeout", "2", timeout=60)
        assert res.returncode == 7, (res.returncode, res.stderr)
        assert "ready within 2" in res.stderr, res.stderr
        assert wait_until(lambda: not is_mounted(mp), 10)
        assert not _daemons_of(mp), "the daemon was left running"
        assert "stopping (SIGTERM)" in (tmp_path / "log").read_text()  # a clean stop
    finally:
        if is_mounted(mp):
            subprocess.run(["umount", "-i", "-l", str(mp)], capture_output=True)
