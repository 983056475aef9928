"""The mount fixture itself: mount, write, read, unmount, data on BACKING."""

import os

from conftest import is_mounted


def test_write_read_umount(mount_alignfs):
    m = mount_alignfs()
    data = os.urandom(3 * 1024 * 1024 + 123)
    (m.mountpoint / "f").write_bytes(data)
    assert (m.mountpoint / "f").read_bytes() == data
    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)
    assert (m.backing / "f").read_bytes() == data
