"""Sampling the daemon's counters during a run (the picture's timeline)."""

from __future__ import annotations

import itertools
import time

from alignfs.bench.sampler import COLUMNS, CounterSampler


def test_samples_on_a_schedule_and_skips_failed_ticks() -> None:
    ticks = itertools.count()

    def query() -> dict[str, int] | None:
        n = next(ticks)
        if n == 3:
            raise OSError("mount going away")
        if n == 4:
            return None
        return {"write_bytes": n * 100, "backing_write_bytes": n * 50, "dirty_bytes": 7}

    sampler = CounterSampler(query, interval=0.02)
    origin = time.monotonic()
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    count = next(ticks)
    time.sleep(0.05)
    assert next(ticks) == count + 1  # stopped: nothing polls any more
    assert sampler.failures == 1
    assert count - 2 == len(sampler.samples) >= 6
    tl = sampler.timeline(origin, {"durable": origin + 1.5})
    assert tl["columns"] == list(COLUMNS) and tl["interval"] == 0.02
    assert tl["events"] == {"durable": 1.5}
    times = [row[0] for row in tl["samples"]]
    assert times == sorted(times) and 0 <= times[0] < 0.05
    first = dict(zip(COLUMNS, tl["samples"][0], strict=True))
    assert first["write_bytes"] == 0 and first["dirty_bytes"] == 7
    assert first["backing_writes"] is None  # not reported by this "daemon"
    assert tl["samples"][-1][1] > tl["samples"][1][1]


def test_added_snapshot_is_kept_in_time_order() -> None:
    sampler = CounterSampler(lambda: None, interval=1.0, clock=lambda: 10.0)
    sampler.add(12.0, {"write_bytes": 2})
    sampler.add(11.0, {"write_bytes": 1})
    sampler.add(13.0, None)
    tl = sampler.timeline(10.0)
    assert [row[:2] for row in tl["samples"]] == [[1.0, 1], [2.0, 2]]
