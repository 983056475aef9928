"""scripts/pyfuse3_floor.py: the floor DEVELOPERS.md measures alignfs's CPU
per request against. It must still mount and hold what clients write, or
the comparison measures a broken file system."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, wait_until

from alignfs.mounts import is_mountpoint as is_mounted
from alignfs.processes import source_env


def test_floor_filesystem_holds_what_clients_write(tmp_path: Path) -> None:
    mp = tmp_path / "floor"
    mp.mkdir()
    src = tmp_path / "src"
    data = os.urandom(3 * 131328 + 100)
    src.write_bytes(data)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "pyfuse3_floor.py"), str(mp),
         "--alignfs-loop", "--file-capacity", "0.0625"],
        env=source_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: is_mounted(mp) or proc.poll() is not None, 30)
        assert is_mounted(mp), proc.stderr.read() if proc.stderr else ""
        (mp / "buffered").write_bytes(data)
        # unaligned O_DIRECT writes, as QEMU cache=none sends them
        subprocess.run(["dd", f"if={src}", f"of={mp / 'direct'}", "bs=131328",
                        "oflag=direct", "status=none"], check=True, timeout=60)
        assert (mp / "buffered").read_bytes() == data
        assert (mp / "direct").read_bytes() == data
        os.truncate(mp / "direct", 1000)
        assert (mp / "direct").read_bytes() == data[:1000]
        assert sorted(os.listdir(mp)) == ["buffered", "direct"]
        subprocess.run(["fusermount3", "-u", str(mp)], check=True, timeout=30)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        counted = re.search(r"requests (\d+) ", err)
        assert counted and int(counted[1]) > 10, err
    finally:
        if is_mounted(mp):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
