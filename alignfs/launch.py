"""A mount's daemon seen from outside: started, waited for, its exit status.

``alignfs mount`` checks MOUNTPOINT and BACKING, then starts the daemon as a
detached child and returns once it reports readiness over a pipe (or stops it
after ``--start-timeout``: nothing stays mounted). ``--foreground`` runs the
daemon in this process (systemd, the detached child itself). A daemon leaves
its exit code in a status file when it ends; ``alignfs umount`` waits for the
process to go and reads that file, since the daemon is not its child.
"""

from __future__ import annotations

import dataclasses
import logging
import logging.handlers
import os
import select
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .config import MountConfig
from .exitcodes import ExitCode
from .mount_args import config_args
from .mounts import fuse_mount_type, is_stale
from .processes import pid_alive, source_env

log = logging.getLogger(__name__)

#: Where a daemon run by root leaves its exit code for ``alignfs umount``
#: (other users: see status_dirs).
STATUS_DIR = Path("/run/alignfs")

#: How long a daemon that never got ready may take to stop before SIGKILL.
STOP_GRACE = 10.0


def check_paths(cfg: MountConfig) -> tuple[ExitCode, str] | None:
    """The first reason the mount cannot work, or None."""
    if not os.path.exists("/dev/fuse"):
        return ExitCode.FUSE_UNAVAILABLE, "/dev/fuse does not exist (modprobe fuse?)"
    if not cfg.backing.exists():
        return ExitCode.BAD_BACKING, f"BACKING {cfg.backing} does not exist"
    if not cfg.backing.is_dir():
        return ExitCode.BAD_BACKING, f"BACKING {cfg.backing} is not a directory"
    if not os.access(cfg.backing, os.R_OK | os.W_OK | os.X_OK):
        return ExitCode.BAD_BACKING, f"BACKING {cfg.backing} is not writable by this user"
    if is_stale(str(cfg.mountpoint)):
        return ExitCode.BAD_MOUNTPOINT, (
            f"MOUNTPOINT {cfg.mountpoint} is a stale mount left by a dead daemon; "
            f"run 'alignfs umount {cfg.mountpoint}' first")
    if not cfg.mountpoint.exists():
        return ExitCode.BAD_MOUNTPOINT, f"MOUNTPOINT {cfg.mountpoint} does not exist"
    if not cfg.mountpoint.is_dir():
        return ExitCode.BAD_MOUNTPOINT, f"MOUNTPOINT {cfg.mountpoint} is not a directory"
    mp, back = os.path.realpath(cfg.mountpoint), os.path.realpath(cfg.backing)
    if mp == back or mp.startswith(back.rstrip("/") + "/"):
        return ExitCode.BAD_MOUNTPOINT, (
            f"MOUNTPOINT {cfg.mountpoint} is inside BACKING {cfg.backing} (recursion)")
    if fuse_mount_type(mp) == "fuse.alignfs":
        return ExitCode.BAD_MOUNTPOINT, f"MOUNTPOINT {cfg.mountpoint} is already an alignfs mount"
    if not cfg.nonempty and any(os.scandir(mp)):
        return ExitCode.BAD_MOUNTPOINT, (
            f"MOUNTPOINT {cfg.mountpoint} is not empty (its files would be hidden); "
            "use --nonempty to mount anyway")
    return None


def setup_logging(foreground: bool, log_file: Path | None, debug: bool) -> None:
    """The daemon's log: *log_file*, else stderr in the foreground, else syslog."""
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("alignfs: %(levelname)s %(name)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("alignfs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _child_args(cfg: MountConfig, ready_fd: int) -> list[str]:
    """The daemon's command line: *cfg*, in the foreground, reporting on *ready_fd*.

    MOUNTPOINT was checked here, so the daemon need not refuse it as non-empty.
    """
    child = dataclasses.replace(cfg, foreground=True, nonempty=True, ready_fd=ready_fd)
    return [sys.executable, "-m", "alignfs", "mount", *config_args(child)]


def spawn_daemon(cfg: MountConfig) -> int:
    """Start the daemon detached; return once it is serving (or failed, or
    --start-timeout passed: then it is stopped and its mount removed)."""
    timeout = cfg.start_timeout
    r, w = os.pipe()
    env = source_env()
    env.pop("NOTIFY_SOCKET", None)  # the daemon is not the service's main process
    try:
        proc = subprocess.Popen(
            _child_args(cfg, w), pass_fds=(w,), start_new_session=True, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd="/")
    finally:
        os.close(w)
    message = _read_ready(r, timeout)
    if message is None:
        print(f"alignfs: the daemon did not report ready within {timeout:g} s (is BACKING "
              f"or MOUNTPOINT hanging?); stopped it, nothing is mounted (see its log: "
              f"--log FILE, or syslog)", file=sys.stderr)
        _stop_unready(proc, cfg.mountpoint)
        return ExitCode.TIMEOUT
    if message.startswith("OK"):
        return ExitCode.OK
    if message.startswith("ERR"):
        _, code, text = message.split(" ", 2)
        print(f"alignfs: {text.strip()}", file=sys.stderr)
        proc.wait()
        return int(code)
    code = proc.wait()
    print(f"alignfs: the daemon exited with status {code} before the mount was ready "
          f"(see the log: --log FILE, or syslog)", file=sys.stderr)
    return ExitCode.INTERNAL


def _read_ready(fd: int, timeout: float) -> str | None:
    """The daemon's readiness line from the pipe *fd* ("" if it closed the pipe
    without one), or None if none came within *timeout* seconds. Closes *fd*."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace")


def _stop_unready(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Stop a daemon that never got ready: SIGTERM (a live mount is written back
    and unmounted), SIGKILL after STOP_GRACE, then remove a mount it left."""
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            print(f"alignfs: daemon {proc.pid} does not exit even on SIGKILL (stuck in the "
                  "kernel on BACKING?)", file=sys.stderr)
            return
    status = status_file_for(proc.pid)  # nobody will wait for its exit status
    if status is not None:
        status.unlink(missing_ok=True)
    if is_stale(str(mountpoint)):
        remove_stale_mount(mountpoint, lazy=True)


def run_foreground(cfg: MountConfig) -> int:
    """Be the daemon: serve the mount until it ends, report readiness on
    ``cfg.ready_fd`` (if any) and leave the exit code in the status file."""
    from .daemon import Daemon, DaemonError

    ready_fd = cfg.ready_fd

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, line.encode())
                os.close(ready_fd)
            except OSError:
                pass

    setup_logging(ready_fd is None, cfg.log_file, cfg.debug)
    status_file = status_file_for(os.getpid())
    if status_file is None:
        log.warning("no directory to leave the exit status in (tried %s): 'alignfs "
                    "umount' will report the outcome as unknown (exit %d)",
                    ", ".join(str(d) for d, _ in status_dirs(os.geteuid(), os.environ)),
                    ExitCode.UNKNOWN)
    daemon = Daemon(cfg, on_ready=lambda: report("OK\n"), status_file=status_file)
    try:
        code = daemon.run()
    except DaemonError as exc:
        log.error("%s", exc)
        report(f"ERR {int(exc.code)} {exc}\n")
        if ready_fd is None:
            print(f"alignfs: {exc}", file=sys.stderr)
        return exc.code
    except Exception:
        log.exception("internal error")
        report(f"ERR {int(ExitCode.INTERNAL)} internal error (see the log)\n")
        _write_status(ExitCode.INTERNAL, status_file)  # the mount may have been live
        return ExitCode.INTERNAL
    _write_status(code, status_file)
    return code


def status_dirs(euid: int, environ: Mapping[str, str]) -> list[tuple[Path, int]]:
    """Directories (and their modes) where a daemon of user *euid* may leave its
    exit status, best first: /run/alignfs for root, else the user's runtime
    directory, else a private directory in /tmp (as for root when /run fails)."""
    dirs = [(STATUS_DIR, 0o755)] if euid == 0 else []
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        dirs.append((Path(runtime) / "alignfs", 0o700))
    dirs.append((Path(f"/run/user/{euid}/alignfs"), 0o700))
    dirs.append((Path(f"/tmp/alignfs-{euid}"), 0o700))
    return list(dict.fromkeys(dirs))


def _usable_status_dir(path: Path, mode: int, euid: int) -> bool:
    """*path* exists (made if need be), is this user's, and no one else may write it."""
    try:
        path.mkdir(mode=mode, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == euid and not st.st_mode & 0o022
            and os.access(path, os.W_OK | os.X_OK))


def status_file_for(pid: int) -> Path | None:
    """Where the daemon *pid* (this process) will leave its exit code, or None."""
    euid = os.geteuid()
    for path, mode in status_dirs(euid, os.environ):
        if _usable_status_dir(path, mode, euid):
            return path / f"{pid}.exit"
    return None


def _write_status(code: int, path: Path | None) -> None:
    """Leave the exit code for a waiting ``alignfs umount`` (which reads the path
    from the daemon's stats); say so in the log if that is impossible."""
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    try:
        # An explicit mode: the daemon runs with umask 0, and a file others
        # could write would let them turn a 6 into a 0.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{int(code)}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot leave the exit status %d in %s: %s; 'alignfs umount' will "
                  "report the outcome as unknown (exit %d)", code, path, exc.strerror,
                  ExitCode.UNKNOWN)


def remove_stale_mount(mountpoint: Path, lazy: bool = False) -> str | None:
    """Remove the mount of a dead daemon at *mountpoint*; None, or why it stays.

    ``umount -i`` does not call umount.fuse.alignfs (that would be ``alignfs
    umount`` again); fusermount3 is the way for a user who is not root.
    """
    result = subprocess.run(["umount", "-i", *(["-l"] if lazy else []), str(mountpoint)],
                            capture_output=True, text=True)
    if is_stale(str(mountpoint)) if lazy else result.returncode != 0:
        result = subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                                capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr.strip()


def take_status(path: Path | str | None) -> int | None:
    """The exit code a daemon left at *path* (consumed), or None if there is none."""
    if path is None:
        return None
    try:
        code = int(Path(path).read_text())
        Path(path).unlink()
    except (OSError, ValueError):
        return None
    return code


def _wait_pidfd(pid: int, deadline: float | None) -> bool:
    """Wait until *pid* ends or *deadline* passes, woken by the exit itself
    (a pidfd), not by polling; False if pidfds are not available (then the
    caller polls). The caller tells the two ends apart with pid_alive."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (OSError, AttributeError):
        return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while True:
            if deadline is None:
                ready = poller.poll()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                ready = poller.poll(int(left * 1000) + 1)
            if ready:
                return True
    finally:
        os.close(pidfd)


def wait_for_exit(pid: int, status: str | None, timeout: float | None) -> int:
    """Wait for the daemon *pid* to end; its exit code from *status* (``alignfs umount``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if not _wait_pidfd(pid, deadline):
        while pid_alive(pid):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.02)
    if pid_alive(pid):
        print(f"alignfs: daemon {pid} still running after {timeout}s", file=sys.stderr)
        return ExitCode.TIMEOUT
    code = take_status(status)
    if code is None:
        # Never success by default: the daemon may have exited 6.
        print(f"alignfs: daemon {pid} exited without leaving its exit status "
              f"({status or 'it had no place for it'}): whether everything reached "
              "BACKING is unknown; see its log", file=sys.stderr)
        return ExitCode.UNKNOWN
    if code != ExitCode.OK:
        print(f"alignfs: the daemon reported unwritten data (exit {code}); see its log",
              file=sys.stderr)
    return code

