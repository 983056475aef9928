"""The daemon's counters in the Prometheus text format (``alignfs stats --prometheus``).

For monitoring: a cron job or systemd timer writes this to node_exporter's
textfile collector directory (atomically: a temporary file, then rename), and
Prometheus scrapes it with the host's other metrics. Every field of
:class:`alignfs.stats.Stats` has an entry in :data:`METRICS` (a test checks
this against the dataclass, so a renamed counter cannot silently vanish);
counters end in ``_total``, dirty bytes and buffers are gauges, and every
sample has a ``mountpoint`` label, so one file can hold all mounts.

The text format (version 0.0.4) is written by hand rather than with
``prometheus_client``: it is a few lines of ``# HELP``/``# TYPE`` and
``name{label="value"} number``, whose only subtleties are the escapes done in
:func:`label_value` and :func:`help_text`; this keeps the package's
dependencies at pyfuse3 and trio on the hosts that mount it. The tests parse
the output back with ``prometheus_client``'s parser (a test-only dependency).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import stats as stats_fields

log = logging.getLogger(__name__)

PREFIX = "alignfs_"


@dataclass(frozen=True)
class Metric:
    """How one key of ``stats --json`` is exported."""

    key: str
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    #: for a dict of counters: the label its keys become
    label: str | None = None


def _c(key: str, help: str, name: str | None = None) -> Metric:
    return Metric(key, PREFIX + (name or key) + "_total", "counter", help)


def _g(key: str, help: str, name: str | None = None) -> Metric:
    return Metric(key, PREFIX + (name or key), "gauge", help)


def _from_stats(counter: stats_fields.Counter) -> Metric:
    if counter.key == "flushes":
        return Metric("flushes", PREFIX + "buffer_flushes_total", "counter", counter.help,
                      label="cause")
    if counter.kind == "counter":
        return _c(counter.key, counter.help)
    return _g(counter.key, counter.help)


#: One entry per field of alignfs.stats.Stats, declared there.
METRICS: tuple[Metric, ...] = tuple(_from_stats(c) for c in stats_fields.describe())

#: Settings and state of a mount that are not counters of Stats.
MOUNT_GAUGES: tuple[Metric, ...] = (
    _g("buffer_size", "Size of each write buffer (--buffer-size).", "buffer_size_bytes"),
    _g("max_dirty", "Bound on buffered data (--max-dirty).", "max_dirty_bytes"),
    _g("open_files", "Files with open handles or buffered data."),
)

UP = Metric("", PREFIX + "up", "gauge", "1 if the mount's daemon answered, 0 if not.")


def label_value(value: str) -> str:
    """A label value with backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def help_text(text: str) -> str:
    """A ``# HELP`` docstring with backslash and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def number(value: int | float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _printable(path: str) -> str:
    """A path as text even if it is not valid UTF-8 (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{label_value(v)}"' for k, v in pairs) + "}"


def render(mounts: Iterable[tuple[str, Mapping[str, Any] | None]]) -> str:
    """The exposition text for (mount point, ``stats --json`` dict or None if unreadable).

    A key missing from a dict (a daemon of an older version) is left out for
    that mount; every family is still declared once.
    """
    mounts = list(mounts)
    lines: list[str] = []
    for metric in (UP, *METRICS, *MOUNT_GAUGES):
        lines.append(f"# HELP {metric.name} {help_text(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for mountpoint, stats in mounts:
            base = [("mountpoint", _printable(mountpoint))]
            if metric is UP:
                lines.append(f"{metric.name}{_labels(base)} {0 if stats is None else 1}")
                continue
            if stats is None:
                continue
            value = stats.get(metric.key)
            if metric.label is not None and isinstance(value, Mapping):
                for sub, count in sorted(value.items()):
                    labels = _labels([*base, (metric.label, str(sub))])
                    lines.append(f"{metric.name}{labels} {number(count)}")
            elif isinstance(value, int | float):
                lines.append(f"{metric.name}{_labels(base)} {number(value)}")
            elif value is not None:
                log.warning("stats key %s is %r, not a number: left out", metric.key, value)
    return "\n".join(lines) + "\n"
