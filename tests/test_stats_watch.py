"""``alignfs stats --watch``: rates per interval, tested on two counter snapshots and live.

The rate arithmetic (:mod:`alignfs.rates`) is checked on fabricated
snapshots; a live mount checks the lines, the JSON objects and ``--count``.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_alignfs

from alignfs import rates
from alignfs.stats import Stats

MiB = 1 << 20


def snapshot(**kw: object) -> dict[str, object]:
    base = Stats().as_dict()
    base.update(pid=100, mountpoint="/fast")
    base.update(kw)
    return base


def test_rates_between_two_snapshots() -> None:
    prev = snapshot(write_bytes=100 * MiB, write_requests=800, backing_write_bytes=64 * MiB,
                    backing_writes=8, writer_wait_seconds=1.0, backing_errors=1,
                    dirty_bytes=32 * MiB, peak_dirty_bytes=40 * MiB)
    cur = snapshot(write_bytes=400 * MiB, write_requests=3200, backing_write_bytes=320 * MiB,
                   backing_writes=40, writer_wait_seconds=2.0, backing_errors=3,
                   dirty_bytes=48 * MiB, peak_dirty_bytes=80 * MiB)
    r = rates.compute_rates(prev, cur, 2.0)
    assert r["write_bytes_per_second"] == 150 * MiB
    assert r["write_requests_per_second"] == 1200
    assert r["backing_write_bytes_per_second"] == 128 * MiB
    assert r["backing_writes_per_second"] == 16
    assert r["mean_backing_write_size"] == 8 * MiB  # of this interval's writes only
    assert r["writer_wait_seconds_per_second"] == 0.5
    assert r["backing_errors"] == 2
    assert r["dirty_bytes"] == 48 * MiB and r["peak_dirty_bytes"] == 80 * MiB
    assert r["restarted"] is False
    line = rates.format_line(r, when=0)
    cells = line.split()
    assert cells[1:5] == ["157.3", "1200", "134.2", "16.0"]
    assert "8.0 MiB" in line and "48.0 MiB" in line and "80.0 MiB" in line
    assert cells[-2:] == ["0.50", "2"]
    assert len(line) == len(rates.header())  # columns line up under the header


def test_rates_idle_interval_and_restart() -> None:
    prev = snapshot(write_bytes=10 * MiB, backing_writes=5, backing_write_bytes=10 * MiB)
    idle = rates.compute_rates(prev, prev, 1.0)
    assert idle["write_bytes_per_second"] == 0 and idle["mean_backing_write_size"] is None
    assert "-" in rates.format_line(idle).split()
    # A new daemon on the same mount point: its counters count from zero.
    again = snapshot(pid=101, write_bytes=20 * MiB, backing_writes=1,
                     backing_write_bytes=8 * MiB)
    r = rates.compute_rates(prev, again, 1.0)
    assert r["restarted"] is True and r["write_bytes_per_second"] == 20 * MiB
    # A counter that went down (same pid) is taken as a restart of that counter.
    fewer = snapshot(write_bytes=3 * MiB, backing_writes=5, backing_write_bytes=10 * MiB)
    assert rates.compute_rates(prev, fewer, 1.0)["write_bytes_per_second"] == 3 * MiB
    with pytest.raises(ValueError):
        rates.compute_rates(prev, prev, 0.0)


def test_watch_lines_and_json_on_a_live_mount(mount_alignfs) -> None:
    m = mount_alignfs()
    with open(m.mountpoint / "f", "wb") as f:
        f.write(os.urandom(3 * MiB + 5))
    res = run_alignfs("stats", str(m.mountpoint), "--watch", "0.2", "--count", "3")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == rates.header() and len(lines) == 4
    assert all(len(line) == len(lines[0]) for line in lines)
    res = run_alignfs("stats", str(m.mountpoint), "--watch", "0.2", "--count", "2", "--json")
    assert res.returncode == 0, res.stderr
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(objs) == 3 and objs[0]["rates"] is None
    assert objs[0]["write_bytes"] == 3 * MiB + 5  # the cumulative counters stay
    later = objs[1]["rates"]
    assert later["write_bytes_per_second"] == 0 and 0.1 < later["interval_seconds"] < 2
    assert objs[2]["time"] > objs[1]["time"]
    # Without --watch: the cumulative view, as before.
    res = run_alignfs("stats", str(m.mountpoint))
    assert res.returncode == 0 and "bytes written in" in res.stdout


def test_watch_usage_errors(mount_alignfs) -> None:
    m = mount_alignfs()
    mp = str(m.mountpoint)
    for args in (["stats", mp, "--count", "2"], ["stats", mp, "--watch", "1", "--count", "0"]):
        res = run_alignfs(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "--count" in res.stderr


def test_stats_table_says_none_when_no_buffer_was_flushed() -> None:
    from alignfs.stats import Stats
    from alignfs.stats_view import render_stats

    table = render_stats(Stats().as_dict())
    assert table.splitlines()[-1].split() == ["buffer", "flushes", "by", "cause", "none"]
