"""What ``alignfs stats`` prints: the table, ``--watch`` lines, ``--prometheus``.

The rows and their units come from :func:`alignfs.stats.describe`, the rates
of ``--watch`` from :mod:`alignfs.rates`, the Prometheus text from
:mod:`alignfs.prometheus`; this module asks the daemons (through
:mod:`alignfs.control_client`) and prints.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .control_client import control_error, live_mount, query_stats
from .exitcodes import ExitCode
from .mounts import is_stale, mount_entries
from .prometheus import render
from .rates import compute_rates, format_line, header
from .sizes import format_size
from .stats import describe as describe_stats

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
    """The table of ``alignfs stats``."""
    lines = [f"alignfs {stats.get('mountpoint')} -> {stats.get('backing')} "
             f"(pid {stats.get('pid')})"]
    for label, key, fmt in _stats_rows():
        if key in stats:
            lines.append(f"  {label:32s} {fmt(stats[key])}")
    flushes = stats.get("flushes", {})
    lines.append("  buffer flushes by cause          " +
                 (", ".join(f"{k} {v}" for k, v in flushes.items() if v) or "none"))
    return "\n".join(lines)


def once(mp: Path, as_json: bool) -> int:
    """``alignfs stats``: the counters since the mount, as a table or JSON."""
    stats = query_stats(str(mp))
    print(json.dumps(stats, sort_keys=True) if as_json else render_stats(stats))
    return ExitCode.OK


def watch(mp: Path, interval: float, as_json: bool, count: int | None) -> int:
    """vmstat-like: a line of rates per *interval* (header repeated every screen)."""
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


def prometheus(named: list[Path]) -> int:
    """The counters of the *named* mounts (none: of every alignfs mount) for Prometheus.

    Without names, a mount that does not answer is reported as down, not an
    error: the collector still gets a file.
    """
    if named:
        mountpoints = []
        for path in named:
            mp, refused = live_mount(str(path))
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
                return control_error(mp, exc)
            print(f"alignfs: {mp}: {exc.strerror or exc}; reported as alignfs_up 0",
                  file=sys.stderr)
            found.append((str(mp), None))
    sys.stdout.write(render(found))
    return ExitCode.OK
