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
import os
import sys
from pathlib import Path

from . import __version__, launch, stats_view
from .argtypes import positive_float
from .config import ConfigError
from .control_client import control_error, is_alignfs, live_mount, query_stats, request
from .control_protocol import XATTR_FLUSH, XATTR_UMOUNT
from .exitcodes import ExitCode, describe
from .mount_args import UsageError, add_mount_arguments, config_from_args, translate_mount_helper
from .mounts import is_stale


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"alignfs: error: {message}", file=sys.stderr)
        sys.exit(ExitCode.USAGE)


def build_parser() -> argparse.ArgumentParser:
    # pyproject.toml takes the package's version from __version__, so the
    # running code's own attribute is what an installed copy would report.
    ver = __version__
    parser = _Parser(
        prog="alignfs",
        description="FUSE passthrough filesystem that collects small, unaligned writes into "
        "large aligned O_DIRECT writes to BACKING.",
        epilog="exit codes:\n" + describe() + "\n\nAlso usable as a mount(8) helper: "
        "mount -t fuse.alignfs BACKING MOUNTPOINT -o buffer_size=8M,...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"alignfs {ver}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount BACKING at MOUNTPOINT",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit codes:\n" + describe())
    add_mount_arguments(m)
    # mount(8) users see this usage too; it says which alignfs answers.
    m.usage = (m.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%")
               + "\n       mount -t fuse.alignfs BACKING MOUNTPOINT [-o name=value,...]"
               + f"   (alignfs {ver})")

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

def cmd_mount(ns: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(ns)
    except ConfigError as exc:
        print(f"alignfs: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    problem = launch.check_paths(cfg)
    if problem:
        code, text = problem
        print(f"alignfs: {text}", file=sys.stderr)
        if cfg.ready_fd is not None:
            os.write(cfg.ready_fd, f"ERR {int(code)} {text}\n".encode())
        return code
    if cfg.foreground:
        return launch.run_foreground(cfg)
    return launch.spawn_daemon(cfg)


# -- talking to a running daemon -------------------------------------------------

def cmd_umount(ns: argparse.Namespace) -> int:
    mp = Path(os.path.abspath(ns.mountpoint))
    if is_stale(str(mp)):
        # The daemon is gone: nothing is buffered any more; remove the dead mount.
        problem = launch.remove_stale_mount(mp)
        if problem is not None:
            print(f"alignfs: cannot remove stale mount {mp}: {problem}", file=sys.stderr)
            return ExitCode.BAD_MOUNTPOINT
        print(f"alignfs: removed the stale mount at {mp} (its daemon had died; data it had "
              "not written was lost)", file=sys.stderr)
        return ExitCode.OK
    if not is_alignfs(mp):
        print(f"alignfs: {mp} is not an alignfs mount", file=sys.stderr)
        return ExitCode.NOT_ALIGNFS
    try:
        stats = query_stats(str(mp))
        pid = int(stats["pid"])
        # A daemon tells where it leaves its exit code (None: nowhere it could).
        status = stats.get("status_file", str(launch.STATUS_DIR / f"{pid}.exit"))
        request(str(mp), XATTR_UMOUNT)
    except OSError as exc:
        code = control_error(mp, exc, writes_back=True)
        if code in (ExitCode.UNWRITTEN_DATA, ExitCode.INTERNAL):
            print(f"alignfs: buffered data could not be written; {mp} stays mounted so "
                  "nothing is lost. Fix BACKING and retry.", file=sys.stderr)
            code = ExitCode.UNWRITTEN_DATA
        return code
    return launch.wait_for_exit(pid, status, ns.timeout)


def cmd_stats(ns: argparse.Namespace) -> int:
    if ns.prometheus:
        if ns.watch is not None or ns.json or ns.count is not None:
            print("alignfs: --prometheus prints once; it takes no --watch, --json or --count",
                  file=sys.stderr)
            return ExitCode.USAGE
        return stats_view.prometheus(ns.mountpoint)
    if len(ns.mountpoint) != 1:
        print("alignfs: stats takes one MOUNTPOINT (several, or none, only with --prometheus)",
              file=sys.stderr)
        return ExitCode.USAGE
    if ns.count is not None and (ns.watch is None or ns.count < 1):
        print("alignfs: --count needs --watch and a positive number", file=sys.stderr)
        return ExitCode.USAGE
    mp, refused = live_mount(ns.mountpoint[0])
    if refused is not None:
        return refused
    try:
        if ns.watch is None:
            return stats_view.once(mp, ns.json)
        return stats_view.watch(mp, ns.watch, ns.json, ns.count)
    except BrokenPipeError:
        # A reader such as head(1) went away: that is how such output ends.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except OSError as exc:
        return control_error(mp, exc)
    except KeyboardInterrupt:
        return ExitCode.OK


def cmd_flush(ns: argparse.Namespace) -> int:
    mp, refused = live_mount(ns.mountpoint)
    if refused is not None:
        return refused
    try:
        request(str(mp), XATTR_FLUSH)
    except OSError as exc:
        code = control_error(mp, exc, writes_back=True)
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
