"""The ``alignfs`` command: mount, umount, stats, flush, bench.

``alignfs mount`` validates its arguments, starts the daemon as a detached
child (``--foreground`` runs it in place) and returns once the mount answers.
It also understands the mount(8) helper convention (``alignfs BACKING
MOUNTPOINT -o opt=value,...``, as run by ``mount -t fuse.alignfs`` through
mount.fuse3), so fstab entries and mount units work. Every failure class has
its own exit code (see :mod:`alignfs.exitcodes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import logging.handlers
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .argtypes import positive_float
from .config import ConfigError, MountConfig
from .control import XATTR_FLUSH, XATTR_UMOUNT, query_stats, request
from .exitcodes import ExitCode, describe
from .mount_args import (
    UsageError,
    add_mount_arguments,
    config_args,
    config_from_args,
    translate_mount_helper,
)
from .mounts import fuse_mount_type, is_stale
from .sizes import format_size
from .stats import describe as describe_stats

log = logging.getLogger("alignfs")

#: Where a daemon run by root leaves its exit code for ``alignfs umount``
#: (other users: see status_dirs).
STATUS_DIR = Path("/run/alignfs")

#: How long a daemon that never got ready may take to stop before SIGKILL.
STOP_GRACE = 10.0

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"alignfs: error: {message}", file=sys.stderr)
        sys.exit(ExitCode.USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alignfs",
        description="FUSE passthrough filesystem that collects small, unaligned writes into "
        "large aligned O_DIRECT writes to BACKING.",
        epilog="exit codes:\n" + describe() + "\n\nAlso usable as a mount(8) helper: "
        "mount -t fuse.alignfs BACKING MOUNTPOINT -o buffer_size=8M,...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount BACKING at MOUNTPOINT",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit codes:\n" + describe())
    add_mount_arguments(m)

    u = sub.add_parser("umount", help="write everything back, unmount, wait for the daemon")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="give up waiting after this long (exit 7); default: wait")

    s = sub.add_parser(
        "stats", help="show the daemon's counters",
        description="Without options: the counters since the mount.\n--watch: one line per "
        "interval with the rates of that interval, like vmstat.\n--prometheus: the counters "
        "of the named mounts (default: every alignfs mount)\nin the Prometheus text format.",
        epilog="exit codes:\n" + describe() + "\n\nWith --prometheus and no MOUNTPOINT, a "
        "mount that does not answer is reported\nas alignfs_up 0 (and on stderr), exit 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("mountpoint", type=Path, nargs="*", metavar="MOUNTPOINT",
                   help="the alignfs mount (several, or none for all, with --prometheus)")
    s.add_argument("--json", action="store_true",
                   help="machine-readable output (with --watch: one JSON object per interval, "
                   "with the interval's rates under \"rates\")")
    s.add_argument("--watch", type=positive_float, nargs="?", const=1.0, default=None,
                   metavar="SECONDS",
                   help="print the rates every SECONDS (default 1) until Ctrl-C")
    s.add_argument("--count", type=int, default=None, metavar="N",
                   help="with --watch: stop after N lines")
    s.add_argument("--prometheus", action="store_true",
                   help="Prometheus text format (for node_exporter's textfile collector)")

    f = sub.add_parser("flush", help="write out and fsync everything buffered now")
    f.add_argument("mountpoint", type=Path)

    i = sub.add_parser("install-systemd",
                       help="configure alignfs@INSTANCE.service for MOUNTPOINT and BACKING")
    i.add_argument("instance", help="instance name, e.g. images")
    i.add_argument("mountpoint", type=Path)
    i.add_argument("backing", type=Path)
    i.add_argument("options", nargs=argparse.REMAINDER,
                   help="mount options for the daemon, e.g. --buffer-size 8M --allow-other")

    b = sub.add_parser("bench", help="benchmark direct vs alignfs on an HDD model",
                       add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# -- mount ---------------------------------------------------------------------

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


def _spawn_daemon(cfg: MountConfig) -> int:
    """Start the daemon detached; return once it is serving (or failed, or
    --start-timeout passed: then it is stopped and its mount removed)."""
    timeout = cfg.start_timeout
    r, w = os.pipe()
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    # The child must import this very package, even from a source tree.
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [package_parent, env.get("PYTHONPATH", "")]))
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
        subprocess.run(["umount", "-i", "-l", str(mountpoint)], capture_output=True)
        if is_stale(str(mountpoint)):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def _run_foreground(cfg: MountConfig) -> int:
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


def cmd_mount(ns: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(ns)
    except ConfigError as exc:
        print(f"alignfs: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    problem = check_paths(cfg)
    if problem:
        code, text = problem
        print(f"alignfs: {text}", file=sys.stderr)
        if cfg.ready_fd is not None:
            os.write(cfg.ready_fd, f"ERR {int(code)} {text}\n".encode())
        return code
    if cfg.foreground:
        return _run_foreground(cfg)
    return _spawn_daemon(cfg)


# -- talking to a running daemon -------------------------------------------------

def _control_error(mountpoint: Path, exc: OSError, writes_back: bool = False) -> int:
    """Exit code (and message) for a failed control request.

    A request that *writes_back* (flush, umount) fails with the errno of the
    data it could not write, whatever that is (EIO, ENOSPC, EFBIG, ...).
    """
    if exc.errno in (errno.EACCES, errno.EPERM):
        print(f"alignfs: permission denied: only root or the user who mounted "
              f"{mountpoint} may control it", file=sys.stderr)
        return ExitCode.PERMISSION
    if exc.errno in (errno.ENOENT, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTDIR):
        print(f"alignfs: {mountpoint} is not an alignfs mount", file=sys.stderr)
        return ExitCode.NOT_ALIGNFS
    print(f"alignfs: {mountpoint}: {exc.strerror}", file=sys.stderr)
    if writes_back or exc.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
        return ExitCode.UNWRITTEN_DATA
    return ExitCode.INTERNAL


def _is_alignfs(mountpoint: Path) -> bool:
    return fuse_mount_type(os.path.realpath(mountpoint)) == "fuse.alignfs"


def _refuse_stale(mountpoint: Path) -> int | None:
    if is_stale(str(mountpoint)):
        print(f"alignfs: {mountpoint} is a stale mount (its daemon died); remove it with "
              f"'alignfs umount {mountpoint}'", file=sys.stderr)
        return ExitCode.BAD_MOUNTPOINT
    return None


def _live_mount(mountpoint: str) -> tuple[Path, int | None]:
    """The absolute mount point, and an exit code if it is not a live alignfs mount."""
    mp = Path(os.path.abspath(mountpoint))
    refused = _refuse_stale(mp)
    if refused is None and not _is_alignfs(mp):
        print(f"alignfs: {mp} is not an alignfs mount", file=sys.stderr)
        refused = ExitCode.NOT_ALIGNFS
    return mp, refused


def cmd_umount(ns: argparse.Namespace) -> int:
    mp = Path(os.path.abspath(ns.mountpoint))
    if is_stale(str(mp)):
        # The daemon is gone: nothing is buffered any more; remove the dead mount.
        # -i: do not call umount.fuse.alignfs (that would be this command again).
        result = subprocess.run(["umount", "-i", str(mp)], capture_output=True, text=True)
        if result.returncode != 0:
            result = subprocess.run(["fusermount3", "-u", "-z", str(mp)],
                                    capture_output=True, text=True)
        if result.returncode != 0:
            print(f"alignfs: cannot remove stale mount {mp}: {result.stderr.strip()}",
                  file=sys.stderr)
            return ExitCode.BAD_MOUNTPOINT
        print(f"alignfs: removed the stale mount at {mp} (its daemon had died; data it had "
              "not written was lost)", file=sys.stderr)
        return ExitCode.OK
    if not _is_alignfs(mp):
        print(f"alignfs: {mp} is not an alignfs mount", file=sys.stderr)
        return ExitCode.NOT_ALIGNFS
    try:
        stats = query_stats(str(mp))
        pid = int(stats["pid"])
        # A daemon tells where it leaves its exit code (None: nowhere it could).
        status = stats.get("status_file", str(STATUS_DIR / f"{pid}.exit"))
        request(str(mp), XATTR_UMOUNT)
    except OSError as exc:
        code = _control_error(mp, exc, writes_back=True)
        if code in (ExitCode.UNWRITTEN_DATA, ExitCode.INTERNAL):
            print(f"alignfs: buffered data could not be written; {mp} stays mounted so "
                  "nothing is lost. Fix BACKING and retry.", file=sys.stderr)
            code = ExitCode.UNWRITTEN_DATA
        return code
    deadline = None if ns.timeout is None else time.monotonic() + ns.timeout
    while _pid_alive(pid):
        if deadline is not None and time.monotonic() > deadline:
            print(f"alignfs: daemon {pid} still running after {ns.timeout}s", file=sys.stderr)
            return ExitCode.TIMEOUT
        time.sleep(0.02)
    try:
        code = int(Path(status).read_text())
        Path(status).unlink()
    except (OSError, ValueError, TypeError):
        # Never success by default: the daemon may have exited 6.
        print(f"alignfs: daemon {pid} exited without leaving its exit status "
              f"({status or 'it had no place for it'}): whether everything reached "
              "BACKING is unknown; see its log", file=sys.stderr)
        return ExitCode.UNKNOWN
    if code != ExitCode.OK:
        print(f"alignfs: the daemon reported unwritten data (exit {code}); see its log",
              file=sys.stderr)
    return code


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


_PRINT_UNIT: dict[str, Callable[[Any], str]] = {
    "count": lambda v: str(int(v)),
    "bytes": format_size,
    "seconds": lambda v: f"{v:.3f}",
}


def _stats_rows() -> list[tuple[str, str, Callable[[Any], str]]]:
    """(label, key, format) of each counter (declared in alignfs.stats), flushes last."""
    rows = [(c.label, c.key, _PRINT_UNIT[c.unit]) for c in describe_stats()
            if c.key != "flushes"]
    rows.insert(next(i for i, r in enumerate(rows) if r[1] == "backing_write_bytes") + 1,
                ("mean backing write", "mean_backing_write_size", format_size))
    return rows


def render_stats(stats: dict[str, Any]) -> str:
    lines = [f"alignfs {stats.get('mountpoint')} -> {stats.get('backing')} "
             f"(pid {stats.get('pid')})"]
    for label, key, fmt in _stats_rows():
        if key in stats:
            lines.append(f"  {label:32s} {fmt(stats[key])}")
    flushes = stats.get("flushes", {})
    lines.append("  buffer flushes by cause          " +
                 ", ".join(f"{k} {v}" for k, v in flushes.items() if v) or "none")
    return "\n".join(lines)


def cmd_stats(ns: argparse.Namespace) -> int:
    if ns.prometheus:
        if ns.watch is not None or ns.json or ns.count is not None:
            print("alignfs: --prometheus prints once; it takes no --watch, --json or --count",
                  file=sys.stderr)
            return ExitCode.USAGE
        return _stats_prometheus(ns.mountpoint)
    if len(ns.mountpoint) != 1:
        print("alignfs: stats takes one MOUNTPOINT (several, or none, only with --prometheus)",
              file=sys.stderr)
        return ExitCode.USAGE
    if ns.count is not None and (ns.watch is None or ns.count < 1):
        print("alignfs: --count needs --watch and a positive number", file=sys.stderr)
        return ExitCode.USAGE
    mp, refused = _live_mount(ns.mountpoint[0])
    if refused is not None:
        return refused
    try:
        if ns.watch is None:
            stats = query_stats(str(mp))
            print(json.dumps(stats, sort_keys=True) if ns.json else render_stats(stats))
            return ExitCode.OK
        return _watch(mp, ns.watch, ns.json, ns.count)
    except BrokenPipeError:
        # A reader such as head(1) went away: that is how such output ends.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except OSError as exc:
        return _control_error(mp, exc)
    except KeyboardInterrupt:
        return ExitCode.OK


def _watch(mp: Path, interval: float, as_json: bool, count: int | None) -> int:
    """vmstat-like: a line of rates per *interval* (header repeated every screen)."""
    from .rates import compute_rates, format_line, header

    page = max(5, shutil.get_terminal_size((80, 24)).lines - 1)
    printed = 0
    prev = query_stats(str(mp))
    prev_at = time.monotonic()
    if as_json:
        print(json.dumps({**prev, "time": time.time(), "rates": None}, sort_keys=True),
              flush=True)
    due = prev_at + interval
    while count is None or printed < count:
        if not as_json and printed % page == 0:
            print(header(), flush=True)
        time.sleep(max(0.0, due - time.monotonic()))
        due += interval
        stats = query_stats(str(mp))
        now = time.monotonic()
        rates = compute_rates(prev, stats, now - prev_at)
        if as_json:
            print(json.dumps({**stats, "time": time.time(), "rates": rates}, sort_keys=True),
                  flush=True)
        else:
            print(format_line(rates), flush=True)
        printed += 1
        prev, prev_at = stats, now
        due = max(due, now)  # after a stall, do not print a burst of catch-up lines
    return ExitCode.OK


def _stats_prometheus(named: list[Path]) -> int:
    from .mounts import mount_entries
    from .prometheus import render

    if named:
        mountpoints = []
        for path in named:
            mp, refused = _live_mount(str(path))
            if refused is not None:
                return refused
            mountpoints.append(mp)
    else:
        mountpoints = [Path(m) for m, fstype, _ in mount_entries() if fstype == "fuse.alignfs"]
    found: list[tuple[str, dict[str, Any] | None]] = []
    for mp in mountpoints:
        try:
            if is_stale(str(mp)):
                raise OSError(errno.ENOTCONN, "stale mount (its daemon died)")
            found.append((str(mp), query_stats(str(mp))))
        except OSError as exc:
            if named:
                return _control_error(mp, exc)
            print(f"alignfs: {mp}: {exc.strerror or exc}; reported as alignfs_up 0",
                  file=sys.stderr)
            found.append((str(mp), None))
    sys.stdout.write(render(found))
    return ExitCode.OK


def cmd_flush(ns: argparse.Namespace) -> int:
    mp, refused = _live_mount(ns.mountpoint)
    if refused is not None:
        return refused
    try:
        request(str(mp), XATTR_FLUSH)
    except OSError as exc:
        code = _control_error(mp, exc, writes_back=True)
        if code == ExitCode.UNWRITTEN_DATA:
            print("alignfs: some data is not on BACKING (still buffered, or dropped earlier "
                  "in this mount); the daemon's log names files and offsets", file=sys.stderr)
        return code
    return ExitCode.OK


def cmd_install_systemd(ns: argparse.Namespace) -> int:
    from . import service

    mp, back = Path(os.path.abspath(ns.mountpoint)), Path(os.path.abspath(ns.backing))
    try:
        # Validate the options now rather than at boot.
        config_from_args(build_parser().parse_args(["mount", str(mp), str(back), *ns.options]))
        written = service.write_instance(ns.instance, mp, back, ns.options)
    except (ConfigError, ValueError) as exc:
        print(f"alignfs: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    for path in written:
        print(f"wrote {path}")
    if service.systemd_running():
        service.enable(ns.instance)
        print(f"enabled alignfs@{ns.instance}.service; start it with: "
              f"systemctl start alignfs@{ns.instance}")
    else:
        print("systemd is not running here; enable the unit on the target system")
    return ExitCode.OK


COMMANDS = {"install-systemd": cmd_install_systemd, "mount": cmd_mount, "umount": cmd_umount,
            "stats": cmd_stats, "flush": cmd_flush}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        try:
            argv = translate_mount_helper(argv)
        except UsageError as exc:
            print(f"alignfs: {exc}", file=sys.stderr)
            return ExitCode.USAGE
    ns = build_parser().parse_args(argv)
    return COMMANDS[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
