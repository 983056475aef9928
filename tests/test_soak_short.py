"""The soak script (scripts/soak.py) for ~20 seconds: qemu-img, fio and a model checker at once.

The full soak (10 minutes by default) is run by hand; this keeps the script
itself working and catches gross concurrency failures in every suite run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, alignfs_env

SOAK = ROOT / "scripts" / "soak.py"


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("fio") and shutil.which("qemu-img")),
                    reason="fio and qemu-img are needed")
def test_soak_20_seconds(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.33", "--json",
                          "--dir", str(tmp_path), "--seed", "1234"],
                         capture_output=True, text=True, timeout=240, env=alignfs_env())
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    summary = json.loads(res.stdout)
    assert summary["errors"] == []
    ops = summary["operations"]
    for what in ("fio", "qemu-img compare", "model write", "model read", "model final check"):
        assert ops.get(what, 0) >= 1, f"{what} never ran: {ops}"
    assert summary["bytes_verified"] > 64 << 20
    assert 0 < summary["peak_dirty_bytes"] <= 16 << 20  # the soak's --max-dirty 16M
    assert summary["backing_errors"] == 0
    assert not list(tmp_path.iterdir()), "the soak left its temp directory behind"
