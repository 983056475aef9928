"""Rendering results: a plain-text table for people, JSON for machines.

Table columns:

``direct`` / ``alignfs``
    median of the repeats: seconds until durable (time scenarios) or MB/s
    (rate scenarios, 1 MB = 10^6 bytes);
``speedup``
    how many times better alignfs is (> 1: alignfs wins); ``vs limit`` when
    the direct runs were short of throttled bytes (page-cache writeback past
    the cgroup v1 throttle): then alignfs is compared with the payload at the
    bandwidth limit, and the notes say how much was throttled;
``alignfs MB/s (% limit)``
    alignfs payload throughput, and its share of the model's bandwidth limit
    in the scenario's direction (none without a throttle);
``writes in -> out``
    alignfs ``write_requests`` -> ``backing_writes`` (medians); for read
    scenarios ``read_requests`` -> ``backing_reads``, marked ``r`` (the header
    then says ``writes/reads``);
``CPU s/GiB``
    alignfs daemon CPU seconds per GiB of payload, and in brackets the part
    spent on the thread that serves FUSE requests (the rest is backing I/O on
    worker threads). On the zram model the worker threads' part includes the
    model's own write cost (the header shows it), which a disk would not
    charge to the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .results import RESULT_FORMAT, RESULT_VERSION, RowResult

HEADERS = (
    "scenario",
    "direct",
    "alignfs",
    "speedup",
    "alignfs MB/s (% limit)",
    "writes in -> out",
    "CPU s/GiB",
    "notes",
)


def fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "time":
        return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s"
    mb = value / 1e6
    return f"{mb:.0f} MB/s" if mb >= 100 else f"{mb:.2f} MB/s" if mb < 1 else f"{mb:.1f} MB/s"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}"


def fmt_speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_row_speedup(row: RowResult) -> str:
    """The speedup cell: ``21.00x``, or ``0.87x vs limit`` against the bandwidth limit."""
    text = fmt_speedup(row.speedup)
    if row.speedup is not None and row.speedup_basis == "limit":
        text += " vs limit"
    return text


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def fmt_alignfs_rate(row: RowResult) -> str:
    """``140 (89%)``: alignfs MB/s and its share of the bandwidth limit."""
    rate = row.alignfs_rate
    if rate is None:
        return "-"
    pct = row.alignfs_percent_of_limit
    mb = rate / 1e6
    text = f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"
    return text if pct is None else f"{text} ({fmt_percent(pct)})"


def fmt_cpu(total: float | None, serving: float | None) -> str:
    if total is None:
        return "-"
    return f"{total:.2f}" if serving is None else f"{total:.2f} ({serving:.2f})"


def row_cells(row: RowResult) -> list[str]:
    if row.alignfs_case is None:
        writes = ""
    elif row.requests_in is None and row.requests_out is None:
        writes = "-"
    else:
        writes = f"{fmt_count(row.requests_in)} -> {fmt_count(row.requests_out)}"
        if row.direction == "read":
            writes = "r " + writes
    cpu = row.daemon_cpu_per_gib
    notes = row.flags
    if row.errors:
        notes = notes + [row.errors[0][:120]]

    def side(case: str | None, name: str, value: float | None) -> str:
        if case is None:
            return ""
        return "skipped" if name in row.skipped_sides else fmt_metric(row.metric, value)

    return [
        row.label,
        side(row.direct_case, "direct", row.direct_median),
        side(row.alignfs_case, "alignfs", row.alignfs_median),
        fmt_row_speedup(row) if row.direct_case and row.alignfs_case else "",
        fmt_alignfs_rate(row) if row.alignfs_case else "",
        writes,
        fmt_cpu(cpu, row.serving_cpu_per_gib) if row.alignfs_case else "-",
        "; ".join(notes),
    ]


def render_table(rows: Sequence[RowResult]) -> str:
    """Fixed-width text table, one line per row, notes column last and unpadded."""
    headers = list(HEADERS)
    if any(r.direction == "read" for r in rows):
        headers[5] = "writes/reads in -> out"
    cells = [headers] + [row_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS) - 1)]
    right = {1, 2, 3, 4, 5, 6}
    out = []
    for n, line in enumerate(cells):
        parts = []
        for i, cell in enumerate(line[:-1]):
            parts.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        out.append(("  ".join(parts) + "  " + line[-1]).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def render_json(rows: Sequence[RowResult], meta: dict[str, Any]) -> str:
    """All rows with their individual runs, plus *meta* (model, options, versions).

    The file says what it is (``format``) and its layout's ``version``
    (:data:`~alignfs.bench.results.RESULT_VERSION`), so ``--render`` can refuse
    a file it would misread.
    """
    return json.dumps(
        {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "meta": meta,
            "rows": [r.to_json() for r in rows],
        },
        indent=2,
    )
