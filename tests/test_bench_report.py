"""Median / speedup arithmetic and table + JSON rendering from fabricated results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignfs.bench import report, results
from alignfs.bench.results import RowResult, RunResult
from alignfs.bench.sysutil import GiB, MiB


def make_run(side: str, rep: int, seconds: float, **kw: object) -> RunResult:
    run = RunResult(scenario="savevm", case=f"{side}-none", side=side, rep=rep)
    run.client_seconds = seconds
    run.drain_seconds = kw.pop("drain", 0.0)  # type: ignore[assignment]
    run.payload_bytes = kw.pop("payload", GiB)  # type: ignore[assignment]
    run.throttled = True
    for key, value in kw.items():
        setattr(run, key, value)
    return run


def savevm_row() -> RowResult:
    stats = {"write_requests": 40000, "backing_writes": 260}
    return RowResult(
        scenario="savevm",
        label="savevm 1G cache=none",
        metric="time",
        direct_case="direct-none",
        alignfs_case="alignfs-none",
        direct_runs=[make_run("direct", i, s) for i, s in enumerate([210.0, 200.0, 230.0], 1)],
        alignfs_runs=[
            make_run("alignfs", i, s, drain=1.0, stats=dict(stats, backing_writes=b),
                     daemon_cpu_seconds=2.0, serving_cpu_seconds=1.25 + i / 4)
            for i, (s, b) in enumerate([(9.0, 250), (7.0, 260), (11.0, 270)], 1)
        ],
        bandwidth_limit=150 * MiB,
    )  # fmt: skip


def test_median_and_speedup_math() -> None:
    assert results.median([3.0, 1.0, 2.0]) == 2.0
    assert results.median([1.0, 2.0]) == 1.5
    assert results.median([]) is None
    assert results.speedup("time", 200.0, 8.0) == pytest.approx(25.0)
    assert results.speedup("rate", 0.8e6, 80e6) == pytest.approx(100.0)
    assert results.speedup("time", None, 8.0) is None
    assert results.speedup("rate", 0.0, 8.0) is None
    assert results.percent_of(75 * MiB, 150 * MiB) == pytest.approx(50.0)
    assert results.percent_of(75 * MiB, None) is None


def test_row_medians_use_total_time_including_drain() -> None:
    row = savevm_row()
    assert row.direct_median == 210.0
    assert row.alignfs_median == 10.0  # median client 9 s + 1 s drain
    assert row.speedup == pytest.approx(21.0)
    assert row.alignfs_rate == pytest.approx(GiB / 10.0)
    assert row.alignfs_percent_of_limit == pytest.approx(100 * (GiB / 10.0) / (150 * MiB))
    assert row.write_requests == 40000 and row.backing_writes == 260
    assert row.daemon_cpu_per_gib == pytest.approx(2.0)
    assert row.serving_cpu_per_gib == pytest.approx(1.75)


def test_first_touch_of_the_buffer_pool_is_shown_beside_the_cpu() -> None:
    row = savevm_row()
    assert row.pool_touch_per_gib is None
    assert not any("first touch" in flag for flag in row.flags)
    for run, touch in zip(row.alignfs_runs, [0.05, 0.3, 0.2], strict=True):
        run.stats = dict(run.stats, pool_touch_seconds=touch, pool_bytes=256 * MiB)
    assert row.pool_touch_per_gib == pytest.approx(0.2)  # median, per GiB of payload
    assert row.to_json()["pool_touch_cpu_seconds_per_gib"] == pytest.approx(0.2)
    assert ("CPU includes 0.20 s/GiB first touch of the daemon's 256 MiB buffer pool "
            "(once per mount)") in row.flags


def test_failed_runs_are_excluded_and_reported() -> None:
    row = savevm_row()
    bad = RunResult(scenario="savevm", case="alignfs-none", side="alignfs", rep=4, ok=False,
                    error="MountError: boom")  # fmt: skip
    row.alignfs_runs.append(bad)
    assert row.alignfs_median == 10.0
    assert "alignfs: 1/4 runs failed" in row.flags
    assert row.errors == ["alignfs rep 4: MountError: boom"]


def test_escape_flag() -> None:
    ok = make_run("direct", 1, 1.0, device_write_bytes=GiB, throttled_write_bytes=GiB)
    escaped = make_run("direct", 1, 1.0, device_write_bytes=GiB, throttled_write_bytes=GiB // 10)
    unthrottled = make_run("direct", 1, 1.0, device_write_bytes=GiB, throttled_write_bytes=0,
                           throttled=False)  # fmt: skip
    assert not ok.escaped and escaped.escaped and not unthrottled.escaped
    # Its whole (small) payload was throttled, but most of the device's bytes were not.
    escaped.payload_bytes = GiB // 10
    row = RowResult("savevm", "ref", "time", "direct-writeback", None, direct_runs=[escaped])
    assert "direct: most bytes escaped the throttle" in row.flags


def test_rate_metric_row() -> None:
    runs_d = [make_run("direct", 1, 10.0, payload=8 * MiB)]
    runs_a = [make_run("alignfs", 1, 10.0, payload=800 * MiB, drain=0.0)]
    row = RowResult("fio-4k", "fio write bs=4K 10s", "rate", "direct", "alignfs",
                    runs_d, runs_a, bandwidth_limit=150 * MiB)  # fmt: skip
    assert row.speedup == pytest.approx(100.0)
    assert report.fmt_metric("rate", row.direct_median) == "0.84 MB/s"
    assert report.fmt_metric("rate", row.alignfs_median) == "83.9 MB/s"


def test_table_rendering() -> None:
    ref = RowResult("savevm", "savevm 1G direct cache=writeback (reference)", "time",
                    "direct-writeback", None, direct_runs=[make_run("direct", 1, 3.5)])  # fmt: skip
    text = report.render_table([savevm_row(), ref])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["scenario", "direct", "alignfs", "speedup"]
    assert set(lines[1]) == {"-"}
    assert "savevm 1G cache=none" in lines[2]
    for cell in ("210.0 s", "10.0 s", "21.00x", "107 (68%)", "40,000 -> 260", "2.00 (1.75)"):
        assert cell in lines[2], cell
    assert "3.50 s" in lines[3]
    assert "x" not in lines[3].split("3.50 s")[1]  # no speedup for a reference line
    # all columns line up: "direct" header ends where the values end
    end = lines[0].index("direct") + len("direct")
    assert lines[2][:end].endswith("210.0 s") and lines[3][:end].endswith("3.50 s")


def test_skipped_side_and_missing_stats() -> None:
    row = savevm_row()
    for run in row.alignfs_runs:
        run.stats = None  # stats unavailable: the column shows "-", not a crash
    assert report.row_cells(row)[5] == "-"
    row.alignfs_runs = []
    row.skipped_sides = ["alignfs"]
    cells = report.row_cells(row)
    assert cells[2] == "skipped"
    assert cells[3] == "-"


def test_json_rendering_round_trip() -> None:
    meta = {"model": {"kind": "zram3"}, "repeat": 3}
    data = json.loads(report.render_json([savevm_row()], meta))
    assert data["meta"] == meta
    (row,) = data["rows"]
    assert row["unit"] == "s"
    assert row["direct_median"] == 210.0 and row["alignfs_median"] == 10.0
    assert row["speedup"] == pytest.approx(21.0)
    assert row["write_requests"] == 40000 and row["backing_writes"] == 260
    assert len(row["direct_runs"]) == 3 and len(row["alignfs_runs"]) == 3
    first = row["alignfs_runs"][0]
    assert first["total_seconds"] == 10.0 and first["stats"]["backing_writes"] == 250
    assert first["escaped"] is False


def test_saved_json_renders_the_same_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignfs.bench import cli

    rows = [savevm_row()]
    rows[0].notes = ["direct side: cache=none"]
    meta = {"model": {"kind": "zram3", "size": 4 * GiB, "throttle": None}, "repeat": 3}
    saved = tmp_path / "r.json"
    saved.write_text(report.render_json(rows, meta))
    loaded = [results.row_from_json(r) for r in json.loads(saved.read_text())["rows"]]
    assert report.render_table(loaded) == report.render_table(rows)
    assert cli.main(["--render", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "zram3 4G ext4, no throttle; repeat 3" in out
    assert report.render_table(rows) in out


def read_row(alignfs_seconds: float, direct_seconds: float = 170.0, **kw: object) -> RowResult:
    stats = {
        "read_requests": 32768,
        "backing_reads": 140,
        "readahead_hits": 32700,
        "readahead_bytes": GiB,
        "readahead_wasted_bytes": 8 * MiB,
        "write_requests": 0,
        "backing_writes": 0,
    }
    return RowResult(
        scenario="loadvm",
        label="loadvm 1G cache=none",
        metric="time",
        direct_case="direct-none",
        alignfs_case="alignfs-none",
        direct_runs=[make_run("direct", 1, direct_seconds)],
        alignfs_runs=[make_run("alignfs", 1, alignfs_seconds, stats=stats)],
        bandwidth_limit=150 * MiB,
        direction="read",
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_read_row_counters_and_readahead_note() -> None:
    row = read_row(7.5, target_percent=85.0)
    assert row.requests_in == 32768 and row.requests_out == 140
    assert row.readahead_bytes == GiB and row.readahead_hits == 32700
    cells = report.row_cells(row)
    assert cells[5] == "r 32,768 -> 140"
    assert "read-ahead 1,074 MB, wasted 8.4 MB" in cells[7]
    assert "target alignfs >= 85% of limit: met (91%)" in cells[7]
    text = report.render_table([savevm_row(), row])
    assert "writes/reads in -> out" in text.splitlines()[0]
    assert "40,000 -> 260" in text  # write rows keep their counters
    assert "writes/reads" not in report.render_table([savevm_row()])


def test_targets_missed_and_speedup_goal() -> None:
    slow = read_row(20.0, target_percent=85.0)
    assert slow.target_results() == ["target alignfs >= 85% of limit: MISSED (34%)"]
    rand = read_row(2.1, direct_seconds=2.0, target_speedup=1.0)
    assert rand.target_results() == ["target no slower than direct: MISSED (0.952x)"]
    ok = read_row(1.9, direct_seconds=2.0, target_speedup=1.0)
    assert ok.target_results() == ["target no slower than direct: met (1.053x)"]
    noisy = read_row(2.02, direct_seconds=2.0, target_speedup=0.97)
    assert noisy.target_results() == [
        "target no slower than direct (>= 0.97x: noise allowed): met (0.990x)"
    ]
    fast = read_row(1.0, direct_seconds=2.0, target_speedup=1.5)
    assert fast.target_results() == ["target speedup >= 1.5x: met (2.000x)"]
    no_alignfs = read_row(1.0, target_percent=85.0)
    no_alignfs.alignfs_runs = []
    assert no_alignfs.target_results() == []


def test_read_row_json_round_trip() -> None:
    row = read_row(7.5, target_percent=85.0)
    data = json.loads(report.render_json([row], {}))["rows"][0]
    assert data["direction"] == "read" and data["target_percent"] == 85.0
    assert data["read_requests"] == 32768 and data["backing_reads"] == 140
    assert data["readahead_wasted_bytes"] == 8 * MiB
    assert data["targets"] == ["target alignfs >= 85% of limit: met (91%)"]
    loaded = results.row_from_json(data)
    assert loaded.direction == "read" and loaded.target_percent == 85.0
    assert report.render_table([loaded]) == report.render_table([row])
    old = dict(data)
    for key in ("direction", "target_percent", "target_speedup"):
        del old[key]  # files written before read scenarios existed
    assert results.row_from_json(old).direction == "write"


def test_read_runs_do_not_count_the_drain_and_escape_by_reads() -> None:
    run = make_run("alignfs", 1, 2.0, drain=0.5, payload=8 * MiB, direction="read")
    assert run.total_seconds == 2.0 and run.rate == pytest.approx(4 * MiB)
    assert run.to_json()["total_seconds"] == 2.0
    assert results.run_from_json(run.to_json()).total_seconds == 2.0
    write = make_run("alignfs", 1, 2.0, drain=0.5)
    assert write.total_seconds == 2.5
    # a few KB of metadata writes do not flag a read run; uncharged reads do
    meta = make_run(
        "alignfs",
        1,
        2.0,
        direction="read",
        device_write_bytes=49152,
        throttled_write_bytes=0,
        device_read_bytes=GiB,
        throttled_read_bytes=GiB,
    )
    assert not meta.escaped
    meta.throttled_read_bytes = 0
    assert meta.escaped


def dd_row(direct_throttled: int, *, alignfs_throttled: int = 520 * MiB) -> RowResult:
    """A page-cache row: 512 MiB by dd, the direct run 0.6 s, through alignfs 4.0 s."""
    payload = 512 * MiB
    direct = make_run("direct", 1, 0.5, drain=0.1, payload=payload,
                      throttled_write_bytes=direct_throttled, device_write_bytes=payload)
    alignfs = make_run("alignfs", 1, 3.5, drain=0.5, payload=payload,
                       throttled_write_bytes=alignfs_throttled, device_write_bytes=payload,
                       stats={"write_requests": 520, "backing_writes": 70},
                       daemon_cpu_seconds=2.0)
    return RowResult("dd-4k", "dd bs=4K 512M conv=fsync", "time", "direct", "alignfs",
                     [direct], [alignfs], bandwidth_limit=150 * MiB)  # fmt: skip


def test_throttle_short_runs() -> None:
    full = make_run("direct", 1, 1.0, throttled_write_bytes=GiB + 4096)
    assert full.throttled_share == pytest.approx(1.0, abs=1e-5) and not full.throttle_short
    short = make_run("direct", 1, 1.0, throttled_write_bytes=GiB // 4)
    assert short.throttled_share == 0.25 and short.throttle_short
    assert short.to_json()["throttle_short"] is True
    assert not make_run("direct", 1, 1.0, throttled_write_bytes=0, throttled=False).throttle_short
    unknown = make_run("direct", 1, 1.0)  # a result file without the counters
    assert unknown.throttled_share is None and not unknown.throttle_short
    reads = make_run("alignfs", 1, 1.0, direction="read", throttled_write_bytes=0)
    assert reads.throttled_share is None and not reads.throttle_short


def test_short_direct_row_is_compared_with_the_limit() -> None:
    row = dd_row(32 * MiB)
    assert row.direct_short and row.speedup_basis == "limit"
    assert row.limit_bound == pytest.approx(512 / 150)
    assert row.speedup_vs_direct == pytest.approx(0.6 / 4.0)
    assert row.speedup == pytest.approx(512 / 150 / 4.0)
    assert row.speedup == pytest.approx(row.alignfs_percent_of_limit / 100)
    note = (
        "direct: 1/1 runs had as little as 6% of the payload throttled (kernel writeback "
        "escaped the throttle); speedup vs the limit (3.41 s at 150 MiB/s)"
    )
    assert note in row.flags
    assert "direct: most bytes escaped the throttle" not in row.flags
    cells = report.row_cells(row)
    assert cells[1:7] == ["0.60 s", "4.00 s", "0.85x vs limit", "134 (85%)", "520 -> 70", "4.00"]
    assert note in cells[7]
    data = json.loads(report.render_json([row], {}))["rows"][0]
    assert data["speedup_basis"] == "limit" and data["speedup"] == pytest.approx(row.speedup)
    assert data["speedup_vs_direct"] == pytest.approx(0.15)
    assert data["limit_bound"] == pytest.approx(512 / 150)
    assert data["direct_throttled_share"] == pytest.approx(1 / 16)
    assert data["direct_runs"][0]["throttle_short"] is True
    loaded = results.row_from_json(data)
    assert loaded.speedup_basis == "limit"
    assert report.render_table([loaded]) == report.render_table([row])


def test_fully_throttled_direct_row_is_compared_with_direct() -> None:
    row = dd_row(512 * MiB + 8192)
    assert not row.direct_short and row.speedup_basis == "direct"
    assert row.speedup == row.speedup_vs_direct == pytest.approx(0.15)
    assert report.row_cells(row)[3] == "0.15x"
    assert not any("throttled" in f for f in row.flags)


def test_short_alignfs_run_is_flagged_but_keeps_the_direct_basis() -> None:
    row = dd_row(512 * MiB, alignfs_throttled=100 * MiB)
    assert row.speedup_basis == "direct"
    assert row.flags == [
        "alignfs: 1/1 runs had as little as 20% of the payload throttled (kernel writeback "
        "escaped the throttle)"
    ]


def test_short_rows_without_limit_or_alignfs_side_keep_the_direct_basis() -> None:
    row = dd_row(32 * MiB)
    row.bandwidth_limit = None
    assert row.speedup_basis == "direct" and row.limit_bound is None
    assert "speedup vs the limit" not in "; ".join(row.flags)
    reference = dd_row(32 * MiB)
    reference.alignfs_case, reference.alignfs_runs = None, []
    assert reference.speedup_basis == "direct" and reference.speedup is None
    assert reference.flags[0].startswith("direct: 1/1 runs had as little as 6%")


def test_short_rate_row_is_compared_with_the_limit() -> None:
    direct = make_run("direct", 1, 10.0, payload=800 * MiB, throttled_write_bytes=80 * MiB)
    alignfs = make_run("alignfs", 1, 10.0, payload=1200 * MiB, throttled_write_bytes=1200 * MiB)
    row = RowResult("x", "rate row", "rate", "direct", "alignfs", [direct], [alignfs],
                    bandwidth_limit=150 * MiB)  # fmt: skip
    assert row.speedup_basis == "limit" and row.limit_bound == 150 * MiB
    assert row.speedup == pytest.approx(0.8)
    assert "speedup vs the limit (150 MiB/s)" in row.flags[0]
