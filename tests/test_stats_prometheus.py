"""``alignfs stats --prometheus``: the text format, parsed back, and on live mounts.

The output is parsed with prometheus_client's parser (a test-only
dependency), not compared as strings, and every field of
``alignfs.stats.Stats`` must come out of it, so a renamed counter cannot
silently vanish from monitoring.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from conftest import run_alignfs

from alignfs import prometheus
from alignfs.mounts import is_stale
from alignfs.stats import FLUSH_CAUSES, Stats

parser = pytest.importorskip("prometheus_client.parser")

MiB = 1 << 20


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def metric_family(name: str) -> str:
    """Family name as the parser reports it (counters lose their _total)."""
    return name[: -len("_total")] if name.endswith("_total") else name


def test_every_stats_field_is_exported() -> None:
    keys = [m.key for m in prometheus.METRICS]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(Stats))
    assert len(set(keys)) == len(keys)


def test_prometheus_output_parses_back_with_every_field() -> None:
    stats = Stats()
    for n, f in enumerate(dataclasses.fields(Stats), start=1):
        if f.name != "flushes":
            setattr(stats, f.name, n * 1000 + (0.25 if f.type in ("float", float) else 0))
    stats.flushes = {cause: i + 1 for i, cause in enumerate(FLUSH_CAUSES)}
    data = stats.as_dict()
    data.update(pid=1, mountpoint="/fast", buffer_size=8 * MiB, max_dirty=256 * MiB,
                open_files=2)
    other = dict(data, dirty_bytes=7)
    text = prometheus.render([("/fast", data), ("/other", other), ("/dead", None)])
    fams = families(text)
    for metric in prometheus.METRICS:
        fam = fams[metric_family(metric.name)]
        assert fam.type == metric.kind, metric.name  # type: ignore[attr-defined]
        if metric.kind == "counter":
            assert metric.name.endswith("_total")
        samples = [s for s in fam.samples if s.labels["mountpoint"] == "/fast"]  # type: ignore
        if metric.label:
            got = {s.labels[metric.label]: s.value for s in samples}
            assert got == {c: float(v) for c, v in stats.flushes.items()}
        else:
            assert [s.name for s in samples] == [metric.name]
            assert samples[0].value == pytest.approx(getattr(stats, metric.key))
    for name in ("alignfs_dirty_bytes", "alignfs_buffers_in_use", "alignfs_peak_dirty_bytes"):
        assert fams[name].type == "gauge"  # type: ignore[attr-defined]
    up = {s.labels["mountpoint"]: s.value for s in fams["alignfs_up"].samples}  # type: ignore
    assert up == {"/fast": 1.0, "/other": 1.0, "/dead": 0.0}
    dirty = {s.labels["mountpoint"]: s.value
             for s in fams["alignfs_dirty_bytes"].samples}  # type: ignore[attr-defined]
    assert dirty == {"/fast": float(data["dirty_bytes"]), "/other": 7.0}
    buffer_size = fams["alignfs_buffer_size_bytes"].samples  # type: ignore[attr-defined]
    assert [s.value for s in buffer_size] == [8 * MiB, 8 * MiB]


def test_label_values_and_help_are_escaped() -> None:
    weird = '/mnt/a "quoted" dir\\with\nnewline'
    text = prometheus.render([(weird, Stats().as_dict())])
    fams = families(text)
    (sample,) = fams["alignfs_up"].samples  # type: ignore[attr-defined]
    assert sample.labels == {"mountpoint": weird}
    assert prometheus.help_text("a\\b\nc") == "a\\\\b\\nc"
    # Every sample line is one line: the newline in the label is escaped.
    assert all(line.startswith(("#", "alignfs_")) for line in text.splitlines())


def test_prometheus_number_format() -> None:
    assert prometheus.number(3) == "3"
    assert prometheus.number(0.1) == "0.1"
    assert prometheus.number(float("inf")) == "+Inf"
    assert prometheus.number(True) == "1"


def test_prometheus_on_live_mounts(mount_alignfs) -> None:
    a = mount_alignfs(name="a")
    b = mount_alignfs(name="b")
    (a.mountpoint / "f").write_bytes(b"x" * 5000)
    res = run_alignfs("stats", "--prometheus", str(a.mountpoint), str(b.mountpoint))
    assert res.returncode == 0, res.stderr
    fams = families(res.stdout)
    written = {s.labels["mountpoint"]: s.value
               for s in fams["alignfs_write_bytes"].samples}  # type: ignore[attr-defined]
    assert written == {str(a.mountpoint): 5000.0, str(b.mountpoint): 0.0}
    # No MOUNTPOINT: every alignfs mount of the machine (others' too).
    res = run_alignfs("stats", "--prometheus")
    assert res.returncode == 0, res.stderr
    up = {s.labels["mountpoint"]: s.value
          for s in families(res.stdout)["alignfs_up"].samples}  # type: ignore[attr-defined]
    assert up[str(a.mountpoint)] == 1.0 and up[str(b.mountpoint)] == 1.0


def test_prometheus_usage_errors(mount_alignfs, tmp_path) -> None:
    m = mount_alignfs()
    mp = str(m.mountpoint)
    for args in (["stats"], ["stats", mp, mp], ["stats", "--prometheus", "--watch", "1"],
                 ["stats", "--prometheus", "--json"]):
        res = run_alignfs(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr
    res = run_alignfs("stats", "--prometheus", mp, str(tmp_path))
    assert res.returncode == 8 and "not an alignfs mount" in res.stderr
    assert res.stdout == ""


def test_dead_daemon_is_reported_down_and_the_rest_still_written(mount_alignfs) -> None:
    live = mount_alignfs(name="live")
    dead = mount_alignfs(name="dead")
    pid = dead.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not is_stale(str(dead.mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert is_stale(str(dead.mountpoint))
    try:
        res = run_alignfs("stats", "--prometheus")
        assert res.returncode == 0, res.stderr
        assert str(dead.mountpoint) in res.stderr and "alignfs_up 0" in res.stderr
        fams = families(res.stdout)
        up = {s.labels["mountpoint"]: s.value
              for s in fams["alignfs_up"].samples}  # type: ignore[attr-defined]
        assert up[str(dead.mountpoint)] == 0.0 and up[str(live.mountpoint)] == 1.0
        written = {s.labels["mountpoint"]
                   for s in fams["alignfs_write_bytes"].samples}  # type: ignore[attr-defined]
        assert str(live.mountpoint) in written and str(dead.mountpoint) not in written
        # Named, the dead mount is an error, as for 'alignfs stats'.
        res = run_alignfs("stats", "--prometheus", str(dead.mountpoint))
        assert res.returncode == 4 and res.stdout == ""
    finally:
        assert run_alignfs("umount", str(dead.mountpoint)).returncode == 0


def test_bench_and_watch_keys_are_stats_fields() -> None:
    """The bench's stored counters and the sampler's name Stats fields that exist."""
    from alignfs.bench import mount, sampler

    fields = {f.name for f in dataclasses.fields(Stats)} | {"mean_backing_write_size"}
    assert set(mount.STAT_KEYS) <= fields
    assert set(sampler.COUNTERS) <= fields
