"""Sampling a running daemon's counters while a scenario runs.

The table shows where a run ended; the benchmark picture shows how it got
there: bytes the client has written against bytes that have reached BACKING,
about ten times a second, so the buffering and the large write-outs behind
the writer are visible. A thread polls the same counters ``alignfs stats
--json`` prints and keeps a few of them per sample; :meth:`CounterSampler.timeline`
turns them into the JSON-friendly record stored with the run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Samples per second while a scenario runs.
DEFAULT_INTERVAL = 0.1

#: Counters kept per sample (after the time ``t`` in seconds).
COUNTERS = (
    "write_bytes",
    "backing_write_bytes",
    "dirty_bytes",
    "write_requests",
    "backing_writes",
    "read_bytes",
    "backing_read_bytes",
)
COLUMNS = ("t", *COUNTERS)

Query = Callable[[], Mapping[str, Any] | None]


class CounterSampler:
    """Calls *query* every *interval* seconds on a thread, from :meth:`start` to :meth:`stop`.

    *query* returns the daemon's counters, or None / raises OSError when it
    cannot (the mount is going away): such a tick is simply skipped.
    """

    def __init__(
        self,
        query: Query,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.query = query
        self.interval = interval
        self.clock = clock
        self.samples: list[tuple[float, Mapping[str, Any]]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take the first sample now, then one per interval on a thread."""
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="counter-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def add(self, when: float, stats: Mapping[str, Any] | None) -> None:
        """Record a snapshot taken elsewhere (e.g. the final ``stats`` of a run)."""
        if stats is not None:
            self.samples.append((when, stats))
            self.samples.sort(key=lambda s: s[0])

    def _loop(self) -> None:
        due = self.clock() + self.interval
        # Wait for the next tick on the schedule, not interval after the last
        # sample: a slow answer must not stretch the spacing.
        while not self._stop.wait(max(0.0, due - self.clock())):
            self._sample()
            due += self.interval
            now = self.clock()
            if due < now:  # fell behind (a long stall): skip the missed ticks
                due = now + self.interval

    def _sample(self) -> None:
        try:
            stats = self.query()
        except (OSError, ValueError) as exc:
            self.failures += 1
            log.debug("counter sample failed: %s", exc)
            return
        self.add(self.clock(), stats)

    def timeline(self, origin: float, events: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The samples as a JSON-friendly table, times in seconds since *origin*.

        *events* (clock values, e.g. ``{"client_done": ..., "durable": ...}``)
        are stored relative to *origin* too. Counters a daemon did not report
        are stored as None.
        """
        rows = []
        for when, stats in self.samples:
            row: list[float | int | None] = [round(when - origin, 3)]
            for key in COUNTERS:
                value = stats.get(key)
                row.append(value if isinstance(value, int | float) else None)
            rows.append(row)
        return {
            "interval": self.interval,
            "columns": list(COLUMNS),
            "samples": rows,
            "events": {k: round(v - origin, 3) for k, v in (events or {}).items()},
        }
