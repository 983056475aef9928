"""The benchmark picture: its data (tested without drawing), the PNG/SVG files, bad input.

The data tests pin what a person reads off the picture: one pair of bars per
table row in MB/s, the measured values written on them, the speedup, the HDD
model's limit, and the timeline of one alignfs run taken from its counter
samples. One test draws both formats from a small saved result.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import alignfs_env

from alignfs.bench import cli, figure, report, results
from alignfs.bench.results import RowResult, RunResult
from alignfs.bench.sampler import COLUMNS
from alignfs.bench.sysutil import MiB

PAYLOAD = 512 * MiB


def timeline() -> dict[str, object]:
    """One sample per second: the client writes 100 MiB/s for 5 s, BACKING trails by 32 MiB."""
    samples = []
    for t in range(8):
        client = min(t * 100 * MiB, PAYLOAD)
        backing = max(0, min(client - 32 * MiB, PAYLOAD)) if t < 6 else PAYLOAD
        samples.append([float(t), client, backing, client - backing, t * 4000, t * 10, 0, 0])
    return {"interval": 1.0, "columns": list(COLUMNS), "samples": samples,
            "events": {"client_done": 5.2, "durable": 6.5}}


def run(side: str, seconds: float, *, scenario: str = "savevm", payload: int = PAYLOAD,
        **kw: object) -> RunResult:
    r = RunResult(scenario=scenario, case=f"{side}-x", side=side, rep=1,
                  client_seconds=seconds, drain_seconds=0.0, payload_bytes=payload,
                  throttled=True)
    for key, value in kw.items():
        setattr(r, key, value)
    return r


def rows() -> list[RowResult]:
    stats = {"write_requests": 4093, "backing_writes": 64, "backing_write_bytes": 64 * 8 * MiB}
    return [
        RowResult("savevm", "savevm 512M cache=none", "time", "direct-none", "alignfs-none",
                  direct_runs=[run("direct", 80.0)],
                  alignfs_runs=[run("alignfs", 4.0, stats=stats, timeline=timeline())],
                  bandwidth_limit=150 * MiB),
        RowResult("savevm", "savevm 512M direct cache=writeback (reference)", "time",
                  "direct-writeback", None, direct_runs=[run("direct", 5.0)],
                  bandwidth_limit=150 * MiB),
        RowResult("fio-4k", "fio write 4K O_DIRECT", "rate", "direct-4k", "alignfs-4k",
                  direct_runs=[run("direct", 10.0, scenario="fio-4k", payload=8_200_000)],
                  alignfs_runs=[run("alignfs", 10.0, scenario="fio-4k", payload=475_000_000)],
                  bandwidth_limit=150 * MiB),
    ]  # fmt: skip


META = {"date": "2026-11-27T10:00:00+00:00", "repeat": 1, "cpus": 2, "kernel": "6.1",
        "model": {"kind": "zram", "size": 4 << 30,
                  "throttle": {"write_iops": 200, "write_bps": 150 * MiB}}}


def save(path: Path) -> Path:
    path.write_text(report.render_json(rows(), META))
    return path


def test_pairs_are_mb_per_second_with_measured_values_and_speedup() -> None:
    data = figure.build_figure_data(rows(), META)
    assert [p.label for p in data.pairs] == [r.label for r in rows()]
    savevm, reference, fio = data.pairs
    assert savevm.direct_mbps == pytest.approx(PAYLOAD / 80.0 / 1e6)
    assert savevm.alignfs_mbps == pytest.approx(PAYLOAD / 4.0 / 1e6)
    assert savevm.direct_text == "80.0 s (6.7 MB/s)"
    assert savevm.alignfs_text == "4.00 s (134 MB/s)"
    assert savevm.speedup_text == "20x"
    assert reference.alignfs_mbps is None and reference.alignfs_text == ""
    assert reference.speedup_text == ""
    assert fio.direct_text == "0.82 MB/s" and fio.alignfs_text == "47.5 MB/s"
    assert fio.speedup_text == "58x"
    assert data.limits == [pytest.approx(150 * MiB / 1e6)]
    assert "200 IOPS, 150 MiB/s" in data.title and "2026-11-27" in data.subtitle
    assert "contended" not in data.subtitle
    busy = figure.build_figure_data(rows(), dict(META, max_cpu_pressure=0.55))
    assert "CPUs were contended (tasks waited for a CPU during up to 55% of a run)" \
        in busy.subtitle


def test_timeline_series_come_from_the_samples() -> None:
    data = figure.build_figure_data(rows(), META)
    tl = data.timeline
    assert tl is not None and data.no_timeline == ""
    assert tl.seconds == [float(t) for t in range(8)]
    assert tl.client_mb[1] == pytest.approx(100 * MiB / 1e6)
    assert tl.backing_mb[1] == pytest.approx(68 * MiB / 1e6)
    assert tl.client_mb[-1] == tl.backing_mb[-1] == pytest.approx(PAYLOAD / 1e6)
    assert tl.events == {"client_done": 5.2, "durable": 6.5}
    assert tl.limit_mbps == pytest.approx(150 * MiB / 1e6)
    assert tl.dirty_mb[1] == pytest.approx(32 * MiB / 1e6) and tl.dirty_mb[-1] == 0
    assert tl.summary == (
        "4,093 client writes -> 64 backing writes (537 MB, 8.0 MiB each on average)")
    assert tl.title.startswith("savevm 512M cache=none through alignfs")


def test_timeline_choice_and_its_absence() -> None:
    rs = rows()
    # Another scenario asked for but not sampled: the first sampled write row.
    data = figure.build_figure_data(rs, META, timeline_scenario="fio-4k")
    assert data.timeline is not None and data.timeline.title.startswith("savevm")
    rs[0].alignfs_runs[0].timeline = None  # e.g. a version 1 result file
    data = figure.build_figure_data(rs, META)
    assert data.timeline is None and "no counter samples" in data.no_timeline


def test_speedup_against_the_limit_says_so() -> None:
    """A direct page-cache run that escaped the throttle: alignfs is compared with the limit."""
    row = RowResult("dd-4k", "dd bs=4K 512M conv=fsync", "time", "direct", "alignfs",
                    direct_runs=[run("direct", 0.5, throttled_write_bytes=PAYLOAD // 8)],
                    alignfs_runs=[run("alignfs", 4.0, throttled_write_bytes=PAYLOAD)],
                    bandwidth_limit=150 * MiB)  # fmt: skip
    (pair,) = figure.build_pairs([row])
    assert pair.speedup_text == "0.85x vs limit"
    row.direct_runs[0].throttled_write_bytes = PAYLOAD
    assert figure.build_pairs([row])[0].speedup_text == "0.12x"


def test_failed_side_is_labelled() -> None:
    rs = rows()
    rs[2].alignfs_runs[0].ok = False
    fio = figure.build_figure_data(rs, META).pairs[2]
    assert fio.alignfs_mbps is None and fio.alignfs_text == "failed"
    assert fio.speedup_text == ""


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert raw.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def svg_texts(path: Path) -> str:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return "\n".join("".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text"))


def test_render_draws_png_and_svg_with_every_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    saved = save(tmp_path / "r.json")
    for name in ("bench.png", "bench.svg"):
        out = tmp_path / name
        assert cli.main(["--render", str(saved), "--plot", str(out)]) == 0
        assert f"picture: {out}" in capsys.readouterr().out
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    width, height = png_size(tmp_path / "bench.png")
    assert width >= 800 and height >= 300
    from PIL import Image

    with Image.open(tmp_path / "bench.png") as img:
        img.verify()
    text = svg_texts(tmp_path / "bench.svg")
    for row in rows():
        assert row.label in text
    for needle in ("20x", "58x", "HDD model limit 157 MB/s", "80.0 s (6.7 MB/s)",
                   "written by the client into alignfs", "reached BACKING",
                   "durable (umount returned) 6.5 s", "4,093 client writes"):
        assert needle in text, needle


@pytest.mark.parametrize("name", ["bench.pdf", "bench", "bench.PNG.txt"])
def test_unknown_plot_extension_is_a_usage_error(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = save(tmp_path / "r.json")
    assert cli.main(["--render", str(saved), "--plot", str(tmp_path / name)]) == 2
    assert "name it .png or .svg" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_unwritable_plot_path_fails_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    # No --render: this would be a benchmark run; the path is refused first.
    assert cli.main(["--plot", str(tmp_path / "missing" / "b.png")]) == 2
    assert "cannot write the picture" in capsys.readouterr().err
    (tmp_path / "d.png").mkdir()
    assert cli.main(["--plot", str(tmp_path / "d.png")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli.main(["--demo", "--json-file", str(tmp_path / "nodir" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the picture" in err or "cannot write the result" in err


def test_demo_writes_the_picture_next_to_its_result() -> None:
    args = cli.parse_args(["--demo"])
    assert args.json_file == cli.DEMO_RESULT and args.plot == cli.DEMO_RESULT.with_suffix(".png")
    args = cli.parse_args(["--demo", "--json-file", "/x/r.json"])
    assert args.plot == Path("/x/r.png")
    args = cli.parse_args(["--demo", "--plot", "/y/p.svg"])
    assert args.json_file == Path("/y/p.json") and args.plot == Path("/y/p.svg")
    assert cli.parse_args([]).plot is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"format": "alignfs-bench-result", "version": 99, "rows": []}, "format version 99"),
        ({"format": "something-else", "version": 2, "rows": []}, "not an alignfs bench result"),
        ({"hello": "world"}, "not an alignfs bench result"),
        ([1, 2, 3], "not an alignfs bench result"),
        ({"rows": [{"label": "no scenario"}]}, "not an alignfs bench result"),
        ("not json at all", "is not JSON"),
    ],
)
def test_bad_result_files_are_refused(
    tmp_path: Path, content: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    assert cli.main(["--render", str(bad)]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(results.ResultFileError):
        results.load_result(bad)


def test_version_1_result_still_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(report.render_json(rows(), META))
    del data["format"], data["version"]
    for row in data["rows"]:
        for r in row["alignfs_runs"] + row["direct_runs"]:
            del r["timeline"]
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(data))
    meta, loaded = results.load_result(old)
    assert meta["repeat"] == 1 and [r.label for r in loaded] == [r.label for r in rows()]
    assert figure.build_figure_data(loaded, meta).timeline is None
    assert cli.main(["--render", str(old)]) == 0
    assert "savevm 512M cache=none" in capsys.readouterr().out


def test_result_file_is_versioned_and_keeps_the_timeline() -> None:
    data = json.loads(report.render_json(rows(), META))
    assert data["format"] == results.RESULT_FORMAT and data["version"] == results.RESULT_VERSION
    run_json = data["rows"][0]["alignfs_runs"][0]
    assert run_json["timeline"]["columns"] == list(COLUMNS)
    assert results.run_from_json(run_json).timeline == timeline()


def test_no_matplotlib_on_the_mount_path_or_without_plot() -> None:
    code = (
        "import sys, alignfs.cli, alignfs.daemon, alignfs.bench.cli, alignfs.bench.figure, "
        "alignfs.bench.plot\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'numpy', 'PIL', 'prometheus_client'))\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=alignfs_env())
