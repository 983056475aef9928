"""Command line of ``alignfs bench``: options, presets, and the top-level flow.

Flow: parse options -> check the output paths -> set up the HDD model (and
enter its cgroup) -> run each chosen scenario -> print the table (or JSON),
write the result file and the picture -> tear everything down.  Exit status:
see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, TextIO

from ..argtypes import positive_int, size_arg
from ..exitcodes import ExitCode
from ..sizes import compact_size
from .cleanup import (
    BenchInterrupted,
    CleanupStack,
    install_signal_handlers,
    restore_signal_handlers,
)
from .figure import DEFAULT_TIMELINE_SCENARIO, build_figure_data
from .hddmodel import HddModel, Throttle
from .mount import AlignfsCommand
from .plot import PlotError, check_output
from .report import render_json, render_table
from .results import CPU_PRESSURE_WARNING, ResultFileError, RowResult, load_result
from .runner import Progress, Runner
from .scenarios import (
    BUFFERED_SCENARIOS,
    READ_SCENARIOS,
    SCENARIO_NAMES,
    WRITE_SCENARIOS,
    BenchContext,
    Scenario,
    ScenarioOptions,
    build_scenarios,
)
from .sysutil import GiB, MiB, run, which

#: Without --scenarios only the write scenarios run; the read scenarios
#: (loadvm, qemu-img-read, fio-read-4k, fio-randread-4k) and the buffered
#: producers (dd-4k, dd-64k, cp, qemu-img-convert, dd-4k-xattr-off) are chosen
#: by name: the direct side of a buffered producer measures the page cache,
#: whose write-out depends on the machine's memory and dirty limits (and may
#: escape the cgroup v1 throttle), so they are no headline, and cp /
#: qemu-img-convert need a source file as large as savevm's RAM on tmpfs.
DEFAULT_SCENARIOS = WRITE_SCENARIOS

#: Values --demo sets unless the option is given explicitly.
DEMO_PRESET: dict[str, Any] = {
    "scenarios": ["savevm", "qemu-img-bench"],
    "ram": 512 * MiB,
    "bench_size": 512 * MiB,
    "savevm_caches": ("none",),
    "repeat": 1,
}

#: Where --demo writes its result and picture unless --json-file / --plot say.
DEMO_RESULT = Path("alignfs-bench-demo.json")

#: Exit status of ``alignfs bench`` (also in its --help).
EXIT_CODES = (
    (int(ExitCode.OK), "every run succeeded"),
    (int(ExitCode.BENCH_RUN_FAILED), "a run failed (see the notes column and the logs)"),
    (int(ExitCode.USAGE), "bad command line, a --render file that is not a bench result of a "
     "version this alignfs reads, a --plot name that is not .png/.svg, an output path that "
     "cannot be written, matplotlib missing for --plot, or the benchmark could not start"),
    (128, "+ signal number: interrupted (clean-up done)"),
)

#: The HDD model's limits, each way (IOPS, bytes/s).
DEFAULT_IOPS = 200
DEFAULT_BPS = 150 * MiB

#: Defaults for options left unset (after the preset).
DEFAULTS: dict[str, Any] = {
    "scenarios": list(DEFAULT_SCENARIOS),
    "ram": GiB,
    "bench_size": GiB,
    "savevm_caches": ("none", "writeback"),
    "repeat": 3,
}


def _scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SCENARIO_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(bad) or '(none)'}; "
            f"choose from {', '.join(SCENARIO_NAMES)}"
        )
    return names


def _caches(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if "none" not in modes or any(m not in ("none", "writeback") for m in modes):
        raise argparse.ArgumentTypeError("--savevm-caches takes none or none,writeback")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignfs bench",
        description="Benchmark clients writing directly vs. through alignfs on a "
        "throttled HDD model (zram + ext4 + blkio cgroup). Needs root. Working files "
        "and mounts go under $TMPDIR (default /tmp).",
        epilog="exit status:\n" + "\n".join(
            textwrap.fill(text, 78, initial_indent=f"  {code:3d}  ", subsequent_indent=" " * 7)
            for code, text in EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(p)
    _model_options(p.add_argument_group("HDD model"))
    _size_options(p.add_argument_group("scenario sizes"))
    _alignfs_options(p.add_argument_group("alignfs"))
    _output_options(p.add_argument_group("output"))
    return p


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scenarios", type=_scenario_list, default=None, metavar="NAME,...",
        help=f"comma-separated subset of {','.join(SCENARIO_NAMES)} (default: the write "
        f"scenarios {','.join(WRITE_SCENARIOS)}; the read scenarios "
        f"{','.join(READ_SCENARIOS)} and the buffered (page-cache) producers "
        f"{','.join(BUFFERED_SCENARIOS)} run only when named)")
    p.add_argument("--repeat", type=positive_int, default=None, metavar="N",
                   help=f"runs per case; the median is reported (default {DEFAULTS['repeat']})")
    p.add_argument(
        "--demo", action="store_true",
        help=f"short preset: {compact_size(DEMO_PRESET['ram'])} savevm + "
        f"{compact_size(DEMO_PRESET['bench_size'])} qemu-img bench, cache=none, repeat "
        f"{DEMO_PRESET['repeat']}; writes the result ({DEMO_RESULT}, or --json-file) and the "
        "picture next to it (or --plot) and prints their paths (explicit options still win)")
    p.add_argument("--direct-only", action="store_true",
                   help="skip the alignfs side (e.g. to measure the model alone)")


def _model_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--iops", type=positive_int, default=DEFAULT_IOPS, metavar="N",
                   help=f"IOPS limit for reads and for writes (default {DEFAULT_IOPS})")
    bw = g.add_mutually_exclusive_group()
    bw.add_argument("--bps", type=size_arg, default=None, metavar="SIZE",
                    help="bandwidth limit per direction, bytes/s with units "
                    f"(default {compact_size(DEFAULT_BPS)})")
    bw.add_argument("--mbps", type=float, default=None,
                    help=f"bandwidth limit per direction in MiB/s (default {DEFAULT_BPS // MiB})")
    g.add_argument("--no-throttle", action="store_true", help="no blkio limits at all")
    g.add_argument("--dir", type=Path, default=None,
                   help="use this existing directory (on a real disk) instead of zram")
    g.add_argument("--model-size", type=size_arg, default=None, metavar="SIZE",
                   help="zram disk size (default: enough for the chosen sizes)")
    g.add_argument("--no-prefill", action="store_true",
                   help="do not fill the zram disk before mkfs (then a first write to a "
                   "block costs the writer several times the CPU of a rewrite)")


def _size_options(g: argparse._ArgumentGroup) -> None:
    def size(flag: str, default: int | None, help: str, shown: int | None = None) -> None:
        shown = default if shown is None else shown
        g.add_argument(flag, type=size_arg, default=default, metavar="SIZE",
                       help=f"{help} (default {compact_size(shown)})" if shown else help)

    size("--ram", None, "savevm / loadvm VM RAM size", DEFAULTS["ram"])
    size("--disk-size", 8 * GiB, "virtual size of the savevm qcow2 image")
    g.add_argument(
        "--savevm-caches", type=_caches, default=None, metavar="none[,writeback]",
        help="qemu cache modes for savevm and loadvm: none or none,writeback (default both; "
        "for loadvm, writeback adds a direct-only reference line)")
    g.add_argument(
        "--verify-loadvm", action="store_true",
        help="after each savevm, loadvm the snapshot from the backing file and compare "
        "the restored RAM byte for byte (reads it back through the throttle)")
    size("--bench-size", None, "bytes qemu-img bench writes, and qemu-img-read reads",
         DEFAULTS["bench_size"])
    g.add_argument("--bench-depth", type=positive_int, default=None, metavar="N",
                   help="qemu-img bench queue depth (default: qemu-img's)")
    g.add_argument("--fio-runtime", type=float, default=10.0, metavar="SECONDS",
                   help="seconds per fio-4k / fio-512 / fio-read-4k / fio-randread-4k run "
                   "(default 10)")
    size("--fio-size", 256 * MiB, "file size for fio-4k / fio-512")
    size("--fio-1m-size", GiB, "bytes written by fio-1m")
    size("--fio-read-size", GiB, "size of the prefilled file fio-read-4k / fio-randread-4k read")
    size("--dd-size", 512 * MiB, "bytes dd-4k / dd-64k / dd-4k-xattr-off write")
    size("--copy-size", GiB, "size of the random file cp / qemu-img-convert copy")
    g.add_argument("--ram-dir", type=Path, default=Path("/dev/shm"), metavar="DIR",
                   help="tmpfs directory for the VM's RAM file and the cp / qemu-img-convert "
                   "source (default /dev/shm)")
    g.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="seconds before a single client run is abandoned (default 3600)")


def _alignfs_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--alignfs-cmd", default=None, metavar="COMMAND",
                   help=f"command prefix for alignfs (default: '{sys.executable} -m alignfs' "
                   "with the source tree on PYTHONPATH)")
    g.add_argument("--mount-options", default="", metavar="OPTIONS",
                   help="extra arguments for 'alignfs mount', e.g. '--buffer-size 4M'")
    g.add_argument("--no-daemon-log", action="store_true",
                   help="do not pass '--log FILE' to 'alignfs mount' (daemon logs go to its "
                   "default)")


def _output_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--json", action="store_true", help="print JSON instead of the table")
    g.add_argument("--json-file", type=Path, default=None, metavar="FILE",
                   help="also write JSON to this file")
    g.add_argument("--render", type=Path, default=None, metavar="JSON_FILE",
                   help="only print the table of a result file written by --json-file (and "
                   "draw it with --plot), then exit")
    g.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="draw the picture to FILE (.png or .svg): direct vs alignfs per "
                   "scenario against the model's limit, and bytes over time of one alignfs run "
                   "(needs matplotlib: the alignfs[plot] extra)")
    g.add_argument("--plot-timeline", default=DEFAULT_TIMELINE_SCENARIO, choices=SCENARIO_NAMES,
                   metavar="SCENARIO",
                   help="scenario whose alignfs run the picture shows over time (default "
                   f"{DEFAULT_TIMELINE_SCENARIO}; else the first write scenario run)")
    g.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                   help="keep qemu/alignfs logs here (default: kept only if a run failed)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse *argv* and resolve presets and defaults."""
    args = build_parser().parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            value = DEMO_PRESET[key] if args.demo and key in DEMO_PRESET else default
            setattr(args, key, value)
    if args.mbps is not None:
        args.bps = int(args.mbps * MiB)
    elif args.bps is None:
        args.bps = DEFAULT_BPS
    if args.demo and args.render is None:
        if args.json_file is None:
            args.json_file = (
                args.plot.with_suffix(".json") if args.plot is not None else DEMO_RESULT
            )
        if args.plot is None:
            args.plot = args.json_file.with_suffix(".png")
    if args.model_size is None:
        need = 2 * max(
            args.ram, args.bench_size, args.fio_1m_size, args.fio_size, args.fio_read_size,
            args.dd_size, args.copy_size,
        )
        args.model_size = max(4 * GiB, need + GiB)
    return args


def scenario_options(args: argparse.Namespace) -> ScenarioOptions:
    return ScenarioOptions(
        ram=args.ram,
        disk_size=args.disk_size,
        savevm_caches=tuple(args.savevm_caches),
        verify_loadvm=args.verify_loadvm,
        bench_total=args.bench_size,
        bench_depth=args.bench_depth,
        fio_runtime=args.fio_runtime,
        fio_small_size=args.fio_size,
        fio_1m_size=args.fio_1m_size,
        fio_read_size=args.fio_read_size,
        dd_size=args.dd_size,
        copy_size=args.copy_size,
    )



def alignfs_command(args: argparse.Namespace) -> AlignfsCommand:
    cmd = AlignfsCommand(
        mount_options=shlex.split(args.mount_options), daemon_log=not args.no_daemon_log
    )
    if args.alignfs_cmd:
        cmd.prefix = shlex.split(args.alignfs_cmd)
    return cmd


def throttle_from(args: argparse.Namespace) -> Throttle | None:
    if args.no_throttle:
        return None
    return Throttle(
        read_iops=args.iops, write_iops=args.iops, read_bps=args.bps, write_bps=args.bps
    )


def _tool_version(argv: list[str]) -> str | None:
    if which(argv[0]) is None:
        return None
    proc = run(argv, check=False, timeout=30)
    return proc.stdout.splitlines()[0].strip() if proc.stdout else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``alignfs bench``; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    levels = {0: logging.WARNING, 1: logging.INFO}
    logging.basicConfig(
        level=levels.get(args.verbose, logging.DEBUG),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    problem = check_outputs(args)
    if problem:
        print(f"alignfs bench: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    if args.render is not None:
        return render_saved(args.render, args.plot, args.plot_timeline)
    if os.geteuid() != 0:
        print(
            "alignfs bench: must run as root (zram, cgroups, mounts, drop_caches)", file=sys.stderr
        )
        return ExitCode.USAGE
    previous = install_signal_handlers()
    try:
        return _run(args)
    except BenchInterrupted as exc:
        msg = f"{exc}; clean-up done (errors, if any, are shown above)"
        print(f"alignfs bench: {msg}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        restore_signal_handlers(previous)


def check_outputs(args: argparse.Namespace) -> str | None:
    """Why the picture or result file could not be written, checked before any run."""
    if args.plot is not None:
        try:
            check_output(args.plot)
        except PlotError as exc:
            return str(exc)
    if args.json_file is not None and args.render is None:
        if args.json_file.is_dir():
            return f"cannot write the result to {args.json_file}: it is a directory"
        try:
            with tempfile.NamedTemporaryFile(dir=args.json_file.parent, prefix=".check-"):
                pass
        except OSError as exc:
            return f"cannot write the result to {args.json_file}: {exc.strerror or exc}"
    return None


def write_plot(
    rows: list[RowResult], meta: dict[str, Any], path: Path, timeline: str, stream: TextIO
) -> int:
    """Draw the picture and print its path to *stream*. Returns an exit status."""
    from .plot import draw  # matplotlib is loaded only here

    try:
        draw(build_figure_data(rows, meta, timeline), path)
    except (OSError, PlotError) as exc:
        print(f"alignfs bench: cannot write the picture {path}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"picture: {path.resolve()}", file=stream)
    return ExitCode.OK


def render_saved(path: Path, plot: Path | None = None,
                 timeline: str = DEFAULT_TIMELINE_SCENARIO) -> int:
    """Print the header and table of a saved ``--json-file`` result (and draw it)."""
    try:
        meta, rows = load_result(path)
    except ResultFileError as exc:
        print(f"alignfs bench: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(_header(meta))
    print(render_table(rows))
    if plot is not None:
        return write_plot(rows, meta, plot, timeline, sys.stdout)
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    runnable, skipped = _runnable(build_scenarios(args.scenarios, scenario_options(args)))
    if not runnable:
        print("alignfs bench: nothing to run", file=sys.stderr)
        return ExitCode.USAGE
    cmd = alignfs_command(args)
    unavailable = "--direct-only" if args.direct_only else cmd.available()
    if unavailable and not args.direct_only:
        print(f"alignfs bench: alignfs side will fail: {unavailable}", file=sys.stderr)
    rows, meta = _run_all(args, runnable, cmd, unavailable, skipped)

    text = render_json(rows, meta)
    if args.json_file:
        args.json_file.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(_header(meta))
        print(render_table(rows))
        for msg in skipped:
            print(f"({msg})")
    # With --json, stdout is the JSON alone: the paths go to stderr.
    paths_to = sys.stderr if args.json else sys.stdout
    if args.json_file:
        print(f"result: {args.json_file.resolve()}", file=paths_to)
    if args.plot is not None:
        code = write_plot(rows, meta, args.plot, args.plot_timeline, paths_to)
        if code != ExitCode.OK:
            return code
    return ExitCode.BENCH_RUN_FAILED if _any_failed(rows) else ExitCode.OK


def _runnable(scenarios: list[Scenario]) -> tuple[list[Scenario], list[str]]:
    """The scenarios whose tools are installed, and why the others are skipped."""
    runnable, skipped = [], []
    for sc in scenarios:
        missing = sc.missing_tools()
        if missing:
            msg = f"skipping scenario {sc.name}: {', '.join(missing)} not installed"
            print(f"alignfs bench: {msg}", file=sys.stderr)
            skipped.append(msg)
        else:
            runnable.append(sc)
    return runnable, skipped


class _LogKeeper:
    """At clean-up, copies the runs' logs out of the work directory that is
    about to go: to --log-dir, else (unless every run succeeded) to $TMPDIR."""

    def __init__(self, logs: Path, log_dir: Path | None) -> None:
        self.logs = logs
        self.log_dir = log_dir
        #: cleared once every run succeeded (an interrupted bench keeps its logs)
        self.keep = True

    def __call__(self) -> None:
        kept = Path(tempfile.gettempdir()) / f"bench-logs-{os.getpid()}"
        target = self.log_dir or (kept if self.keep else None)
        if target is not None and any(self.logs.iterdir()):
            shutil.copytree(self.logs, target, dirs_exist_ok=True)
            print(f"alignfs bench: logs kept in {target}", file=sys.stderr)


def _run_all(args: argparse.Namespace, runnable: list[Scenario], cmd: AlignfsCommand,
             unavailable: str | None, skipped: list[str]) -> tuple[list[RowResult], dict[str, Any]]:
    """Set up the HDD model and run every case; the rows and the run's metadata."""
    rows: list[RowResult] = []
    with CleanupStack("bench-main") as stack:
        workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        stack.push(f"remove {workdir}", lambda: shutil.rmtree(workdir, ignore_errors=True))
        (workdir / "logs").mkdir()
        ram_dir = args.ram_dir / f"bench-{os.getpid()}"
        stack.push(f"remove {ram_dir}", lambda: shutil.rmtree(ram_dir, ignore_errors=True))
        keeper = _LogKeeper(workdir / "logs", args.log_dir)
        stack.push("keep logs", keeper)
        with HddModel(
            throttle=throttle_from(args),
            size=args.model_size,
            directory=args.dir,
            workdir=workdir,
            prefill=not args.no_prefill,
        ) as model:
            ctx = BenchContext(
                workdir=workdir,
                ram_dir=ram_dir,
                logical_block_size=model.logical_block_size,
                timeout=args.timeout,
            )
            runner = Runner(model, ctx, cmd, repeat=args.repeat, alignfs_unavailable=unavailable)
            if args.direct_only:
                runner.sides = {"direct"}
            runner.progress = Progress(total=runner.count_runs(runnable), enabled=not args.quiet)
            for sc in runnable:
                rows.extend(runner.run_scenario(sc))
            meta = _meta(args, model, cmd, skipped)
            runs = [run_ for r in rows for run_ in r.direct_runs + r.alignfs_runs]
            meta["max_loadavg_1m"] = max(
                (run_.extra.get("loadavg_1m", 0.0) for run_ in runs), default=None)
            meta["max_cpu_pressure"] = max(
                (run_.extra["cpu_pressure"] for run_ in runs if "cpu_pressure" in run_.extra),
                default=None)
        keeper.keep = _any_failed(rows)
    return rows, meta


def _any_failed(rows: list[RowResult]) -> bool:
    return any(not run_.ok for r in rows for run_ in r.direct_runs + r.alignfs_runs)


def _meta(
    args: argparse.Namespace, model: HddModel, cmd: AlignfsCommand, skipped: list[str]
) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "model": model.describe(),
        "throttled": args.no_throttle is False,
        "repeat": args.repeat,
        "scenarios": args.scenarios,
        "sizes": {
            "ram": args.ram,
            "bench_size": args.bench_size,
            "fio_runtime": args.fio_runtime,
            "fio_size": args.fio_size,
            "fio_1m_size": args.fio_1m_size,
            "fio_read_size": args.fio_read_size,
            "dd_size": args.dd_size,
            "copy_size": args.copy_size,
        },
        "alignfs_command": cmd.prefix,
        "mount_options": cmd.mount_options,
        "qemu": _tool_version(["qemu-system-x86_64", "--version"]),
        "qemu_img": _tool_version(["qemu-img", "--version"]),
        "fio": _tool_version(["fio", "--version"]),
        "skipped": skipped,
    }


def _header(meta: dict[str, Any]) -> str:
    model = meta.get("model") or {}
    thr = model.get("throttle")
    if thr:
        limit = f"{thr['write_iops']} IOPS, {thr['write_bps'] / MiB:g} MiB/s each way"
    else:
        limit = "no throttle"
    size = f" {compact_size(model['size'])} ext4" if model.get("size") else ""
    text = (
        f"alignfs bench -- model: {model.get('kind', '?')}{size}, {limit}; "
        f"repeat {meta.get('repeat', '?')}, median shown; kernel {meta.get('kernel', '?')}"
    )
    cost = model.get("write_cpu_per_gib")
    if cost is not None:
        filled = "filled before mkfs" if model.get("prefilled") else "NOT pre-filled"
        text += (
            f"\nmodel disk {filled}; writing to it costs the writer {cost:.2f} CPU s/GiB "
            "(zram compression), included in CPU s/GiB"
        )
    pressure = meta.get("max_cpu_pressure")
    if pressure is not None and pressure > CPU_PRESSURE_WARNING:
        text += (
            f"\nwarning: CPUs were contended (tasks waited for a CPU during up to "
            f"{pressure:.0%} of a run, /proc/pressure/cpu); CPU-bound numbers are pessimistic"
        )
    return text
