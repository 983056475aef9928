"""The buffered-producer scenarios (dd, cp, qemu-img convert through the page cache).

Commands are checked as built, and run against a fake ``run`` that does what
the client would (write the file, print dd's summary): no real client runs,
no HDD model, no mount.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignfs.bench import cli, runner, scenarios
from alignfs.bench.hddmodel import IoCounters, Throttle
from alignfs.bench.mount import AlignfsCommand
from alignfs.bench.runner import Runner
from alignfs.bench.scenarios import BenchContext
from alignfs.bench.sysutil import GiB, KiB, MiB

BUFFERED = ["dd-4k", "dd-64k", "cp", "qemu-img-convert", "dd-4k-xattr-off"]

Calls = list[tuple[list[str], dict[str, str] | None]]


def dd_summary(nbytes: int, count: int, seconds: str = "0.0123") -> str:
    return (f"{count}+0 records in\n{count}+0 records out\n"
            f"{nbytes} bytes ({nbytes} B) copied, {seconds} s, 1.0 MB/s\n")  # fmt: skip


def fake_run(calls: Calls, info: dict[str, Any] | None = None) -> Callable[..., Any]:
    """Stands in for :func:`alignfs.bench.sysutil.run`: does what each client would."""

    def run(argv: list[str], *, timeout: float | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        calls.append((list(argv), env))
        out = ""
        if argv[0] == "dd":
            args = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
            nbytes = int(args["bs"]) * int(args["count"])
            Path(args["of"]).write_bytes(bytes(nbytes))
            out = dd_summary(nbytes, int(args["count"]))
        elif argv[0] == "cp":
            shutil.copyfile(argv[1], argv[2])
        elif argv[:2] == ["qemu-img", "info"]:
            out = json.dumps(info or {})
        return subprocess.CompletedProcess(argv, 0, out, None)

    return run


def context(tmp_path: Path) -> BenchContext:
    return BenchContext(workdir=tmp_path, ram_dir=tmp_path / "ram", timeout=60)


# -- registration and options -------------------------------------------------


def test_buffered_scenarios_are_registered_named_only() -> None:
    assert scenarios.BUFFERED_SCENARIOS == tuple(BUFFERED)
    assert not set(BUFFERED) & set(cli.parse_args([]).scenarios)
    assert not set(BUFFERED) & set(cli.parse_args(["--demo"]).scenarios)
    assert not set(BUFFERED) & set(scenarios.WRITE_SCENARIOS + scenarios.READ_SCENARIOS)
    args = cli.parse_args(["--scenarios", ",".join(BUFFERED)])
    assert args.dd_size == 512 * MiB and args.copy_size == GiB
    built = scenarios.build_scenarios(args.scenarios, cli.scenario_options(args))
    assert [s.name for s in built] == BUFFERED
    dd4, dd64, cp, convert, xoff = built
    assert isinstance(dd4, scenarios.DdScenario) and dd4.bs == 4096 and dd4.payload == 512 * MiB
    assert isinstance(dd64, scenarios.DdScenario) and dd64.bs == 64 * KiB
    assert isinstance(cp, scenarios.CpScenario) and cp.payload == GiB
    assert isinstance(convert, scenarios.QemuImgConvertScenario) and convert.payload == GiB
    assert isinstance(xoff, scenarios.DdScenario) and xoff.mount_options == ("--xattr", "off")
    for sc in built:
        assert sc.metric == "time" and sc.direction == "write" and sc.throttled
        assert not sc.unthrottled_prepare
        (row,) = sc.rows()
        assert (row.direct, row.alignfs) == ("direct", "alignfs")


def test_size_options_and_model_size() -> None:
    args = cli.parse_args(["--scenarios", "dd-4k,cp", "--dd-size", "64M", "--copy-size", "3G"])
    opts = cli.scenario_options(args)
    assert opts.dd_size == 64 * MiB and opts.copy_size == 3 * GiB
    assert args.model_size >= 6 * GiB
    dd, cp = scenarios.build_scenarios(args.scenarios, opts)
    assert dd.payload == 64 * MiB and cp.payload == 3 * GiB


def test_help_names_the_buffered_scenarios_and_their_sizes() -> None:
    text = " ".join(cli.build_parser().format_help().split())
    assert "buffered (page-cache) producers dd-4k,dd-64k,cp,qemu-img-convert," in text
    assert "--dd-size SIZE bytes dd-4k / dd-64k / dd-4k-xattr-off write (default 512M)" in text
    assert "--copy-size SIZE size of the random file cp / qemu-img-convert copy" in text


def test_missing_buffered_clients_are_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(scenarios, "which", lambda name: None)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    assert cli.main(["--scenarios", "dd-64k,cp,qemu-img-convert", "-q"]) == 2
    err = capsys.readouterr().err
    assert "skipping scenario dd-64k: dd not installed" in err
    assert "skipping scenario cp: cp, sync not installed" in err
    assert "skipping scenario qemu-img-convert: qemu-img, sync not installed" in err


# -- dd -----------------------------------------------------------------------


def test_dd_command_count_and_labels(tmp_path: Path) -> None:
    sc = scenarios.DdScenario(name="dd-4k", bs=4096, total=512 * MiB)
    assert sc.count == 131072 and sc.payload == 512 * MiB
    assert sc.commands(tmp_path / "out.bin") == [[
        "dd", "if=/dev/zero", f"of={tmp_path / 'out.bin'}", "bs=4096", "count=131072",
        "conv=fsync",
    ]]  # fmt: skip
    assert sc.rows()[0].label == "dd bs=4K 512M conv=fsync"
    assert [(c.key, c.side, c.mount_options) for c in sc.cases()] == [
        ("direct", "direct", ()), ("alignfs", "alignfs", ())
    ]  # fmt: skip
    odd = scenarios.DdScenario(name="dd-64k", bs=64 * KiB, total=100 * KiB)
    assert odd.count == 2 and odd.payload == 128 * KiB  # at least the size asked for


def test_dd_xattr_off_mounts_its_alignfs_side_with_it() -> None:
    sc = scenarios.build_scenarios(["dd-4k-xattr-off"], scenarios.ScenarioOptions())[0]
    direct, alignfs = sc.cases()
    assert direct.mount_options == ()
    assert alignfs.mount_options == ("--xattr", "off")
    assert alignfs.label == "alignfs --xattr off"
    assert sc.rows()[0].label == "dd bs=4K 512M conv=fsync (alignfs --xattr off)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (dd_summary(536870912, 131072, "3.61234"), (536870912, 3.61234)),
        ("1+0 records in\n1+0 records out\n4096 bytes (4.1 kB, 4.0 KiB) copied, 5.1e-05 s, "
         "80 MB/s\n", (4096, 5.1e-05)),
        # a progress line first (status=progress), then the summary
        ("268435456 bytes (268 MB, 256 MiB) copied, 1 s, 268 MB/s\r" + dd_summary(2 * 4096, 2),
         (8192, 0.0123)),
    ],
)
def test_parse_dd_output(text: str, expected: tuple[int, float]) -> None:
    assert scenarios.parse_dd_output(text) == expected


def test_parse_dd_output_without_summary() -> None:
    with pytest.raises(ValueError, match="no summary line in dd output"):
        scenarios.parse_dd_output("dd: error writing 'x': No space left on device\n")


def test_dd_run_times_the_command_and_checks_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Calls = []
    monkeypatch.setattr(scenarios, "run", fake_run(calls))
    sc = scenarios.DdScenario(name="dd-4k", bs=4096, total=256 * KiB)
    outcome = sc.run(sc.cases()[0], tmp_path, context(tmp_path))
    ((argv, env),) = calls
    assert argv[0] == "dd" and env is not None and env["LC_ALL"] == "C"
    assert outcome.payload_bytes == 256 * KiB and outcome.files == ["out.bin"]
    assert outcome.extra["reported_seconds"] == 0.0123
    assert 0 <= outcome.extra["dd_seconds"] <= outcome.seconds
    assert outcome.started is not None
    assert sc.verify(sc.cases()[0], tmp_path) is None
    with pytest.raises(RuntimeError, match="dd copied 4096 bytes, not 262144"):
        sc.check_output([dd_summary(4096, 1)])


def test_dd_verify_finds_short_and_dirty_files(tmp_path: Path) -> None:
    sc = scenarios.DdScenario(name="dd-4k", bs=4096, total=3 * MiB)
    case = sc.cases()[1]
    (tmp_path / "out.bin").write_bytes(bytes(3 * MiB - 4096))
    assert sc.verify(case, tmp_path) == f"out.bin has {3 * MiB - 4096} bytes, not {3 * MiB}"
    data = bytearray(3 * MiB)
    data[-1] = 1  # the last sample ends at the end of the file
    (tmp_path / "out.bin").write_bytes(bytes(data))
    assert sc.verify(case, tmp_path) == f"not zero at offset {2 * MiB}"


# -- cp and qemu-img convert --------------------------------------------------


def test_cp_source_commands_run_and_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Calls = []
    monkeypatch.setattr(scenarios, "run", fake_run(calls))
    size = 3 * MiB + 5
    sc = scenarios.CpScenario(size=size)
    assert sc.rows()[0].label == "cp 3145733 random + sync FILE"
    ctx = context(tmp_path)
    sc.setup(ctx)
    assert sc.source == ctx.ram_dir / f"cp-source-{size}.raw"
    assert sc.source.stat().st_size == size
    target = tmp_path / "run"
    target.mkdir()
    assert sc.commands(target / "out.bin") == [
        ["cp", str(sc.source), str(target / "out.bin")], ["sync", str(target / "out.bin")]
    ]  # fmt: skip
    outcome = sc.run(sc.cases()[0], target, ctx)
    assert [argv[0] for argv, _ in calls] == ["cp", "sync"]
    assert set(outcome.extra) == {"cp_seconds", "sync_seconds"}
    assert outcome.payload_bytes == size and outcome.files == ["out.bin"]
    assert sc.verify(sc.cases()[0], target) is None
    copy = bytearray((target / "out.bin").read_bytes())
    copy[MiB + 100] ^= 0xFF  # inside a sample (5 of them at this size)
    (target / "out.bin").write_bytes(bytes(copy))
    problem = sc.verify(sc.cases()[0], target)
    assert problem is not None and problem.startswith("differs from the source at offset")
    sc.teardown(ctx)
    assert not sc.source.exists()


def test_qemu_img_convert_commands_and_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = scenarios.QemuImgConvertScenario(size=GiB)
    assert sc.target_name == "out.qcow2" and sc.tools == ("qemu-img", "sync")
    assert sc.rows()[0].label == "qemu-img convert raw->qcow2 1G + sync FILE"
    sc.source = tmp_path / "src.raw"
    target = tmp_path / "out.qcow2"
    assert sc.commands(target) == [
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(sc.source), str(target)],
        ["sync", str(target)],
    ]
    calls: Calls = []
    monkeypatch.setattr(scenarios, "run", fake_run(calls, {"virtual-size": GiB}))
    assert sc.verify(sc.cases()[1], tmp_path) is None
    assert [argv[:2] for argv, _ in calls] == [["qemu-img", "check"], ["qemu-img", "info"]]
    monkeypatch.setattr(scenarios, "run", fake_run(calls, {"virtual-size": MiB}))
    assert sc.verify(sc.cases()[1], tmp_path) == f"virtual size {MiB}, not {GiB}"


def test_sample_offsets_cover_start_and_end() -> None:
    assert scenarios.sample_offsets(4096) == [0]
    assert scenarios.sample_offsets(MiB) == [0]
    offsets = scenarios.sample_offsets(10 * MiB)
    assert len(offsets) == 16 and offsets[0] == 0 and offsets[-1] == 9 * MiB
    assert offsets == sorted(set(offsets))


# -- the runner: a case's own mount options -------------------------------------


class FakeModel:
    """What the runner needs of an HDD model, with every byte charged to the throttle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.throttle = Throttle()
        self.throttled = False
        self.written = 0

    def set_throttled(self, on: bool) -> None:
        self.throttled = on

    def io_counters(self) -> IoCounters:
        files = [p for p in self.path.rglob("*") if p.is_file()]
        self.written += sum(p.stat().st_size for p in files)
        return IoCounters(0, self.written, 0, self.written)


class FakeMount:
    """Stands in for :class:`alignfs.bench.mount.AlignfsMount`; records its command."""

    seen: list[AlignfsCommand] = []

    def __init__(self, cmd: AlignfsCommand, mountpoint: Path, backing: Path,
                 log_dir: Path) -> None:
        FakeMount.seen.append(cmd)
        self.mountpoint = mountpoint
        self.backing = backing
        self.last_daemon_cpu = 1.0
        self.last_serving_cpu = 0.75
        self.umount_seconds = 0.01
        self.umount_error = None

    def __enter__(self) -> FakeMount:
        self.mountpoint.rmdir()  # the client writes "through the mount" into BACKING
        self.mountpoint.symlink_to(self.backing)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mountpoint.unlink()
        self.mountpoint.mkdir()

    def daemon_cpu(self) -> tuple[float, float]:
        return 0.5, 0.25

    def control_stats(self) -> dict[str, Any]:
        return {"write_requests": 2, "backing_writes": 1}

    def stats(self) -> dict[str, Any]:
        return self.control_stats()

    def umount(self) -> bool:
        return True


def test_runner_mounts_a_case_with_its_own_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Calls = []
    monkeypatch.setattr(scenarios, "run", fake_run(calls))
    monkeypatch.setattr(runner, "AlignfsMount", FakeMount)
    FakeMount.seen = []
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "logs").mkdir()
    ctx = context(tmp_path)
    cmd = AlignfsCommand(mount_options=["--buffer-size", "4M"])
    r = Runner(FakeModel(model_dir), ctx, cmd, repeat=1, drop=lambda: None)  # type: ignore[arg-type]
    plain = scenarios.DdScenario(name="dd-4k", bs=4096, total=64 * KiB)
    xoff = scenarios.DdScenario(name="dd-4k-xattr-off", bs=4096, total=64 * KiB,
                                mount_options=("--xattr", "off"))
    (row,) = r.run_scenario(plain)
    (xrow,) = r.run_scenario(xoff)
    assert [c.mount_options for c in FakeMount.seen] == [
        ["--buffer-size", "4M"], ["--buffer-size", "4M", "--xattr", "off"]
    ]  # fmt: skip
    assert cmd.mount_options == ["--buffer-size", "4M"]  # the harness's own is unchanged
    for rw in (row, xrow):
        (direct,), (alignfs,) = rw.direct_runs, rw.alignfs_runs
        assert direct.ok and alignfs.ok, (direct.error, alignfs.error)
        assert direct.throttled_write_bytes == direct.payload_bytes == 64 * KiB
        assert not direct.throttle_short and rw.speedup_basis == "direct"
    assert "case_mount_options" not in row.alignfs_runs[0].extra
    assert xrow.alignfs_runs[0].extra["case_mount_options"] == ["--xattr", "off"]
    assert xrow.label == "dd bs=4K 64K conv=fsync (alignfs --xattr off)"
    assert sorted(p.name for p in model_dir.iterdir()) == []
