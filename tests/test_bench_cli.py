"""Argument parsing, presets and scenario construction of ``alignfs bench``."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignfs.bench import cli, scenarios
from alignfs.bench.sysutil import GiB, MiB
from alignfs.sizes import compact_size, parse_size


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
        ["--plot-timeline", "bogus"],
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
        "savevm", "qemu-img-bench", "fio-4k", "fio-512", "fio-1m", "fast-savevm", "fast-fio-1m",
        "dd-4k", "dd-64k", "cp", "qemu-img-convert", "dd-4k-xattr-off",
        "loadvm", "qemu-img-read", "fio-read-4k", "fio-randread-4k",
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
    assert compact_size(512 * MiB) == "512M"
    assert compact_size(131328) == "131328"
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


def test_read_scenarios_are_named_not_default() -> None:
    assert not set(scenarios.READ_SCENARIOS) & set(cli.parse_args([]).scenarios)
    assert not set(scenarios.READ_SCENARIOS) & set(cli.parse_args(["--demo"]).scenarios)
    names = "loadvm,qemu-img-read,fio-read-4k,fio-randread-4k"
    args = cli.parse_args(["--scenarios", names, "--fio-read-size", "3G", "--ram", "256M"])
    assert args.scenarios == names.split(",")
    assert args.fio_read_size == 3 * GiB and args.model_size >= 6 * GiB
    built = scenarios.build_scenarios(args.scenarios, cli.scenario_options(args))
    assert [s.name for s in built] == names.split(",")
    for sc in built:
        assert sc.direction == "read" and sc.unthrottled_prepare and sc.throttled
    loadvm, img, seq, rand = built
    assert isinstance(loadvm, scenarios.LoadvmScenario) and loadvm.ram == 256 * MiB
    assert seq.size == rand.size == 3 * GiB and seq.runtime == rand.runtime == 10.0
    assert img.payload >= GiB


def test_loadvm_cases_rows_and_target() -> None:
    sc = scenarios.LoadvmScenario(ram=GiB)
    assert [(c.key, c.param("cache")) for c in sc.cases()] == [
        ("direct-none", "none"), ("alignfs-none", "none"), ("direct-writeback", "writeback")
    ]  # fmt: skip
    main, ref = sc.rows()
    assert (main.direct, main.alignfs, main.target_percent) == ("direct-none", "alignfs-none", 85)
    assert ref.alignfs is None and "reference" in ref.label
    only_none = scenarios.LoadvmScenario(ram=GiB, caches=("none",))
    assert [c.key for c in only_none.cases()] == ["direct-none", "alignfs-none"]
    assert len(only_none.rows()) == 1


def test_qemu_img_read_argv(tmp_path: Path) -> None:
    sc = scenarios.QemuImgReadScenario(total=512 * MiB, depth=4)
    argv = sc.argv(tmp_path / "bench.raw")
    assert "-w" not in argv
    assert argv[:4] == ["qemu-img", "bench", "-t", "none"]
    assert argv[argv.index("-s") + 1] == argv[argv.index("-S") + 1] == "131328"
    assert argv[argv.index("-c") + 1] == str(sc.count) and sc.payload >= 512 * MiB
    assert argv[argv.index("-d") + 1] == "4" and argv[-1].endswith("bench.raw")
    (row,) = sc.rows()
    assert row.direct == "direct-raw" and row.alignfs == "alignfs-raw"
    assert [c.key for c in sc.cases()] == ["direct-raw", "alignfs-raw"]


def test_fio_read_argv_and_rows(tmp_path: Path) -> None:
    seq = scenarios.FioReadScenario(name="fio-read-4k", rw="read", bs=4096, size=GiB, runtime=5)
    rand = scenarios.FioReadScenario(
        name="fio-randread-4k", rw="randread", bs=4096, size=GiB, runtime=5
    )
    for sc, rw in ((seq, "read"), (rand, "randread")):
        argv = sc.argv(tmp_path)
        assert f"--rw={rw}" in argv and "--direct=1" in argv and "--bs=4096" in argv
        assert "--time_based" in argv and "--runtime=5" in argv and "--ioengine=psync" in argv
        assert "--iodepth=1" in argv and f"--size={GiB}" in argv
    assert seq.rows()[0].target_speedup is None
    assert rand.rows()[0].target_speedup == 0.97


def test_parse_fio_json_read_section() -> None:
    text = (
        '{"jobs": [{"error": 0, "read": {"io_bytes": 8192, "runtime": 2000, "iops": 1.0, '
        '"bw_bytes": 4096}, "write": {"io_bytes": 0, "runtime": 0}}]}'
    )
    assert scenarios.parse_fio_json(text, "read")["io_bytes"] == 8192
    assert scenarios.parse_fio_json(text)["io_bytes"] == 0


def test_fill_helpers(tmp_path: Path) -> None:
    path = tmp_path / "f"
    scenarios.fill_random(path, 5 * MiB + 3, chunk=MiB)
    data = path.read_bytes()
    assert len(data) == 5 * MiB + 3 and data.count(0) < MiB
    scenarios.fill_zeros(path, 2 * MiB + 1, chunk=MiB)
    assert path.read_bytes() == bytes(2 * MiB + 1)


def test_missing_read_clients_are_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(scenarios, "which", lambda name: None)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    assert cli.main(["--scenarios", "loadvm,qemu-img-read,fio-randread-4k", "-q"]) == 2
    err = capsys.readouterr().err
    assert "skipping scenario loadvm: qemu-system-x86_64, qemu-img not installed" in err
    assert "skipping scenario qemu-img-read: qemu-img not installed" in err
    assert "skipping scenario fio-randread-4k: fio not installed" in err


def test_header_warns_on_cpu_contention_not_on_io_waits() -> None:
    """The warning follows CPU pressure (PSI), not the load average, which also
    counts the tasks waiting on the throttled model disk."""
    meta = {"model": {"kind": "zram1"}, "repeat": 1, "kernel": "k", "cpus": 2,
            "max_loadavg_1m": 40.0, "max_cpu_pressure": 0.05}
    assert "warning" not in cli._header(meta)
    meta["max_cpu_pressure"] = 0.6
    assert "waited for a CPU during up to 60% of a run" in cli._header(meta)


def test_header_shows_the_models_own_write_cost() -> None:
    meta = {"model": {"kind": "zram1", "prefilled": True, "write_cpu_per_gib": 0.6},
            "repeat": 1, "kernel": "k"}
    assert "model disk filled before mkfs; writing to it costs the writer 0.60 CPU s/GiB" \
        in cli._header(meta)
    meta["model"]["prefilled"] = False
    assert "NOT pre-filled" in cli._header(meta)
    assert "writing to it" not in cli._header({"model": {"kind": "dir /x"}})


def test_cpu_pressure_total_reads_psi() -> None:
    from alignfs.bench.sysutil import cpu_pressure_total

    first = cpu_pressure_total()
    if not Path("/proc/pressure/cpu").exists():
        assert first is None
        return
    assert first is not None and first >= 0
    assert cpu_pressure_total() >= first
