"""Small system helpers shared by the benchmark modules.

Running commands with logging, dropping the page cache, reading a process'
CPU time and finding the block device under a path. Sizes and mount points
come from alignfs.sizes and alignfs.mounts, as for the daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

class CommandError(RuntimeError):
    """A command exited non-zero; carries its output for the report."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        tail = output.strip()[-2000:]
        super().__init__(f"{argv[0]} exited with {returncode}: {tail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run *argv*, capturing stdout and stderr (merged); raise CommandError if *check*."""
    log.debug("run: %s", " ".join(argv))
    proc = subprocess.run(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout)
    return proc


def which(name: str) -> str | None:
    """Absolute path of the executable *name*, or None."""
    return shutil.which(name)


def fill_random(path: Path, size: int, chunk: int = 16 << 20) -> None:
    """Create *path* with *size* fresh random bytes (overwriting it)."""
    _fill(path, size, os.urandom, chunk)


def fill_zeros(path: Path, size: int, chunk: int = 16 << 20) -> None:
    """Write *size* zero bytes over *path* (allocated, unlike a sparse file)."""
    _fill(path, size, bytes, chunk)


def _fill(path: Path, size: int, data: Callable[[int], bytes], chunk: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(data(n))
            left -= n


def write_text(path: Path | str, text: str) -> None:
    """Write to a sysfs/procfs/cgroupfs file in one ``write()`` call."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def drop_caches() -> None:
    """``sync`` then ``echo 3 > /proc/sys/vm/drop_caches`` (tmpfs is not affected)."""
    os.sync()
    try:
        write_text("/proc/sys/vm/drop_caches", "3")
    except OSError as exc:
        log.warning("cannot drop caches: %s", exc)


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of process *pid* in seconds, or None if it is gone."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int, tid: int) -> float | None:
    """utime + stime of thread *tid* of process *pid*, or None if it is gone."""
    return _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")


def _stat_cpu_seconds(path: str) -> float | None:
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_pressure_total() -> float | None:
    """Seconds tasks have waited for a CPU since boot (PSI "some"), or None without PSI.

    Unlike the load average, this does not count tasks blocked on I/O, so the
    throttled disk of the HDD model does not make the machine look busy.
    """
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


def whole_disk_of(dev: int) -> tuple[int, int]:
    """(major, minor) of the whole disk holding device number *dev*.

    blk-throttle rules are set per disk, so a partition is mapped to its parent.
    """
    major, minor = os.major(dev), os.minor(dev)
    sys_dir = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dir.exists():
        raise ValueError(f"device {major}:{minor} is not a block device (tmpfs, overlay, ...?)")
    if (sys_dir / "partition").exists():
        parent = sys_dir.resolve().parent
        major, minor = (int(x) for x in (parent / "dev").read_text().split(":"))
    return major, minor


def block_queue_attr(major: int, minor: int, name: str) -> str | None:
    """A ``queue/`` attribute of a disk, e.g. ``logical_block_size``."""
    try:
        return Path(f"/sys/dev/block/{major}:{minor}/queue/{name}").read_text().strip()
    except OSError:
        return None
