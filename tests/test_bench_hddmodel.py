"""The HDD model for real: a small zram + ext4 + blkio cgroup, and its clean-up.

Needs root, zram and the cgroup v1 blkio controller; skipped otherwise.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from conftest import needs_hdd_model

from alignfs.bench.hddmodel import BLKIO_ROOT, HddModel, Throttle
from alignfs.bench.sysutil import MiB
from alignfs.mounts import is_mountpoint

pytestmark = needs_hdd_model

SMALL = 64 * MiB


def own_blkio_cgroup() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "blkio" in controllers.split(","):
            return path
    raise AssertionError("no blkio line in /proc/self/cgroup")


def assert_gone(model: HddModel, cgroup_before: str) -> None:
    assert model.zram_id is not None
    assert not Path(f"/sys/block/zram{model.zram_id}").exists()
    assert model.cgroup is not None and not model.cgroup.exists()
    assert model.mountpoint is not None and not model.mountpoint.exists()
    assert model.workdir is not None and not model.workdir.exists()
    assert own_blkio_cgroup() == cgroup_before
    assert str(model.mountpoint) not in Path("/proc/self/mountinfo").read_text()


def test_model_setup_throttle_and_cleanup() -> None:
    before = own_blkio_cgroup()
    throttle = Throttle(read_iops=123, write_iops=200, read_bps=7 * MiB, write_bps=150 * MiB)
    with HddModel(throttle=throttle, size=SMALL) as model:
        assert model.zram_id is not None
        assert model.device == Path(f"/sys/block/zram{model.zram_id}/dev").read_text().strip()
        assert model.mountpoint is not None and is_mountpoint(model.mountpoint)
        assert model.path == model.mountpoint
        assert model.cgroup == BLKIO_ROOT / f"alignfs-bench-{os.getpid()}"
        files = model.throttle_files()
        dev = model.device
        assert files == {
            "read_iops": f"{dev} 123",
            "write_iops": f"{dev} 200",
            "read_bps": f"{dev} {7 * MiB}",
            "write_bps": f"{dev} {150 * MiB}",
        }
        assert str(os.getpid()) in (model.cgroup / "cgroup.procs").read_text().split()
        assert own_blkio_cgroup() == "/" + model.cgroup.name
        assert model.write_bps_limit == 150 * MiB

        # A direct write is charged to the group and seen by the device.
        start = model.io_counters()
        fd = os.open(model.path / "f", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT requires
        try:
            assert os.write(fd, buf) == 1 << 20
        finally:
            buf.close()
            os.close(fd)
        delta = model.io_counters() - start
        assert delta.throttled_write >= 1 << 20
        assert delta.device_write >= 1 << 20

        model.set_throttled(False)
        assert all(v == "" for v in model.throttle_files().values())
        assert model.write_bps_limit is None
        model.set_throttled(True)
        assert model.throttle_files()["write_iops"] == f"{dev} 200"
    assert_gone(model, before)


def test_model_cleanup_after_exception() -> None:
    before = own_blkio_cgroup()
    with pytest.raises(RuntimeError, match="boom"), HddModel(size=SMALL) as model:
        (model.path / "busy").write_text("x")
        raise RuntimeError("boom")
    assert_gone(model, before)


def test_model_cleanup_when_setup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure half-way through set-up still removes what was created."""
    before = own_blkio_cgroup()

    def broken(self: HddModel) -> None:
        raise OSError("cannot enter cgroup")

    monkeypatch.setattr(HddModel, "_enter_cgroup", broken)
    model = HddModel(size=SMALL)
    with pytest.raises(OSError, match="cannot enter cgroup"), model:
        pass
    assert_gone(model, before)


def test_unthrottled_model_has_empty_rules() -> None:
    with HddModel(throttle=None, size=SMALL) as model:
        assert model.throttle_files() == dict.fromkeys(model.throttle_files(), "")
        assert model.write_bps_limit is None
        assert model.logical_block_size == 4096


def test_model_returns_process_to_its_previous_cgroup() -> None:
    home = BLKIO_ROOT / f"alignfs-bench-test-home-{os.getpid()}"
    home.mkdir()
    try:
        (home / "cgroup.procs").write_text(str(os.getpid()))
        with HddModel(size=SMALL) as model:
            assert own_blkio_cgroup() == "/" + model.cgroup.name  # type: ignore[union-attr]
        assert own_blkio_cgroup() == "/" + home.name
    finally:
        (BLKIO_ROOT / "cgroup.procs").write_text(str(os.getpid()))
        home.rmdir()


def _zram_stored_bytes(model: HddModel) -> int:
    """Bytes zram holds for the device (mm_stat's orig_data_size)."""
    return int(Path(f"/sys/block/zram{model.zram_id}/mm_stat").read_text().split()[0])


@pytest.mark.parametrize("prefill", [True, False])
def test_model_is_filled_before_mkfs_and_measures_its_write_cost(prefill: bool) -> None:
    """Every block of the zram disk holds data before mkfs (so no benchmark
    pays zram's first-write allocation), unless told not to; either way the
    model's steady write cost is measured, in the writer's thread."""
    with HddModel(throttle=None, size=SMALL, prefill=prefill) as model:
        stored = _zram_stored_bytes(model)
        if prefill:
            # mkfs zeroes some metadata blocks again; nearly all stay filled.
            assert stored >= SMALL * 3 // 4
        else:
            assert stored <= SMALL // 2
        assert model.write_cpu_per_gib is not None and model.write_cpu_per_gib > 0
        described = model.describe()
        assert described["prefilled"] is prefill
        assert described["write_cpu_per_gib"] == model.write_cpu_per_gib


def test_model_of_a_size_that_is_not_a_whole_page_is_filled() -> None:
    """zram rounds the disk size up to a page; the fill covers what it made
    (a fill of the requested size would end in an O_DIRECT write of a
    fraction of a page, EINVAL)."""
    with HddModel(throttle=None, size=SMALL + 1000) as model:
        assert _zram_stored_bytes(model) >= SMALL * 3 // 4
        assert model.write_cpu_per_gib is not None and model.write_cpu_per_gib > 0
