"""Result records and the arithmetic on them (medians, speedups, percentages).

A :class:`RunResult` is one execution of one client on one side (direct or
through alignfs).  A :class:`RowResult` pairs the repeated runs of a direct
case with those of an alignfs case and derives the numbers the table shows.

Every scenario has a *metric*: ``"time"`` (seconds until the data is
durable; lower is better) or ``"rate"`` (payload bytes per second over the
same interval; higher is better).  The speedup is always "how many times
better alignfs is", so > 1 means alignfs wins for either metric.

A throttled write run whose payload was not all charged to the throttle is
*short* (:attr:`RunResult.throttle_short`): the page cache handed the rest to
the disk by kernel writeback, which cgroup v1 does not throttle, so its time
is not the model's.  A row whose direct runs are short compares alignfs with
the bandwidth limit instead (:attr:`RowResult.speedup_basis`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DIRECT = "direct"
ALIGNFS = "alignfs"

#: What a result file (``--json-file``) says it is, and the newest version of
#: its layout this code reads and writes. Version 1 files (before the
#: counter timelines) carry neither key and are still read.
RESULT_FORMAT = "alignfs-bench-result"
RESULT_VERSION = 2

#: Share of a run's time with some task waiting for a CPU above which the
#: table's header and the picture warn.
CPU_PRESSURE_WARNING = 0.25

#: A run whose throttled bytes are below this share of the device's bytes is
#: flagged: most of its I/O went past the throttle (kernel writeback).
ESCAPE_FLAG_SHARE = 0.5

#: A throttled write run is short when fewer bytes than this share of its
#: payload were charged to the throttle (some slack: the payload is a count of
#: the client's bytes, the throttle's is of whole blocks).
SHORT_FLAG_SHARE = 0.99


@dataclass
class RunResult:
    """One execution of one case."""

    scenario: str
    case: str
    side: str
    rep: int
    ok: bool = True
    error: str | None = None
    client_seconds: float | None = None
    drain_seconds: float | None = None
    payload_bytes: int | None = None
    throttled_write_bytes: int | None = None
    throttled_read_bytes: int | None = None
    device_write_bytes: int | None = None
    device_read_bytes: int | None = None
    throttled: bool = False
    stats: dict[str, Any] | None = None
    daemon_cpu_seconds: float | None = None
    #: the part of ``daemon_cpu_seconds`` spent on the thread serving FUSE
    #: requests; the rest is backing I/O on worker threads.
    serving_cpu_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``"write"`` or ``"read"``.  A read run has no data to make durable: its
    #: drain (the alignfs umount) is recorded but not part of the measured time.
    direction: str = "write"
    #: alignfs runs: the daemon's counters sampled during the run (see
    #: :mod:`alignfs.bench.sampler`); None for direct runs and old result files.
    timeline: dict[str, Any] | None = None

    @property
    def drain_counted(self) -> bool:
        return self.direction != "read"

    @property
    def total_seconds(self) -> float | None:
        """Client time plus the time to make its data durable (fsync / umount).

        For a read run only the client time: there is nothing to make durable.
        """
        if self.client_seconds is None:
            return None
        drain = (self.drain_seconds or 0.0) if self.drain_counted else 0.0
        return self.client_seconds + drain

    @property
    def rate(self) -> float | None:
        """Payload bytes per second over :attr:`total_seconds`."""
        total = self.total_seconds
        if not total or self.payload_bytes is None:
            return None
        return self.payload_bytes / total

    def metric(self, kind: str) -> float | None:
        return self.total_seconds if kind == "time" else self.rate

    @property
    def escaped(self) -> bool:
        """True if most bytes the device handled in the run's direction were not
        charged to the throttle (writes: kernel writeback; reads: should not happen)."""
        if self.direction == "read":
            device, charged = self.device_read_bytes, self.throttled_read_bytes
        else:
            device, charged = self.device_write_bytes, self.throttled_write_bytes
        if not self.throttled or not device:
            return False
        return (charged or 0) < ESCAPE_FLAG_SHARE * device

    @property
    def throttled_share(self) -> float | None:
        """Bytes charged to the throttle over the payload (write runs)."""
        if self.direction == "read" or not self.payload_bytes:
            return None
        if self.throttled_write_bytes is None:
            return None
        return self.throttled_write_bytes / self.payload_bytes

    @property
    def throttle_short(self) -> bool:
        """True if a throttled write run had fewer bytes charged to the throttle
        than it wrote: the rest reached the disk unthrottled, by kernel writeback."""
        share = self.throttled_share
        return self.throttled and share is not None and share < SHORT_FLAG_SHARE

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_seconds"] = self.total_seconds
        data["rate"] = self.rate
        data["escaped"] = self.escaped
        data["throttle_short"] = self.throttle_short
        return data


def median(values: list[float]) -> float | None:
    """Median of the values, None for an empty list."""
    return statistics.median(values) if values else None


def speedup(kind: str, direct: float | None, alignfs: float | None) -> float | None:
    """How many times better alignfs is than direct (> 1: alignfs is faster)."""
    if direct is None or alignfs is None or direct <= 0 or alignfs <= 0:
        return None
    return direct / alignfs if kind == "time" else alignfs / direct


def percent_of(rate: float | None, limit: float | None) -> float | None:
    """*rate* as a percentage of *limit* (both bytes/s); None if either is unknown."""
    if rate is None or not limit:
        return None
    return 100.0 * rate / limit


@dataclass
class RowResult:
    """One table line: a direct case against an alignfs case."""

    scenario: str
    label: str
    metric: str
    direct_case: str | None
    alignfs_case: str | None
    direct_runs: list[RunResult] = field(default_factory=list)
    alignfs_runs: list[RunResult] = field(default_factory=list)
    bandwidth_limit: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped_sides: list[str] = field(default_factory=list)
    #: ``"write"`` or ``"read"``: which alignfs counters the row shows and
    #: which bandwidth limit :attr:`bandwidth_limit` is.
    direction: str = "write"
    #: Goal: alignfs reaches at least this percentage of the bandwidth limit.
    target_percent: float | None = None
    #: Goal: :attr:`speedup` is at least this (1.0: alignfs no slower than direct).
    target_speedup: float | None = None

    @staticmethod
    def _median(runs: list[RunResult], fn: Any) -> float | None:
        return median([v for v in (fn(r) for r in runs if r.ok) if v is not None])

    @property
    def direct_median(self) -> float | None:
        return self._median(self.direct_runs, lambda r: r.metric(self.metric))

    @property
    def alignfs_median(self) -> float | None:
        return self._median(self.alignfs_runs, lambda r: r.metric(self.metric))

    @property
    def direct_short(self) -> bool:
        """Some direct run had part of its payload go past the throttle."""
        return any(r.throttle_short for r in self.direct_runs if r.ok)

    @property
    def limit_bound(self) -> float | None:
        """The best a direct run could measure with all of its payload throttled:
        the payload's seconds at the bandwidth limit (time rows) or the limit (rate rows)."""
        if self.direction == "read" or not self.bandwidth_limit:
            return None
        if self.metric != "time":
            return self.bandwidth_limit
        payload = self._median(self.direct_runs, lambda r: r.payload_bytes)
        return None if not payload else payload / self.bandwidth_limit

    @property
    def speedup_basis(self) -> str:
        """``"direct"``: :attr:`speedup` compares alignfs with the direct runs;
        ``"limit"``: with :attr:`limit_bound`, because the direct runs were short."""
        if self.alignfs_case and self.direct_short and self.limit_bound is not None:
            return "limit"
        return "direct"

    @property
    def speedup_vs_direct(self) -> float | None:
        """alignfs against the measured direct runs, whatever the basis."""
        return speedup(self.metric, self.direct_median, self.alignfs_median)

    @property
    def speedup(self) -> float | None:
        """How many times better alignfs is than the :attr:`speedup_basis`."""
        if self.speedup_basis == "limit":
            return speedup(self.metric, self.limit_bound, self.alignfs_median)
        return self.speedup_vs_direct

    def _throttled_share(self, runs: list[RunResult]) -> float | None:
        return self._median(runs, lambda r: r.throttled_share)

    @property
    def alignfs_rate(self) -> float | None:
        return self._median(self.alignfs_runs, lambda r: r.rate)

    @property
    def direct_rate(self) -> float | None:
        return self._median(self.direct_runs, lambda r: r.rate)

    @property
    def alignfs_percent_of_limit(self) -> float | None:
        return percent_of(self.alignfs_rate, self.bandwidth_limit)

    def _stat_median(self, key: str) -> float | None:
        def get(r: RunResult) -> float | None:
            value = (r.stats or {}).get(key)
            return float(value) if isinstance(value, int | float) else None

        return self._median(self.alignfs_runs, get)

    @property
    def write_requests(self) -> float | None:
        return self._stat_median("write_requests")

    @property
    def backing_writes(self) -> float | None:
        return self._stat_median("backing_writes")

    @property
    def read_requests(self) -> float | None:
        return self._stat_median("read_requests")

    @property
    def backing_reads(self) -> float | None:
        return self._stat_median("backing_reads")

    @property
    def requests_in(self) -> float | None:
        """Client requests alignfs received in this row's direction (median)."""
        return self.read_requests if self.direction == "read" else self.write_requests

    @property
    def requests_out(self) -> float | None:
        """Requests alignfs sent to the backing file in this row's direction (median)."""
        return self.backing_reads if self.direction == "read" else self.backing_writes

    @property
    def readahead_bytes(self) -> float | None:
        return self._stat_median("readahead_bytes")

    @property
    def readahead_wasted_bytes(self) -> float | None:
        return self._stat_median("readahead_wasted_bytes")

    @property
    def readahead_hits(self) -> float | None:
        return self._stat_median("readahead_hits")

    def target_results(self) -> list[str]:
        """One line per goal of the row: what it is, met or MISSED, and the value."""
        out = []
        if self.target_percent is not None and self.alignfs_case:
            pct = self.alignfs_percent_of_limit
            if pct is not None:
                verdict = "met" if pct >= self.target_percent else "MISSED"
                out.append(
                    f"target alignfs >= {self.target_percent:g}% of limit: {verdict} ({pct:.0f}%)"
                )
        if self.target_speedup is not None and self.direct_case and self.alignfs_case:
            sp = self.speedup
            if sp is not None:
                verdict = "met" if sp >= self.target_speedup else "MISSED"
                t = self.target_speedup
                if t == 1.0:
                    goal = "no slower than direct"
                elif t < 1.0:
                    goal = f"no slower than direct (>= {t:g}x: noise allowed)"
                else:
                    goal = f"speedup >= {t:g}x"
                out.append(f"target {goal}: {verdict} ({sp:.3f}x)")
        return out

    def _cpu_per_gib(self, seconds: Callable[[RunResult], float | None]) -> float | None:
        """Median over the alignfs runs of *seconds* of CPU per GiB of payload."""
        def get(r: RunResult) -> float | None:
            cpu = seconds(r)
            if cpu is None or not r.payload_bytes:
                return None
            return cpu / (r.payload_bytes / (1 << 30))

        return self._median(self.alignfs_runs, get)

    @property
    def daemon_cpu_per_gib(self) -> float | None:
        return self._cpu_per_gib(lambda r: r.daemon_cpu_seconds)

    @property
    def pool_touch_per_gib(self) -> float | None:
        """The part of :attr:`daemon_cpu_per_gib` spent faulting in the
        daemon's buffer pool as it grew: paid once per buffer per mount, so a
        fresh mount per run charges it to every run's few GiB."""
        def touch(r: RunResult) -> float | None:
            value = (r.stats or {}).get("pool_touch_seconds")
            return float(value) if isinstance(value, int | float) else None

        return self._cpu_per_gib(touch)

    @property
    def pool_bytes(self) -> float | None:
        return self._stat_median("pool_bytes")

    @property
    def serving_cpu_per_gib(self) -> float | None:
        """CPU s/GiB of the daemon's request-serving thread alone."""
        return self._cpu_per_gib(lambda r: r.serving_cpu_seconds)

    @property
    def errors(self) -> list[str]:
        out = []
        for r in self.direct_runs + self.alignfs_runs:
            if not r.ok and r.error:
                out.append(f"{r.side} rep {r.rep}: {r.error}")
        return out

    @property
    def flags(self) -> list[str]:
        """Short warnings for the table's notes column."""
        out = list(self.notes) + self.target_results()
        touch, pool = self.pool_touch_per_gib, self.pool_bytes
        if touch is not None and touch >= 0.05 and pool:
            out.append(f"CPU includes {touch:.2f} s/GiB first touch of the daemon's "
                       f"{pool / (1 << 20):.0f} MiB buffer pool (once per mount)")
        ahead = self.readahead_bytes
        if self.direction == "read" and ahead:
            wasted = self.readahead_wasted_bytes or 0
            out.append(f"read-ahead {ahead / 1e6:,.0f} MB, wasted {wasted / 1e6:,.1f} MB")
        for side, runs in ((DIRECT, self.direct_runs), (ALIGNFS, self.alignfs_runs)):
            short = [r for r in runs if r.ok and r.throttle_short]
            if short:
                out.append(self._short_note(side, short))
            elif any(r.escaped for r in runs if r.ok):
                out.append(f"{side}: most bytes escaped the throttle")
            failed = sum(1 for r in runs if not r.ok)
            if failed:
                out.append(f"{side}: {failed}/{len(runs)} runs failed")
            for r in runs:
                for note in r.notes:
                    if note not in out:
                        out.append(note)
        return out

    def _short_note(self, side: str, short: list[RunResult]) -> str:
        """``direct: 2/3 runs had as little as 6% of the payload throttled ...``."""
        ok = sum(1 for r in (self.direct_runs if side == DIRECT else self.alignfs_runs) if r.ok)
        least = min(r.throttled_share or 0.0 for r in short)
        text = (
            f"{side}: {len(short)}/{ok} runs had as little as {least:.0%} of the payload "
            "throttled (kernel writeback escaped the throttle)"
        )
        if side == DIRECT and self.speedup_basis == "limit":
            bound = self.limit_bound
            assert bound is not None and self.bandwidth_limit
            limit = f"{self.bandwidth_limit / (1 << 20):g} MiB/s"
            text += (
                f"; speedup vs the limit ({bound:.2f} s at {limit})" if self.metric == "time"
                else f"; speedup vs the limit ({limit})"
            )
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "label": self.label,
            "metric": self.metric,
            "unit": "s" if self.metric == "time" else "B/s",
            "direct_case": self.direct_case,
            "alignfs_case": self.alignfs_case,
            "direct_median": self.direct_median,
            "alignfs_median": self.alignfs_median,
            "speedup": self.speedup,
            "speedup_basis": self.speedup_basis,
            "speedup_vs_direct": self.speedup_vs_direct,
            "limit_bound": self.limit_bound,
            "direct_throttled_share": self._throttled_share(self.direct_runs),
            "alignfs_throttled_share": self._throttled_share(self.alignfs_runs),
            "direct_rate": self.direct_rate,
            "alignfs_rate": self.alignfs_rate,
            "bandwidth_limit": self.bandwidth_limit,
            "alignfs_percent_of_limit": self.alignfs_percent_of_limit,
            "write_requests": self.write_requests,
            "backing_writes": self.backing_writes,
            "direction": self.direction,
            "read_requests": self.read_requests,
            "backing_reads": self.backing_reads,
            "readahead_hits": self.readahead_hits,
            "readahead_bytes": self.readahead_bytes,
            "readahead_wasted_bytes": self.readahead_wasted_bytes,
            "target_percent": self.target_percent,
            "target_speedup": self.target_speedup,
            "targets": self.target_results(),
            "daemon_cpu_seconds_per_gib": self.daemon_cpu_per_gib,
            "serving_cpu_seconds_per_gib": self.serving_cpu_per_gib,
            "pool_touch_cpu_seconds_per_gib": self.pool_touch_per_gib,
            "pool_bytes": self.pool_bytes,
            "notes": self.notes,
            "skipped_sides": self.skipped_sides,
            "flags": self.flags,
            "errors": self.errors,
            "direct_runs": [r.to_json() for r in self.direct_runs],
            "alignfs_runs": [r.to_json() for r in self.alignfs_runs],
        }


def run_from_json(data: dict[str, Any]) -> RunResult:
    """Inverse of :meth:`RunResult.to_json` (derived keys are recomputed, not read)."""
    names = {f.name for f in fields(RunResult)}
    return RunResult(**{k: v for k, v in data.items() if k in names})


def row_from_json(data: dict[str, Any]) -> RowResult:
    """Inverse of :meth:`RowResult.to_json`, for re-rendering a saved result file."""
    return RowResult(
        scenario=data["scenario"],
        label=data["label"],
        metric=data["metric"],
        direct_case=data.get("direct_case"),
        alignfs_case=data.get("alignfs_case"),
        direct_runs=[run_from_json(r) for r in data.get("direct_runs", [])],
        alignfs_runs=[run_from_json(r) for r in data.get("alignfs_runs", [])],
        bandwidth_limit=data.get("bandwidth_limit"),
        notes=list(data.get("notes", [])),
        skipped_sides=list(data.get("skipped_sides", [])),
        direction=data.get("direction", "write"),
        target_percent=data.get("target_percent"),
        target_speedup=data.get("target_speedup"),
    )


class ResultFileError(Exception):
    """A result file that cannot be used: unreadable, not a result, or another version."""


def load_result(path: Path) -> tuple[dict[str, Any], list[RowResult]]:
    """The meta data and rows of a saved result file (any version up to ours).

    Raises :class:`ResultFileError` with a message for the user.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ResultFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ResultFileError(f"{path} is not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ResultFileError(f"{path} is not an alignfs bench result (no list of rows)")
    fmt = data.get("format", RESULT_FORMAT)
    if fmt != RESULT_FORMAT:
        raise ResultFileError(f"{path} is not an alignfs bench result (format {fmt!r})")
    version = data.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= RESULT_VERSION:
        raise ResultFileError(
            f"{path} is an alignfs bench result of format version {version!r}; this alignfs "
            f"reads versions 1 to {RESULT_VERSION} (written by another alignfs version)"
        )
    try:
        rows = [row_from_json(r) for r in data["rows"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ResultFileError(f"{path} is not an alignfs bench result (bad row: {exc!r})") from exc
    meta = data.get("meta")
    return (meta if isinstance(meta, dict) else {}), rows
