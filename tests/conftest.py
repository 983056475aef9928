"""Shared fixtures: real alignfs mounts in a subprocess, always cleaned up.

``mount_alignfs(**options)`` mounts a fresh BACKING at a fresh MOUNTPOINT with
the ``alignfs mount`` command (the daemon is a detached child, as for a
user), waits until it answers, and on teardown unmounts with ``alignfs
umount`` -- falling back to a lazy unmount and SIGKILL so a failed test never
leaves a mount behind. The daemon's log is attached to failing tests.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from alignfs.backing_io import BackingIO
from alignfs.bench.hddmodel import BLKIO_ROOT, ZRAM_CONTROL
from alignfs.launch import STATUS_DIR, take_status
from alignfs.mounts import is_mountpoint as is_mounted
from alignfs.processes import command_lines, pid_alive
from alignfs.processes import source_env as alignfs_env

ROOT = Path(__file__).resolve().parent.parent
ALIGNFS = [sys.executable, "-m", "alignfs"]


def run_alignfs(*args: str, check: bool = False, timeout: float = 120,
                **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ALIGNFS, *args], env=alignfs_env(), capture_output=True,
                          text=True, check=check, timeout=timeout, **kwargs)  # type: ignore


@dataclass
class Mount:
    mountpoint: Path
    backing: Path
    log: Path
    options: list[str] = field(default_factory=list)

    def stats(self) -> dict:
        res = run_alignfs("stats", str(self.mountpoint), "--json", check=True)
        return json.loads(res.stdout)

    @property
    def pid(self) -> int:
        return int(self.stats()["pid"])

    def umount(self) -> subprocess.CompletedProcess[str]:
        return run_alignfs("umount", str(self.mountpoint))

    def remount(self) -> None:
        res = run_alignfs("mount", str(self.mountpoint), str(self.backing),
                          "--log", str(self.log), *self.options)
        assert res.returncode == 0, res.stderr


def _force_cleanup(mountpoint: Path) -> None:
    pid = None
    for p, cmd in command_lines():
        if b"alignfs" in b" ".join(cmd) and str(mountpoint).encode() in cmd:
            pid = p
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def mount_alignfs(tmp_path: Path, request: pytest.FixtureRequest) \
        -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []

    def make(*options: str, backing: Path | None = None, name: str = "m") -> Mount:
        mp = tmp_path / f"{name}-mnt"
        back = backing or tmp_path / f"{name}-backing"
        mp.mkdir(exist_ok=True)
        back.mkdir(exist_ok=True)
        m = Mount(mp, back, tmp_path / f"{name}.log", list(options))
        res = run_alignfs("mount", str(mp), str(back), "--log", str(m.log), *options)
        assert res.returncode == 0, f"mount failed ({res.returncode}): {res.stderr}"
        assert is_mounted(mp)
        mounts.append(m)
        return m

    yield make

    failed = []
    for m in mounts:
        if is_mounted(m.mountpoint):
            try:
                res = m.umount()
                if res.returncode != 0:
                    failed.append(f"{m.mountpoint}: umount exit {res.returncode}: {res.stderr}")
            except subprocess.TimeoutExpired:
                failed.append(f"{m.mountpoint}: umount timed out")
            if is_mounted(m.mountpoint):
                _force_cleanup(m.mountpoint)
        if m.log.exists():
            text = m.log.read_text(errors="replace")
            request.node.add_report_section("teardown", f"daemon log {m.mountpoint}",
                                            text[-20000:])
            if "Traceback" in text or "internal error" in text:
                failed.append(f"{m.mountpoint}: daemon logged an internal error:\n{text[-5000:]}")
    if failed:
        pytest.fail("\n".join(failed))


#: For tests that build the HDD model (bench.hddmodel) themselves.
needs_hdd_model = pytest.mark.skipif(
    os.geteuid() != 0
    or not (ZRAM_CONTROL / "hot_add").exists()
    or not (BLKIO_ROOT / "cgroup.procs").exists(),
    reason="needs root, zram and cgroup v1 blkio",
)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll *predicate* (for conditions in another process, which have no event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class InlineIO(BackingIO):
    """Backing syscalls run on the trio thread (no thread hops): exact virtual time.

    For in-process tests under ``autojump_clock``: with real worker threads the
    mock clock jumps whenever the trio thread idles while a worker runs.
    """

    async def meta(self, fn, *args):
        await trio.lowlevel.checkpoint()
        return fn(*args)

    async def data(self, fn, *args):
        await trio.lowlevel.checkpoint()
        return fn(*args)


# -- fault injection (--fault-file) ---------------------------------------------------

_fault_mtime = [2_000_000_000 * 10**9]


def set_faults(path: Path, rules: dict[str, str] | None) -> None:
    """Install (or clear) fault-injection *rules*, e.g. ``{"write": "EIO", "match": "x"}``.

    The file is replaced atomically and given an mtime never used before: the
    injector reloads on an mtime change, and two quick rewrites could
    otherwise share a coarse timestamp.
    """
    _fault_mtime[0] += 10**9
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rules) if rules else "")
    os.utime(tmp, ns=(_fault_mtime[0], _fault_mtime[0]))
    os.replace(tmp, path)


# -- the daemon process ---------------------------------------------------------------

def pid_gone(pid: int) -> bool:
    """The process has exited (gone, or a zombie nobody reaped yet)."""
    return not pid_alive(pid)


def daemon_exit_status(pid: int) -> int | None:
    """The exit code a daemon run by root left for ``alignfs umount`` (consumed here)."""
    return take_status(STATUS_DIR / f"{pid}.exit")


def errno_of(fn: Callable[[], object]) -> int | None:
    """The errno *fn* fails with, or None if it succeeds."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def read_direct(path: Path) -> bytes:
    """The backing file as the disk holds it (O_DIRECT: no page cache involved)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        mem = mmap.mmap(-1, max(4096, -(-size // 4096) * 4096))
        try:
            view = memoryview(mem)
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], done)
                if n == 0:
                    break
                done += n
            out = bytes(view[:size])
            view.release()
            return out
        finally:
            mem.close()
    finally:
        os.close(fd)
