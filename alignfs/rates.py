"""Rates from two snapshots of a daemon's counters: what ``alignfs stats --watch`` prints.

The daemon only keeps cumulative counters (:class:`alignfs.stats.Stats`); a
person watching a running VM save wants to see what happens *now*, as iostat
and vmstat show it: one line per interval with MB/s in and out, requests per
second, the mean size of the writes that reached BACKING, how much is
buffered, how long writers waited, and errors. The arithmetic is here, apart
from the command's loop, so it is tested on two snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .sizes import format_size

#: (rate key, counter it is the per-second rate of)
PER_SECOND = (
    ("write_bytes_per_second", "write_bytes"),
    ("write_requests_per_second", "write_requests"),
    ("backing_write_bytes_per_second", "backing_write_bytes"),
    ("backing_writes_per_second", "backing_writes"),
    ("writer_wait_seconds_per_second", "writer_wait_seconds"),
)

#: Column headers and widths of a ``--watch`` line (the first is the clock).
COLUMNS = (
    ("time", 8),
    ("in MB/s", 8),
    ("wr/s", 7),
    ("out MB/s", 8),
    ("bk wr/s", 7),
    ("mean out", 10),
    ("dirty", 10),
    ("peak dirty", 10),
    ("wait s/s", 8),
    ("errors", 6),
)


def _delta(prev: Mapping[str, Any], cur: Mapping[str, Any], key: str, restarted: bool) -> float:
    now = cur.get(key) or 0
    before = 0 if restarted else prev.get(key) or 0
    # A counter that went down means the daemon started again from zero.
    return now - before if now >= before else now


def compute_rates(
    prev: Mapping[str, Any], cur: Mapping[str, Any], seconds: float
) -> dict[str, float | int | None]:
    """Rates over the *seconds* between two ``stats --json`` snapshots.

    Per-second rates of the byte and request counters and of the writers'
    waiting time (seconds waited per second: 0.5 = writers were blocked half
    of the time, summed over writers); the mean size of the backing writes
    made in the interval (None if there were none); the backing errors of the
    interval; and the current and peak dirty bytes. A different daemon (pid)
    or a counter that went down counts as a restart: its counters are taken
    as rising from zero.
    """
    if seconds <= 0:
        raise ValueError(f"interval must be positive, not {seconds}")
    restarted = prev.get("pid") != cur.get("pid")
    out: dict[str, float | int | None] = {}
    for rate, counter in PER_SECOND:
        out[rate] = _delta(prev, cur, counter, restarted) / seconds
    writes = _delta(prev, cur, "backing_writes", restarted)
    written = _delta(prev, cur, "backing_write_bytes", restarted)
    out["mean_backing_write_size"] = written / writes if writes else None
    out["backing_errors"] = int(_delta(prev, cur, "backing_errors", restarted))
    out["dirty_bytes"] = cur.get("dirty_bytes")
    out["peak_dirty_bytes"] = cur.get("peak_dirty_bytes")
    out["interval_seconds"] = seconds
    out["restarted"] = restarted
    return out


def header() -> str:
    return " ".join(name.rjust(width) for name, width in COLUMNS)


def _size(value: float | int | None) -> str:
    return "-" if value is None else format_size(value)


def format_line(rates: Mapping[str, Any], when: float | None = None) -> str:
    """One ``--watch`` line for *rates*, stamped with the local time *when*."""
    stamp = time.strftime("%H:%M:%S", time.localtime(when))
    cells = [
        stamp,
        f"{rates['write_bytes_per_second'] / 1e6:.1f}",
        f"{rates['write_requests_per_second']:.0f}",
        f"{rates['backing_write_bytes_per_second'] / 1e6:.1f}",
        f"{rates['backing_writes_per_second']:.1f}",
        _size(rates["mean_backing_write_size"]),
        _size(rates["dirty_bytes"]),
        _size(rates["peak_dirty_bytes"]),
        f"{rates['writer_wait_seconds_per_second']:.2f}",
        str(rates["backing_errors"]),
    ]
    return " ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))
