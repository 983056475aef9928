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
import errno
import json
import logging
import logging.handlers
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import config as cfgmod
from .config import ConfigError, MountConfig
from .control import XATTR_FLUSH, XATTR_UMOUNT, query_stats, request
from .exitcodes import ExitCode, describe
from .mounts import fuse_mount_type, is_stale
from .sizes import format_size, parse_size

log = logging.getLogger("alignfs")

STATUS_DIR = Path("/run/alignfs")

#: mount(8) options that mean nothing to alignfs and are ignored.
IGNORED_MOUNT_OPTIONS = {"defaults", "noauto", "auto", "nofail", "_netdev", "rw", "user",
                         "nouser", "users", "owner", "exec", "noexec", "dev", "nodev", "suid",
                         "nosuid", "atime", "noatime", "relatime", "x-systemd.automount"}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"alignfs: error: {message}", file=sys.stderr)
        sys.exit(ExitCode.USAGE)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


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
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="exit codes:\n" + describe())
    m.add_argument("mountpoint", type=Path, help="where the files appear (e.g. /fast)")
    m.add_argument("backing", type=Path, help="directory holding the files (e.g. /backing)")
    m.add_argument("--buffer-size", type=_size, default=cfgmod.DEFAULT_BUFFER_SIZE,
                   metavar="SIZE", help="size of each aligned write buffer (bytes; K/M/G)")
    m.add_argument("--max-dirty", type=_size, default=cfgmod.DEFAULT_MAX_DIRTY,
                   metavar="SIZE", help="bound on all buffered data; writers wait beyond it")
    m.add_argument("--buffers-per-file", type=int, default=None, metavar="N",
                   help="buffers one file may fill at once (default: enough for 32M of the "
                   "file, at least 4, at most half of --max-dirty)")
    m.add_argument("--flush-delay", type=_positive_float, default=cfgmod.DEFAULT_FLUSH_DELAY,
                   metavar="SECONDS", help="write a partly filled buffer after this long")
    m.add_argument("--align", type=_size, default=None, metavar="SIZE",
                   help="direct-I/O alignment (default: detected from BACKING, >= 4096)")
    m.add_argument("--io-threads", type=int, default=cfgmod.DEFAULT_IO_THREADS, metavar="N",
                   help="backing writes in flight at once")
    m.add_argument("--readahead", type=_size, default=cfgmod.DEFAULT_READAHEAD,
                   metavar="SIZE", help="largest read-ahead window for sequential readers "
                   "(0 = off)")
    m.add_argument("--readahead-memory", type=_size, default=cfgmod.DEFAULT_READAHEAD_MEMORY,
                   metavar="SIZE", help="bound on read-ahead memory over all files")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users (e.g. QEMU as libvirt-qemu) use the mount; "
                   "the kernel enforces file modes")
    m.add_argument("--xattr", choices=("on", "off"), default="on",
                   help="off: extended attributes answer ENOSYS, so the kernel stops "
                   "asking for security.capability before every write(2) (small buffered "
                   "writes then go at page-cache speed); gives up POSIX ACLs, security "
                   "labels (SELinux, SMACK), file capabilities and every user.* xattr, "
                   "e.g. libvirt's remembered owners (-o xattr=off)")
    m.add_argument("--nonempty", action="store_true",
                   help="allow mounting over a non-empty MOUNTPOINT (hides its files)")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr")
    m.add_argument("--debug", action="store_true", help="log every decision")
    m.add_argument("--log", type=Path, default=None, metavar="FILE",
                   help="log to FILE (default: stderr in the foreground, syslog otherwise)")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    m.add_argument("--fault-file", type=Path, default=None, help=argparse.SUPPRESS)
    m.add_argument("--trace-writes", type=Path, default=None, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="write everything back, unmount, wait for the daemon",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="give up waiting after this long (exit 7); default: wait")

    s = sub.add_parser("stats", help="show the daemon's counters")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", type=_positive_float, nargs="?", const=1.0, default=None,
                   metavar="SECONDS", help="refresh every SECONDS (default 1) until Ctrl-C")

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

def config_from_args(ns: argparse.Namespace) -> MountConfig:
    cfg = MountConfig(
        mountpoint=Path(os.path.abspath(ns.mountpoint)),
        backing=Path(os.path.abspath(ns.backing)),
        buffer_size=ns.buffer_size, max_dirty=ns.max_dirty,
        buffers_per_file=ns.buffers_per_file, flush_delay=ns.flush_delay, align=ns.align,
        io_threads=ns.io_threads, readahead=ns.readahead,
        readahead_memory=ns.readahead_memory, allow_other=ns.allow_other,
        xattr=ns.xattr == "on", debug=ns.debug,
        log_file=ns.log, fault_file=ns.fault_file, trace_file=ns.trace_writes)
    cfg.validate()
    return cfg


def check_paths(cfg: MountConfig, nonempty: bool = False) -> tuple[ExitCode, str] | None:
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
    if not nonempty and any(os.scandir(mp)):
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
    args = [sys.executable, "-m", "alignfs", "mount", str(cfg.mountpoint), str(cfg.backing),
            "--foreground", "--ready-fd", str(ready_fd),
            "--buffer-size", str(cfg.buffer_size), "--max-dirty", str(cfg.max_dirty),
            "--buffers-per-file", str(cfg.effective_buffers_per_file),
            "--flush-delay", str(cfg.flush_delay), "--io-threads", str(cfg.io_threads),
            "--readahead", str(cfg.readahead), "--readahead-memory", str(cfg.readahead_memory),
            "--nonempty"]
    if cfg.align is not None:
        args += ["--align", str(cfg.align)]
    if cfg.allow_other:
        args.append("--allow-other")
    if not cfg.xattr:
        args += ["--xattr", "off"]
    if cfg.debug:
        args.append("--debug")
    if cfg.log_file:
        args += ["--log", str(cfg.log_file)]
    if cfg.fault_file:
        args += ["--fault-file", str(cfg.fault_file)]
    if cfg.trace_file:
        args += ["--trace-writes", str(cfg.trace_file)]
    return args


def _spawn_daemon(cfg: MountConfig) -> int:
    """Start the daemon detached; return once it is serving (or failed)."""
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
    with os.fdopen(r) as pipe:
        message = pipe.read()
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


def _run_foreground(cfg: MountConfig, ready_fd: int | None) -> int:
    from .daemon import Daemon, DaemonError

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, line.encode())
                os.close(ready_fd)
            except OSError:
                pass

    setup_logging(ready_fd is None, cfg.log_file, cfg.debug)
    daemon = Daemon(cfg, on_ready=lambda: report("OK\n"))
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
        return ExitCode.INTERNAL
    _write_status(code)
    return code


def _write_status(code: int) -> None:
    """Leave the exit code for a waiting ``alignfs umount``."""
    try:
        STATUS_DIR.mkdir(mode=0o755, exist_ok=True)
        (STATUS_DIR / f"{os.getpid()}.exit").write_text(f"{int(code)}\n")
    except OSError:
        pass


def cmd_mount(ns: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(ns)
    except ConfigError as exc:
        print(f"alignfs: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    problem = check_paths(cfg, ns.nonempty)
    if problem:
        code, text = problem
        print(f"alignfs: {text}", file=sys.stderr)
        if ns.ready_fd is not None:
            os.write(ns.ready_fd, f"ERR {int(code)} {text}\n".encode())
        return code
    if ns.foreground:
        return _run_foreground(cfg, ns.ready_fd)
    return _spawn_daemon(cfg)


# -- talking to a running daemon -------------------------------------------------

def _control_error(mountpoint: Path, exc: OSError) -> int:
    if exc.errno in (errno.EACCES, errno.EPERM):
        print(f"alignfs: permission denied: only root or the user who mounted "
              f"{mountpoint} may control it", file=sys.stderr)
        return ExitCode.PERMISSION
    if exc.errno in (errno.ENOENT, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTDIR):
        print(f"alignfs: {mountpoint} is not an alignfs mount", file=sys.stderr)
        return ExitCode.NOT_ALIGNFS
    print(f"alignfs: {mountpoint}: {exc.strerror}", file=sys.stderr)
    return ExitCode.UNWRITTEN_DATA if exc.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT) \
        else ExitCode.INTERNAL


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
        pid = int(query_stats(str(mp))["pid"])
        request(str(mp), XATTR_UMOUNT)
    except OSError as exc:
        code = _control_error(mp, exc)
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
    status = STATUS_DIR / f"{pid}.exit"
    try:
        code = int(status.read_text())
        status.unlink()
    except (OSError, ValueError):
        code = ExitCode.OK
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


STATS_ROWS = [
    ("write requests in", "write_requests", int),
    ("bytes written in", "write_bytes", format_size),
    ("backing writes out", "backing_writes", int),
    ("bytes written out", "backing_write_bytes", format_size),
    ("mean backing write", "mean_backing_write_size", format_size),
    ("unaligned backing writes", "unaligned_backing_writes", int),
    ("read-modify-write block reads", "rmw_block_reads", int),
    ("read requests in", "read_requests", int),
    ("reads answered from buffers", "reads_from_buffers", int),
    ("backing reads out", "backing_reads", int),
    ("read-ahead hits", "readahead_hits", int),
    ("bytes read ahead", "readahead_bytes", format_size),
    ("read-ahead wasted", "readahead_wasted_bytes", format_size),
    ("fsync requests", "fsyncs", int),
    ("backing fsyncs", "backing_fsyncs", int),
    ("dirty now", "dirty_bytes", format_size),
    ("dirty peak", "peak_dirty_bytes", format_size),
    ("writer wait (s)", "writer_wait_seconds", lambda v: f"{v:.3f}"),
    ("backing errors", "backing_errors", int),
]


def render_stats(stats: dict[str, Any]) -> str:
    lines = [f"alignfs {stats.get('mountpoint')} -> {stats.get('backing')} "
             f"(pid {stats.get('pid')})"]
    for label, key, fmt in STATS_ROWS:
        if key in stats:
            lines.append(f"  {label:32s} {fmt(stats[key])}")
    flushes = stats.get("flushes", {})
    lines.append("  buffer flushes by cause          " +
                 ", ".join(f"{k} {v}" for k, v in flushes.items() if v) or "none")
    return "\n".join(lines)


def cmd_stats(ns: argparse.Namespace) -> int:
    mp, refused = _live_mount(ns.mountpoint)
    if refused is not None:
        return refused
    try:
        while True:
            try:
                stats = query_stats(str(mp))
            except OSError as exc:
                return _control_error(mp, exc)
            if ns.json:
                print(json.dumps(stats, sort_keys=True), flush=True)
            else:
                if ns.watch:
                    print("\033[H\033[2J", end="")
                print(render_stats(stats), flush=True)
            if not ns.watch:
                return ExitCode.OK
            time.sleep(ns.watch)
    except KeyboardInterrupt:
        return ExitCode.OK


def cmd_flush(ns: argparse.Namespace) -> int:
    mp, refused = _live_mount(ns.mountpoint)
    if refused is not None:
        return refused
    try:
        request(str(mp), XATTR_FLUSH)
    except OSError as exc:
        return _control_error(mp, exc)
    return ExitCode.OK


# -- mount(8) helper syntax ------------------------------------------------------

def translate_mount_helper(argv: list[str]) -> list[str]:
    """``BACKING MOUNTPOINT [-o a=b,c]`` -> ``mount MOUNTPOINT BACKING --a b --c``."""
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg in ("-n", "-s", "-v"):
            continue  # mount(8) flags: no mtab, sloppy, verbose
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("mount helper usage: alignfs BACKING MOUNTPOINT [-o options]")
    backing, mountpoint = positional
    out = ["mount", mountpoint, backing]
    for opt in filter(None, options):
        key, sep, value = opt.partition("=")
        if key in IGNORED_MOUNT_OPTIONS or key.startswith(("x-", "comment=")):
            continue
        out.append("--" + key.replace("_", "-"))
        if sep:
            out.append(value)
    return out


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
