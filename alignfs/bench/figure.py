"""What the benchmark picture shows, as plain data (no drawing, no matplotlib).

``alignfs bench --plot FILE`` draws two panels; this module decides every
number, label and line in them, so it can be tested without drawing
(:mod:`alignfs.bench.plot` only lays them out):

* *pairs*: per table row, direct vs. alignfs as payload MB/s until the data is
  durable (for time scenarios that is payload / seconds; the bar's text says
  the seconds), the HDD model's bandwidth limit as a line, the speedup
  written on each pair (``vs limit`` where the direct runs escaped the
  throttle: see :attr:`~alignfs.bench.results.RowResult.speedup_basis`);
* *timeline*: for one alignfs run of a write scenario (savevm by default),
  bytes the client has written vs. bytes that reached BACKING over time,
  from the daemon's counters sampled during the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..sizes import format_size
from .report import fmt_metric
from .results import CPU_PRESSURE_WARNING, RowResult, RunResult

log = logging.getLogger(__name__)

#: Scenario whose alignfs run the timeline shows unless told otherwise.
DEFAULT_TIMELINE_SCENARIO = "savevm"

MB = 1e6

#: Labels of the timeline's event markers.
EVENT_LABELS = {"client_done": "client done", "durable": "durable (umount returned)"}


@dataclass
class Pair:
    """One table row as two bars."""

    label: str
    direct_mbps: float | None
    alignfs_mbps: float | None
    #: what is written at the end of each bar (the measured value)
    direct_text: str
    alignfs_text: str
    #: ``"18x"`` (``"0.87x vs limit"``); empty when one side is missing
    speedup_text: str
    #: the HDD model's bandwidth limit for this row in MB/s (None: unthrottled)
    limit_mbps: float | None


@dataclass
class Timeline:
    """Cumulative bytes over time of one alignfs run."""

    title: str
    seconds: list[float]
    client_mb: list[float]
    backing_mb: list[float]
    #: buffered in alignfs at each sample (not the gap between the two lines:
    #: bytes a client rewrites while they are buffered reach BACKING once)
    dirty_mb: list[float]
    #: clock values (seconds since the client started) of the run's events
    events: dict[str, float]
    limit_mbps: float | None
    #: one line summing up the run's requests in and out
    summary: str


@dataclass
class FigureData:
    title: str
    subtitle: str
    pairs: list[Pair]
    #: distinct bandwidth limits (MB/s) drawn as lines
    limits: list[float]
    timeline: Timeline | None
    #: why there is no timeline (shown in its place)
    no_timeline: str = ""
    bar_axis_label: str = "MB/s until the data is durable (higher is better)"


def fmt_speedup(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 10:
        return f"{value:.0f}x"
    if value >= 1:
        return f"{value:.1f}x"
    return f"{value:.2f}x"


def _side_text(row: RowResult, side: str, value: float | None, rate: float | None) -> str:
    if side in row.skipped_sides:
        return "skipped"
    if value is None:
        return "failed"
    if row.metric == "time":
        return f"{fmt_metric('time', value)} ({fmt_metric('rate', rate)})"
    return fmt_metric("rate", value)


def _speedup_text(row: RowResult) -> str:
    if not (row.direct_case and row.alignfs_case):
        return ""
    text = fmt_speedup(row.speedup)
    return f"{text} vs limit" if text and row.speedup_basis == "limit" else text


def build_pairs(rows: Sequence[RowResult]) -> list[Pair]:
    pairs = []
    for row in rows:
        direct_rate = row.direct_rate if row.direct_case else None
        alignfs_rate = row.alignfs_rate if row.alignfs_case else None
        pairs.append(
            Pair(
                label=row.label,
                direct_mbps=None if direct_rate is None else direct_rate / MB,
                alignfs_mbps=None if alignfs_rate is None else alignfs_rate / MB,
                direct_text=(
                    _side_text(row, "direct", row.direct_median, direct_rate)
                    if row.direct_case else ""
                ),
                alignfs_text=(
                    _side_text(row, "alignfs", row.alignfs_median, alignfs_rate)
                    if row.alignfs_case else ""
                ),
                speedup_text=_speedup_text(row),
                limit_mbps=None if not row.bandwidth_limit else row.bandwidth_limit / MB,
            )
        )
    return pairs


def _usable_timeline(run: RunResult) -> bool:
    tl = run.timeline
    return (
        run.ok
        and isinstance(tl, dict)
        and isinstance(tl.get("samples"), list)
        and len(tl["samples"]) >= 2
    )


def pick_timeline_run(
    rows: Sequence[RowResult], scenario: str = DEFAULT_TIMELINE_SCENARIO
) -> tuple[RowResult, RunResult] | None:
    """The row and alignfs run whose timeline to show.

    The first row of *scenario* with sampled alignfs runs, else the first
    write row with any; of its runs the median by total time.
    """
    candidates = [r for r in rows if r.scenario == scenario] + [
        r for r in rows if r.scenario != scenario and r.direction == "write"
    ]
    for row in candidates:
        runs = [r for r in row.alignfs_runs if _usable_timeline(r)]
        if runs:
            runs.sort(key=lambda r: r.total_seconds or 0.0)
            return row, runs[(len(runs) - 1) // 2]
    return None


def _column(samples: list[list[Any]], columns: list[str], name: str) -> list[float | None]:
    if name not in columns:
        return [None] * len(samples)
    i = columns.index(name)
    return [s[i] if i < len(s) and isinstance(s[i], int | float) else None for s in samples]


def build_timeline(row: RowResult, run: RunResult) -> Timeline:
    tl = run.timeline or {}
    columns = list(tl.get("columns", []))
    samples = list(tl.get("samples", []))
    t = _column(samples, columns, "t")
    client = _column(samples, columns, "write_bytes")
    backing = _column(samples, columns, "backing_write_bytes")
    dirty = _column(samples, columns, "dirty_bytes")
    points = [
        (ti, ci / MB, bi / MB, (di or 0) / MB)
        for ti, ci, bi, di in zip(t, client, backing, dirty, strict=True)
        if ti is not None and ci is not None and bi is not None
    ]
    stats: Mapping[str, Any] = run.stats or {}
    summary = ""
    writes_in, writes_out = stats.get("write_requests"), stats.get("backing_writes")
    in_bytes, out_bytes = stats.get("write_bytes"), stats.get("backing_write_bytes")
    if isinstance(writes_in, int) and isinstance(writes_out, int):
        summary = f"{writes_in:,} client writes"
        if isinstance(in_bytes, int):
            summary += f" ({in_bytes / MB:,.0f} MB)"
        summary += f" -> {writes_out:,} backing writes"
        if writes_out and isinstance(out_bytes, int):
            summary += (f" ({out_bytes / MB:,.0f} MB, "
                        f"{format_size(out_bytes / writes_out)} each on average)")
            if isinstance(in_bytes, int) and in_bytes > 1.05 * out_bytes:
                summary += ("\nbytes the client rewrote while they were buffered "
                            "reached BACKING once")
    interval = tl.get("interval")
    every = f"\n(the daemon's counters, sampled every {interval * 1000:.0f} ms)" if interval else ""
    rep = f" (run {run.rep})" if run.rep else ""
    events = {k: float(v) for k, v in dict(tl.get("events", {})).items()
              if isinstance(v, int | float)}
    return Timeline(
        title=f"{row.label} through alignfs{rep}: bytes over time{every}",
        seconds=[p[0] for p in points],
        client_mb=[p[1] for p in points],
        backing_mb=[p[2] for p in points],
        dirty_mb=[p[3] for p in points],
        events=events,
        limit_mbps=None if not row.bandwidth_limit else row.bandwidth_limit / MB,
        summary=summary,
    )


def _titles(meta: Mapping[str, Any]) -> tuple[str, str]:
    model = meta.get("model") or {}
    thr = model.get("throttle") if isinstance(model, dict) else None
    if thr:
        limit = f"{thr['write_iops']} IOPS, {thr['write_bps'] / (1 << 20):g} MiB/s each way"
        title = f"alignfs bench: direct vs. through alignfs on an HDD model ({limit})"
    else:
        title = "alignfs bench: direct vs. through alignfs (no throttle)"
    parts = []
    if meta.get("date"):
        parts.append(str(meta["date"])[:10])
    if meta.get("repeat"):
        parts.append(f"median of {meta['repeat']} run(s)" if meta["repeat"] != 1 else "1 run")
    if meta.get("cpus"):
        parts.append(f"{meta['cpus']} CPUs")
    if meta.get("kernel"):
        parts.append(f"kernel {meta['kernel']}")
    parts.append("time includes fsync and alignfs umount (until durable)")
    subtitle = "; ".join(parts)
    pressure = meta.get("max_cpu_pressure")
    if isinstance(pressure, int | float) and pressure > CPU_PRESSURE_WARNING:
        subtitle += (f"\nCPUs were contended (tasks waited for a CPU during up to "
                     f"{pressure:.0%} of a run): alignfs numbers are pessimistic")
    return title, subtitle


def build_figure_data(
    rows: Sequence[RowResult],
    meta: Mapping[str, Any],
    timeline_scenario: str = DEFAULT_TIMELINE_SCENARIO,
) -> FigureData:
    """Everything the picture shows for a result's *rows* and *meta*."""
    title, subtitle = _titles(meta)
    pairs = build_pairs(rows)
    limits = sorted({p.limit_mbps for p in pairs if p.limit_mbps is not None})
    picked = pick_timeline_run(rows, timeline_scenario)
    timeline = build_timeline(*picked) if picked else None
    no_timeline = ""
    if timeline is None:
        no_timeline = ("no counter samples in this result (no alignfs run of a write "
                       "scenario, or a result file from before they were recorded)")
    elif picked and picked[0].scenario != timeline_scenario:
        log.info("no samples for %s; showing %s", timeline_scenario, picked[0].scenario)
    return FigureData(
        title=title,
        subtitle=subtitle,
        pairs=pairs,
        limits=limits,
        timeline=timeline,
        no_timeline=no_timeline,
    )
