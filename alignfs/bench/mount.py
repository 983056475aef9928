"""Driving the alignfs CLI: mount, stats, umount -- as a context manager.

The harness talks to alignfs through its command line (``mount``,
``stats --json``, ``umount``), so it benchmarks exactly what a user runs; only
the ~10/s counter samples drawn in the picture read the control file
in-process (:meth:`AlignfsMount.control_stats`).
The command prefix is configurable; by default it is
``[sys.executable, "-m", "alignfs"]`` with the source tree on PYTHONPATH.

The mount command's output goes to a log file, never to a pipe: the daemon
it leaves behind inherits the file descriptors and would keep a pipe open.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..mounts import is_mountpoint
from ..processes import command_lines, pid_alive, source_env
from .cleanup import CleanupStack, StackOwner
from .sysutil import process_cpu_seconds, run, thread_cpu_seconds, which

log = logging.getLogger(__name__)

STAT_KEYS = (
    "write_requests",
    "write_bytes",
    "backing_writes",
    "backing_write_bytes",
    "rmw_block_reads",
    "read_requests",
    "backing_reads",
    "readahead_hits",
    "readahead_bytes",
    "readahead_wasted_bytes",
    "dirty_bytes",
    "peak_dirty_bytes",
)


@dataclass
class AlignfsCommand:
    """How to invoke alignfs and which extra mount options to pass."""

    prefix: list[str] = field(default_factory=lambda: [sys.executable, "-m", "alignfs"])
    mount_options: list[str] = field(default_factory=list)
    #: pass ``--log FILE`` (in the run's log directory) to ``alignfs mount``
    daemon_log: bool = True
    mount_timeout: float = 60.0
    umount_timeout: float = 900.0

    def env(self) -> dict[str, str]:
        return source_env()

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def available(self) -> str | None:
        """None if the command can be run, else a reason."""
        exe = self.prefix[0]
        if os.sep not in exe and which(exe) is None:
            return f"{exe} not found"
        if self.prefix[1:3] == ["-m", "alignfs"]:
            probe = subprocess.run(
                [exe, "-c", "import importlib.util as u; assert u.find_spec('alignfs.__main__')"],
                env=self.env(),
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode != 0:
                return "python -m alignfs not importable: " + probe.stderr.strip()[-300:]
        return None


def normalize_stats(raw: Any) -> dict[str, Any]:
    """Keep every key from ``stats --json``; guarantee the known ones exist (None if missing)."""
    stats: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    for key in STAT_KEYS:
        stats.setdefault(key, None)
    return stats


class MountError(RuntimeError):
    """``alignfs mount`` failed or the mount did not appear."""


class AlignfsMount(StackOwner):
    """A live alignfs mount of *backing* on *mountpoint*; unmounted on exit."""

    def __init__(self, cmd: AlignfsCommand, mountpoint: Path, backing: Path, log_dir: Path) -> None:
        self.cmd = cmd
        self.mountpoint = Path(mountpoint)
        self.backing = Path(backing)
        self.log_path = Path(log_dir) / f"alignfs-{self.mountpoint.name}.log"
        self.pid: int | None = None
        self.umount_seconds: float | None = None
        self.umount_error: str | None = None
        self.last_daemon_cpu: float | None = None
        #: CPU of the daemon's main thread alone: the trio thread that serves
        #: FUSE requests (the rest is backing I/O on worker threads).
        self.last_serving_cpu: float | None = None
        self._stack = CleanupStack("alignfs-mount")

    def _setup(self) -> None:
        argv = self.cmd.argv(
            "mount", str(self.mountpoint), str(self.backing), *self.cmd.mount_options
        )
        if self.cmd.daemon_log:
            argv += ["--log", str(self.log_path.with_suffix(".daemon.log"))]
        log.debug("mount: %s", " ".join(argv))
        # Registered before the mount exists: a mount that comes up after a
        # timeout must still be removed.
        self._stack.push(f"force-unmount {self.mountpoint}", self._force_unmount)
        with open(self.log_path, "ab") as logf:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    env=self.cmd.env(),
                    timeout=self.cmd.mount_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise MountError(
                    f"alignfs mount did not return within {self.cmd.mount_timeout:.0f} s"
                ) from exc
        if proc.returncode != 0:
            raise MountError(f"alignfs mount exited with {proc.returncode}: {self.log_tail()}")
        if not is_mountpoint(self.mountpoint):
            raise MountError(f"alignfs mount returned 0 but {self.mountpoint} is not mounted")
        self.pid = self._find_daemon_pid()

    def _sample_cpu(self) -> None:
        if self.pid is not None:
            serving = thread_cpu_seconds(self.pid, self.pid)
            cpu = process_cpu_seconds(self.pid)
            if cpu is not None and serving is not None:
                self.last_daemon_cpu = cpu
                self.last_serving_cpu = serving

    def daemon_cpu(self) -> tuple[float, float] | None:
        """The daemon's CPU seconds so far (or at its last sighting): the
        whole process, and its serving thread."""
        self._sample_cpu()
        if self.last_daemon_cpu is None or self.last_serving_cpu is None:
            return None
        return self.last_daemon_cpu, self.last_serving_cpu

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-n:]
        except OSError:
            return ""

    def _find_daemon_pid(self) -> int | None:
        stats = self.stats()
        if stats and isinstance(stats.get("pid"), int):
            return int(stats["pid"])
        needle = str(self.mountpoint).encode()
        pids = [pid for pid, args in command_lines() if needle in args and pid != os.getpid()]
        if len(pids) == 1:
            return pids[0]
        log.debug("cannot identify daemon pid for %s: candidates %s", self.mountpoint, pids)
        return None

    def stats(self) -> dict[str, Any] | None:
        """``alignfs stats MOUNTPOINT --json`` as a dict (known keys always present), or None."""
        argv = self.cmd.argv("stats", str(self.mountpoint), "--json")
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=self.cmd.env(),
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.warning("alignfs stats timed out")
            return None
        if proc.returncode != 0:
            log.warning("alignfs stats exited %d: %s", proc.returncode, proc.stderr.strip()[-300:])
            return None
        try:
            return normalize_stats(json.loads(proc.stdout))
        except json.JSONDecodeError:
            log.warning("alignfs stats printed no JSON: %r", proc.stdout[:200])
            return None

    def control_stats(self) -> dict[str, Any]:
        """The daemon's counters read in-process, for sampling ~10 times a second.

        The same control-file attribute ``alignfs stats --json`` reads; starting
        that command ten times a second would cost the measured machine about
        a CPU. Raises OSError when the mount is gone (or going).
        """
        from ..control_client import query_stats

        return query_stats(str(self.mountpoint))

    def umount(self) -> bool:
        """``alignfs umount``; records its duration; returns False on failure.

        While it runs, the daemon's CPU time is sampled every 20 ms, so that
        :attr:`last_daemon_cpu` includes the final write-out.
        """
        argv = self.cmd.argv("umount", str(self.mountpoint))
        t0 = time.monotonic()
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.cmd.env()
            )
        try:
            deadline = t0 + self.cmd.umount_timeout
            while proc.poll() is None:
                self._sample_cpu()
                if time.monotonic() > deadline:
                    self.umount_error = (
                        f"alignfs umount timed out after {self.cmd.umount_timeout:.0f} s"
                    )
                    return False
                time.sleep(0.02)
        finally:
            self.umount_seconds = time.monotonic() - t0
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            self.umount_error = f"alignfs umount exited with {proc.returncode}: {self.log_tail()}"
            return False
        if is_mountpoint(self.mountpoint):
            self.umount_error = "alignfs umount returned 0 but the mount is still there"
            return False
        return True

    def _force_unmount(self) -> None:
        """Last resort: lazy FUSE unmount of our own mount point, then wait for the daemon."""
        if is_mountpoint(self.mountpoint):
            log.warning("force-unmounting %s", self.mountpoint)
            if not self.umount():
                log.warning("alignfs umount failed (%s); using fusermount3 -uz", self.umount_error)
                run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False, timeout=60)
        if self.pid is not None:
            deadline = time.monotonic() + 30
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(self.pid):
                log.warning("alignfs daemon %d still alive after unmount; killing it", self.pid)
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass

