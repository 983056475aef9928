"""Argument parsing, presets and scenario construction of ``alignfs bench``."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignfs.bench import cli, scenarios
from alignfs.bench.sysutil import GiB, MiB, format_bytes, parse_size


def test_defaults() -> None:
    args = cli.parse_args([])
    assert args.scenarios == list(cli.DEFAULT_SCENARIOS)
    assert args.repeat == 3
    assert args.ram == GiB
    assert args.bps == 150 * MiB
    assert args.iops == 200
    assert args.savevm_caches == ("none", "writeback")
    assert not args.no_throttle and args.dir is None
    assert args.model_size >= 2 * args.ram


def test_demo_preset_and_explicit_override() -> None:
    demo = cli.parse_args(["--demo"])
    assert demo.scenarios == ["savevm", "qemu-img-bench"]
    assert demo.ram == 512 * MiB and demo.repeat == 1
    assert not demo.no_throttle
    mixed = cli.parse_args(["--demo", "--repeat", "2", "--ram", "256M"])
    assert mixed.repeat == 2 and mixed.ram == 256 * MiB
    assert mixed.scenarios == ["savevm", "qemu-img-bench"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--mbps", "100"], 100 * MiB),
        (["--bps", "50M"], 50 * MiB),
        (["--bps", "1048576"], MiB),
    ],
)
def test_bandwidth_options(argv: list[str], expected: int) -> None:
    args = cli.parse_args(argv)
    assert args.bps == expected
    throttle = cli.throttle_from(args)
    assert throttle is not None
    assert throttle.read_bps == throttle.write_bps == expected


def test_no_throttle_and_iops() -> None:
    assert cli.throttle_from(cli.parse_args(["--no-throttle"])) is None
    throttle = cli.throttle_from(cli.parse_args(["--iops", "150"]))
    assert throttle is not None and throttle.read_iops == throttle.write_iops == 150


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenarios", "savevm,bogus"],
        ["--scenarios", ""],
        ["--bps", "10M", "--mbps", "10"],
        ["--repeat", "0"],
        ["--ram", "lots"],
        ["--savevm-caches", "writeback"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_scenario_list_and_alignfs_command() -> None:
    args = cli.parse_args(
        ["--scenarios", "fio-4k,savevm", "--alignfs-cmd", "/usr/bin/alignfs --x",
         "--mount-options", "--buffer-size 4M"]
    )  # fmt: skip
    assert args.scenarios == ["fio-4k", "savevm"]
    cmd = cli.alignfs_command(args)
    assert cmd.prefix == ["/usr/bin/alignfs", "--x"]
    assert cmd.argv("umount", "/m") == ["/usr/bin/alignfs", "--x", "umount", "/m"]
    assert cmd.mount_options == ["--buffer-size", "4M"]


def test_default_alignfs_command_uses_this_python() -> None:
    cmd = cli.alignfs_command(cli.parse_args([]))
    assert cmd.prefix[1:] == ["-m", "alignfs"]
    first = cmd.env()["PYTHONPATH"].split(":")[0]
    assert (Path(first) / "alignfs" / "bench" / "cli.py").is_file()


def test_every_row_refers_to_existing_cases() -> None:
    opts = cli.scenario_options(cli.parse_args([]))
    built = scenarios.build_scenarios(list(scenarios.SCENARIO_NAMES), opts)
    names = [s.name for s in built]
    assert names == [
        "savevm", "qemu-img-bench", "fio-4k", "fio-512", "fio-1m", "fast-savevm", "fast-fio-1m"
    ]  # fmt: skip
    for sc in built:
        keys = [c.key for c in sc.cases()]
        assert len(keys) == len(set(keys))
        sides = [c.side for c in sc.cases()]
        assert sides[0] == "direct" and "alignfs" in sides
        for row in sc.rows():
            assert row.direct is None or row.direct in keys
            assert row.alignfs is None or row.alignfs in keys
    fast = [s for s in built if s.name.startswith("fast")]
    assert all(not s.throttled for s in fast)


def test_qemu_img_bench_writes_at_least_the_requested_bytes() -> None:
    sc = scenarios.QemuImgBenchScenario(total=GiB)
    assert sc.count * 131328 >= GiB
    assert (sc.count - 1) * 131328 < GiB


def test_fio_argv_time_based_and_sync_fallback(tmp_path: Path) -> None:
    sc = scenarios.FioScenario(name="fio-4k", bs=4096, size=256 * MiB, runtime=10)
    argv = sc.argv(tmp_path, direct=True)
    assert "--direct=1" in argv and "--time_based" in argv and "--runtime=10" in argv
    assert "--bs=4096" in argv and "--ioengine=psync" in argv and "--iodepth=1" in argv
    fallback = sc.argv(tmp_path, direct=False)
    assert "--direct=0" in fallback and "--sync=1" in fallback


def test_parse_fio_json_skips_leading_noise() -> None:
    text = (
        'fio: note something\n{"jobs": [{"error": 0, "write": {"io_bytes": 4096, '
        '"runtime": 1000, "iops": 1.0, "bw_bytes": 4096}}]}\n'
    )
    write = scenarios.parse_fio_json(text)
    assert write["io_bytes"] == 4096 and write["runtime"] == 1000


def test_sizes() -> None:
    assert parse_size("512M") == 512 * MiB
    assert parse_size("1GiB") == GiB
    assert parse_size("1.5G") == 3 * GiB // 2
    assert format_bytes(512 * MiB) == "512M"
    assert format_bytes(131328) == "131328"
    with pytest.raises(ValueError):
        parse_size("12X")


def test_missing_client_is_skipped_not_crashed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(scenarios, "which", lambda name: None)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    assert cli.main(["--scenarios", "fio-1m,qemu-img-bench", "-q"]) == 2
    err = capsys.readouterr().err
    assert "skipping scenario fio-1m: fio not installed" in err
    assert "skipping scenario qemu-img-bench: qemu-img not installed" in err
    assert "nothing to run" in err
