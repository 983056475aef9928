"""The short-lived commands start light and wait for the daemon without polling.

``alignfs umount``/``stats``/``flush`` and the mount(8) helper run often
(systemd stop, a Prometheus scrape, the benchmark's drain): they must not
import trio, pyfuse3 or the write cache. ``alignfs umount`` waits for the
daemon through a pidfd; these tests pin its outcomes (the daemon's status,
or exit 7 after ``--timeout``), not its speed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from alignfs import launch
from alignfs.exitcodes import ExitCode


def test_command_side_imports_no_daemon_modules() -> None:
    code = (
        "import sys, alignfs.cli, alignfs.control_client, alignfs.stats_view; "
        "print(sorted(m for m in ('trio', 'pyfuse3', 'alignfs.write_cache', "
        "'alignfs.operations', 'importlib.metadata') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stderr


def test_version_is_the_packages() -> None:
    import alignfs

    out = subprocess.run([sys.executable, "-m", "alignfs", "--version"], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == f"alignfs {alignfs.__version__}"


def test_public_names_still_resolve_lazily() -> None:
    import alignfs
    from alignfs.write_cache import WriteCache

    assert alignfs.WriteCache is WriteCache
    assert alignfs.ExitCode.USAGE == 2
    assert set(alignfs.__all__) <= set(dir(alignfs))


def test_wait_for_exit_returns_the_status_the_process_left(tmp_path: Path) -> None:
    status = tmp_path / "status"
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import pathlib; pathlib.Path({str(status)!r}).write_text('6')"])
    try:
        assert launch.wait_for_exit(proc.pid, str(status), timeout=60) == ExitCode.UNWRITTEN_DATA
    finally:
        proc.wait()
    assert not status.exists()  # consumed


def test_wait_for_exit_gives_up_after_the_timeout(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        assert launch.wait_for_exit(proc.pid, None, timeout=0.05) == ExitCode.TIMEOUT
    finally:
        proc.communicate(b"")
