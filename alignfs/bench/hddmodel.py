"""A throttled block device that behaves like a hard disk, for repeatable numbers.

The model is a fresh zram device with an ext4 file system, mounted on a
temporary directory, plus a cgroup v1 blkio group whose ``blkio.throttle.*``
rules cap that device at a disk-like number of IOPS and bytes per second
(default 200 IOPS and 150 MiB/s each way).  The benchmark process moves
itself into the group, so every process it starts afterwards -- fio,
qemu-img, qemu and the alignfs daemon -- is throttled too.

zram is used rather than the machine's disk because it never splits a bio:
one 4 MiB O_DIRECT write is one I/O for the throttle, as on a SATA disk.

zram's own CPU cost is charged to whoever writes (it compresses in the
writer's thread), and the first write to a block never written before costs
several times a rewrite (zram allocates then; measured here about 2.9 CPU s
per GiB first, 0.6 s rewritten).  A disk has no such cost, and which one a
benchmark pays depends on where ext4 happens to place a file, so daemon-CPU
figures swung by 2 s/GiB between identical runs.  The device is therefore
filled once with incompressible data before mkfs (``prefill``; memory equal
to its size, which a benchmark would use anyway), and the steady cost of a
rewrite is measured and reported as :attr:`HddModel.write_cpu_per_gib`: that
much of any writer's CPU per GiB is the model's, not the writer's.

Caveat (cgroup v1): buffered writeback done by kernel threads is not charged
to the group and escapes the throttle.  :meth:`HddModel.io_counters` reads both
the group's ``blkio.throttle.io_service_bytes`` and the device's own
statistics so a run can report how many bytes went past the throttle.

With ``directory=`` an existing directory (on a real disk) is used instead of
zram; the throttle, if enabled, then applies to that directory's disk.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..mounts import is_mountpoint
from .cleanup import CleanupStack, StackOwner
from .sysutil import GiB, MiB, block_queue_attr, run, whole_disk_of, write_text

log = logging.getLogger(__name__)

ZRAM_CONTROL = Path("/sys/class/zram-control")
BLKIO_ROOT = Path("/sys/fs/cgroup/blkio")
THROTTLE_FILES = ("read_iops", "write_iops", "read_bps", "write_bps")

#: Size of each O_DIRECT write of the pre-fill and of the write-cost probe.
FILL_CHUNK = 4 * MiB
#: Bytes rewritten to measure the model's steady write cost.
PROBE_BYTES = 256 * MiB


@dataclass(frozen=True)
class Throttle:
    """Limits per direction; 0 means unlimited."""

    read_iops: int = 200
    write_iops: int = 200
    read_bps: int = 150 * MiB
    write_bps: int = 150 * MiB

    def values(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in THROTTLE_FILES}


@dataclass(frozen=True)
class IoCounters:
    """Cumulative byte counts: charged to the throttle group vs. seen by the disk."""

    throttled_read: int
    throttled_write: int
    device_read: int
    device_write: int

    def __sub__(self, other: IoCounters) -> IoCounters:
        return IoCounters(
            self.throttled_read - other.throttled_read,
            self.throttled_write - other.throttled_write,
            self.device_read - other.device_read,
            self.device_write - other.device_write,
        )


class HddModel(StackOwner):
    """Context manager: set up the model on enter, remove every trace on exit."""

    def __init__(
        self,
        *,
        throttle: Throttle | None = Throttle(),
        size: int = 8 << 30,
        directory: Path | None = None,
        workdir: Path | None = None,
        enter_cgroup: bool = True,
        prefill: bool = True,
    ) -> None:
        self.throttle = throttle
        self.prefill = prefill
        #: CPU seconds a writer spends inside the model (zram) per GiB
        #: rewritten; None until measured (zram only).
        self.write_cpu_per_gib: float | None = None
        self.size = size
        self.directory = Path(directory) if directory else None
        self.workdir = Path(workdir) if workdir else None
        self.enter_cgroup = enter_cgroup
        self.zram_id: int | None = None
        self.major = self.minor = -1
        self.mountpoint: Path | None = None
        self.path: Path = Path("/nonexistent")
        self.cgroup: Path | None = None
        self.throttled = False
        self._stack = CleanupStack("hddmodel")

    # -- description -------------------------------------------------------

    @property
    def device(self) -> str:
        """``MAJ:MIN`` of the model's disk."""
        return f"{self.major}:{self.minor}"

    @property
    def kind(self) -> str:
        return f"zram{self.zram_id}" if self.zram_id is not None else f"dir {self.directory}"

    @property
    def write_bps_limit(self) -> int | None:
        """Current write bandwidth cap in bytes/s, None if unthrottled."""
        if not self.throttled or self.throttle is None or not self.throttle.write_bps:
            return None
        return self.throttle.write_bps

    @property
    def logical_block_size(self) -> int:
        value = block_queue_attr(self.major, self.minor, "logical_block_size")
        return int(value) if value else 512

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "device": self.device,
            "path": str(self.path),
            "size": self.size if self.zram_id is not None else None,
            "throttle": self.throttle.values() if self.throttle else None,
            "logical_block_size": self.logical_block_size,
            "prefilled": self.prefill if self.zram_id is not None else None,
            "write_cpu_per_gib": self.write_cpu_per_gib,
        }

    # -- set-up ------------------------------------------------------------

    def _setup(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="bench-model-"))
            self._stack.push(f"rmdir {self.workdir}", self._rmdir_workdir)
        if self.directory is not None:
            self._setup_directory()
        else:
            self._setup_zram()
        if self.throttle is not None or self.enter_cgroup:
            self._setup_cgroup()
        if self.throttle is not None:
            self.set_throttled(True)
        if self.enter_cgroup:
            self._enter_cgroup()
        log.info("HDD model ready: %s at %s (device %s)", self.kind, self.path, self.device)

    def _rmdir_workdir(self) -> None:
        assert self.workdir is not None
        os.rmdir(self.workdir)

    def _setup_directory(self) -> None:
        assert self.directory is not None
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--dir {self.directory}: not a directory")
        self.major, self.minor = whole_disk_of(os.stat(self.directory).st_dev)
        self.path = Path(tempfile.mkdtemp(prefix="bench-", dir=self.directory))
        self._stack.push(f"rmdir {self.path}", lambda: os.rmdir(self.path))

    def _setup_zram(self) -> None:
        if not (ZRAM_CONTROL / "hot_add").exists():
            run(["modprobe", "zram", "num_devices=0"], check=False)
        if not (ZRAM_CONTROL / "hot_add").exists():
            raise RuntimeError("zram is not available (no /sys/class/zram-control/hot_add)")
        self.zram_id = int((ZRAM_CONTROL / "hot_add").read_text())
        zram_id = self.zram_id
        self._stack.push(f"zram hot_remove {zram_id}", lambda: self._zram_remove(zram_id))
        sysdir = Path(f"/sys/block/zram{zram_id}")
        write_text(sysdir / "disksize", str(self.size))
        self.major, self.minor = (int(x) for x in (sysdir / "dev").read_text().split(":"))
        dev = f"/dev/zram{zram_id}"
        _wait_for(lambda: os.path.exists(dev), 5.0, f"{dev} to appear")
        # zram rounds disksize up to a page: fill and probe what it made, in
        # whole pages (O_DIRECT lengths must be multiples of the block size).
        dev_size = int((sysdir / "size").read_text()) * 512
        if self.prefill:
            started = time.monotonic()
            fill_device(dev, dev_size)
            log.info("filled %s (%d MiB) in %.1f s", dev, dev_size // MiB,
                     time.monotonic() - started)
        probe = min(PROBE_BYTES, dev_size // 4) // 4096 * 4096
        self.write_cpu_per_gib = rewrite_cpu_per_gib(dev, probe)
        log.info("model write cost: %.2f CPU s/GiB", self.write_cpu_per_gib)
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", dev], timeout=120)
        assert self.workdir is not None
        self.mountpoint = self.workdir / "model"
        self.mountpoint.mkdir()
        mnt = self.mountpoint
        self._stack.push(f"rmdir {mnt}", lambda: mnt.rmdir())
        run(["mount", "-t", "ext4", dev, str(mnt)], timeout=60)
        self._stack.push(f"umount {mnt}", lambda: self._umount(mnt))
        self.path = mnt

    @staticmethod
    def _umount(mnt: Path) -> None:
        if not is_mountpoint(mnt):
            return
        for attempt in range(20):
            if run(["umount", str(mnt)], check=False, timeout=120).returncode == 0:
                return
            time.sleep(0.25 * (attempt + 1))
        run(["umount", str(mnt)], timeout=120)

    @staticmethod
    def _zram_remove(zram_id: int) -> None:
        sysdir = Path(f"/sys/block/zram{zram_id}")
        for attempt in range(40):
            if not sysdir.exists():
                return
            try:
                write_text(ZRAM_CONTROL / "hot_remove", str(zram_id))
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 39:
                    raise
                time.sleep(0.25)

    def _setup_cgroup(self) -> None:
        if not (BLKIO_ROOT / "cgroup.procs").exists():
            raise RuntimeError(f"cgroup v1 blkio controller not mounted at {BLKIO_ROOT}")
        self.cgroup = BLKIO_ROOT / f"alignfs-bench-{os.getpid()}"
        suffix = 1
        while self.cgroup.exists():  # a second model in the same process
            suffix += 1
            self.cgroup = BLKIO_ROOT / f"alignfs-bench-{os.getpid()}-{suffix}"
        self.cgroup.mkdir()
        group = self.cgroup
        self._stack.push(f"rmdir {group}", lambda: self._remove_cgroup(group))

    def _enter_cgroup(self) -> None:
        assert self.cgroup is not None
        home = current_blkio_cgroup()
        write_text(self.cgroup / "cgroup.procs", str(os.getpid()))
        self._stack.push(f"return to blkio cgroup {home}", lambda: self._leave_cgroup(home))

    @staticmethod
    def _leave_cgroup(home: Path) -> None:
        """Back to where this process was before (the root group, normally)."""
        try:
            write_text(home / "cgroup.procs", str(os.getpid()))
        except OSError:
            write_text(BLKIO_ROOT / "cgroup.procs", str(os.getpid()))

    @staticmethod
    def _remove_cgroup(group: Path) -> None:
        for attempt in range(20):
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 19:
                    raise
            # Leftover children (a daemon that outlived its umount): they are
            # ours, since only this process and its children were ever put here.
            for pid in (group / "cgroup.procs").read_text().split():
                log.warning("moving leftover process %s out of %s", pid, group)
                try:
                    write_text(BLKIO_ROOT / "cgroup.procs", pid)
                except OSError:
                    pass
            time.sleep(0.1)

    # -- run-time control ----------------------------------------------------

    def throttle_files(self) -> dict[str, str]:
        """Current contents of the group's four ``blkio.throttle.*_device`` files."""
        assert self.cgroup is not None
        return {
            name: (self.cgroup / f"blkio.throttle.{name}_device").read_text().strip()
            for name in THROTTLE_FILES
        }

    def set_throttled(self, on: bool) -> None:
        """Switch the throttle rules on or off (off writes ``MAJ:MIN 0``)."""
        if self.cgroup is None or self.throttle is None:
            self.throttled = False
            return
        for name, value in self.throttle.values().items():
            write_text(
                self.cgroup / f"blkio.throttle.{name}_device",
                f"{self.device} {value if on else 0}",
            )
        self.throttled = on and any(self.throttle.values().values())

    def io_counters(self) -> IoCounters:
        """Bytes charged to the group so far vs. bytes the device itself handled."""
        t_read = t_write = 0
        if self.cgroup is not None:
            text = (self.cgroup / "blkio.throttle.io_service_bytes").read_text()
            for line in text.splitlines():
                fields = line.split()
                if len(fields) == 3 and fields[0] == self.device:
                    if fields[1] == "Read":
                        t_read = int(fields[2])
                    elif fields[1] == "Write":
                        t_write = int(fields[2])
        stat = Path(f"/sys/dev/block/{self.device}/stat").read_text().split()
        return IoCounters(t_read, t_write, int(stat[2]) * 512, int(stat[6]) * 512)


def current_blkio_cgroup() -> Path:
    """The blkio cgroup directory this process is in (from /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "blkio" in controllers.split(","):
            return BLKIO_ROOT / path.lstrip("/")
    return BLKIO_ROOT


def _direct_writes(dev: str, start: int, end: int) -> float:
    """O_DIRECT-write incompressible data over ``[start, end)`` of *dev*;
    the calling thread's CPU seconds spent in the writes."""
    buf = mmap.mmap(-1, FILL_CHUNK)  # page-aligned, as O_DIRECT requires
    try:
        buf.write(os.urandom(FILL_CHUNK))
        view = memoryview(buf)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            started = time.thread_time()
            pos = start
            while pos < end:
                n = os.pwrite(fd, view[: min(FILL_CHUNK, end - pos)], pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write to {dev} at {pos}")
                pos += n
            return time.thread_time() - started
        finally:
            os.close(fd)
            view.release()
    finally:
        buf.close()


def fill_device(dev: str, size: int) -> None:
    """Write every block of *dev* once, on one thread per CPU (zram compresses
    in the writer's thread, so this is CPU-bound)."""
    workers = max(1, min(os.cpu_count() or 1, 4))
    share = -(-size // workers // FILL_CHUNK) * FILL_CHUNK
    errors: list[BaseException] = []

    def worker(start: int) -> None:
        try:
            _direct_writes(dev, start, min(size, start + share))
        except BaseException as exc:  # re-raised below, on the caller's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(start,), name=f"fill-{i}")
        for i, start in enumerate(range(0, size, share))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def rewrite_cpu_per_gib(dev: str, nbytes: int) -> float:
    """CPU seconds per GiB a writer spends rewriting *nbytes* at the start of
    *dev* with O_DIRECT (the first pass makes sure they are all written)."""
    _direct_writes(dev, 0, nbytes)
    return _direct_writes(dev, 0, nbytes) / (nbytes / GiB)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
