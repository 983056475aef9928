"""Running alignfs as a service: systemd units, sd_notify, mount(8), fstab, control.

The daemon is started exactly as ``alignfs@.service`` starts it (``alignfs
mount --foreground`` with NOTIFY_SOCKET set) and the notify socket is a test
socket, so READY/STOPPING/STATUS/EXTEND_TIMEOUT messages are checked for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALIGNFS, ROOT, alignfs_env, is_mounted, run_alignfs, wait_until

SYSTEMD = ROOT / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("unit", ["alignfs@.service", "fast.mount"])
def test_units_verify(tmp_path: Path, unit: str) -> None:
    # A template is verified through an instance; a mount unit under its own name.
    name = unit.replace("@.", "@images.")
    shutil.copy(SYSTEMD / unit, tmp_path / name)
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Unknown" not in res.stderr, res.stderr


def test_service_unit_is_notify_and_never_lazy() -> None:
    text = (SYSTEMD / "alignfs@.service").read_text()
    assert "Type=notify" in text
    assert "KillMode=none" not in text
    assert "-z" not in text and "--lazy" not in text
    assert "ExecStart=/usr/local/bin/alignfs mount --foreground" in text


def test_install_systemd_writes_config(tmp_path: Path) -> None:
    from alignfs import service

    written = service.write_instance("images", Path("/fast"), Path("/backing"),
                                     ["--buffer-size", "8M"], conf_dir=tmp_path / "etc",
                                     unit_dir=tmp_path / "units")
    conf = (tmp_path / "etc" / "images.conf").read_text()
    assert 'MOUNTPOINT="/fast"\n' in conf and 'BACKING="/backing"\n' in conf
    assert 'OPTIONS="--buffer-size 8M"\n' in conf
    dropin = tmp_path / "units" / "alignfs@images.service.d" / "paths.conf"
    assert dropin in written
    assert 'RequiresMountsFor="/backing"' in dropin.read_text()
    assert "After=fast.mount\n" in dropin.read_text()
    with pytest.raises(ValueError):
        service.write_instance("../evil", Path("/a"), Path("/b"), [],
                               conf_dir=tmp_path / "etc", unit_dir=tmp_path / "units")
    with pytest.raises(ValueError, match="whitespace"):
        service.write_instance("x", Path("/a"), Path("/b"), ["--log=/var/log/a b"],
                               conf_dir=tmp_path / "etc", unit_dir=tmp_path / "units")


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape missing")
@pytest.mark.parametrize("path", ["/fast", "/", "/srv/vm images/", "/a/.hidden/b-c",
                                  "/var//lib/x_y:z", "/mnt/100%", "/mnt/ü", "/.dot"])
def test_mount_unit_name_matches_systemd_escape(path: str) -> None:
    from alignfs.service import mount_unit_name

    res = subprocess.run(["systemd-escape", "-p", "--suffix=mount", path],
                         capture_output=True, text=True, check=True)
    assert mount_unit_name(path) == res.stdout.strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_dropin_for_awkward_paths_verifies(tmp_path: Path) -> None:
    """A mount point and BACKING with spaces, quotes and '%' still give a valid drop-in."""
    from alignfs import service

    units = tmp_path / "units"
    service.write_instance("odd", Path('/srv/vm "images" 100%'), Path("/data/back up"), [],
                           conf_dir=tmp_path / "etc", unit_dir=units)
    shutil.copy(SYSTEMD / "alignfs@.service", units / "alignfs@odd.service")
    dropin = units / "alignfs@odd.service.d" / "paths.conf"

    def verify() -> str:
        res = subprocess.run(["systemd-analyze", "verify", str(units / "alignfs@odd.service")],
                             capture_output=True, text=True,
                             env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
        assert res.returncode == 0, res.stderr
        return res.stderr

    assert "paths.conf" not in verify()
    # verify does read the drop-in: a bad one is reported (so the check above can fail)
    good = dropin.read_text()
    dropin.write_text(good.replace('RequiresMountsFor="/data/back up"',
                                   "RequiresMountsFor=/data/back up"))
    assert "paths.conf" in verify()


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def receive(self, timeout: float = 60.0) -> list[str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        lines = data.split("\n")
        self.messages += lines
        return lines

    def wait_for(self, line_prefix: str, timeout: float = 60.0) -> list[str]:
        while True:
            lines = self.receive(timeout)
            if any(line.startswith(line_prefix) for line in lines):
                return lines

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_and_stop_with_buffered_data(tmp_path: Path) -> None:
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    notify = NotifySocket(tmp_path / "notify.sock")
    env = alignfs_env()
    env["NOTIFY_SOCKET"] = str(notify.path)
    proc = subprocess.Popen(
        [*ALIGNFS, "mount", "--foreground", str(mp), str(back), "--flush-delay", "600",
         "--log", str(tmp_path / "log")], env=env, stdin=subprocess.DEVNULL)
    try:
        ready = notify.wait_for("READY=1")
        # READY=1 is sent only once the mountpoint answers.
        assert is_mounted(mp)
        assert any(line.startswith("MAINPID=") for line in ready)
        data = os.urandom(5 * 1024 * 1024 + 17)
        with open(mp / "img", "wb") as f:
            f.write(data)
            f.flush()
            # Kept open, and the flush delay is long: the data is still buffered.
            stats = run_alignfs("stats", str(mp), "--json", check=True).stdout
            assert '"dirty_bytes": 0' not in stats
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1")
        assert proc.wait(timeout=60) == 0
        seen = "\n".join(notify.messages)
        # Drain whatever else was sent during the stop.
        notify.sock.setblocking(False)
        try:
            while True:
                seen += "\n" + notify.sock.recv(4096).decode()
        except BlockingIOError:
            pass
        assert "STATUS=writing back" in seen
        assert "EXTEND_TIMEOUT_USEC=" in seen
        assert not is_mounted(mp)
        assert (back / "img").read_bytes() == data
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["umount", "-i", "-l", str(mp)], capture_output=True)
        notify.close()


@pytest.fixture
def alignfs_on_path(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "alignfs"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m alignfs \"$@\"\n")
    script.chmod(0o755)
    env = alignfs_env()
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return env


def _umount_quietly(mp: Path) -> None:
    if is_mounted(mp):
        run_alignfs("umount", str(mp))
    if is_mounted(mp):
        subprocess.run(["umount", "-i", "-l", str(mp)], capture_output=True)


@pytest.mark.skipif(not Path("/sbin/mount.fuse3").exists(), reason="mount.fuse3 missing")
def test_mount_t_fuse_alignfs_with_options(tmp_path: Path, alignfs_on_path) -> None:
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "fuse.alignfs", str(back), str(mp), "-o",
             "defaults,nofail,_netdev,buffer_size=4M,max_dirty=64M,flush_delay=2"],
            env=alignfs_on_path, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert is_mounted(mp)
        stats = run_alignfs("stats", str(mp), "--json", check=True).stdout
        assert '"buffer_size": 4194304' in stats
        assert '"max_dirty": 67108864' in stats
        (mp / "f").write_bytes(b"x" * 100_000)
        res = run_alignfs("umount", str(mp))
        assert res.returncode == 0, res.stderr
        assert (back / "f").read_bytes() == b"x" * 100_000
    finally:
        _umount_quietly(mp)


@pytest.mark.skipif(not Path("/sbin/mount.fuse3").exists(), reason="mount.fuse3 missing")
def test_fstab_entry(tmp_path: Path, alignfs_on_path) -> None:
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{back} {mp} fuse.alignfs buffer_size=2M,noauto,nofail 0 0\n")
    try:
        res = subprocess.run(["mount", "-T", str(fstab), str(mp)], env=alignfs_on_path,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        stats = run_alignfs("stats", str(mp), "--json", check=True).stdout
        assert '"buffer_size": 2097152' in stats
    finally:
        _umount_quietly(mp)


def test_mount_helper_rejects_unknown_option(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "b").mkdir()
    res = run_alignfs(str(tmp_path / "b"), str(tmp_path / "m"), "-o", "no_such_option=1")
    assert res.returncode == 2
    assert "no-such-option" in res.stderr


def test_stats_flush_umount_live(mount_alignfs) -> None:
    m = mount_alignfs("--flush-delay", "600")
    # O_DIRECT: the bytes reach alignfs at once (a page-cache write would wait
    # in the kernel's writeback cache first).
    with open(os.open(m.mountpoint / "f", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644),
              "wb", buffering=0) as f:
        f.write(b"a" * 1_000_000)
        assert m.stats()["dirty_bytes"] == 1_000_000
        res = run_alignfs("flush", str(m.mountpoint))
        assert res.returncode == 0, res.stderr
        assert m.stats()["dirty_bytes"] == 0
        assert (m.backing / "f").read_bytes() == b"a" * 1_000_000
    table = run_alignfs("stats", str(m.mountpoint)).stdout
    assert "backing writes out" in table
    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)


def test_control_refuses_other_users(mount_alignfs) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    m = mount_alignfs("--allow-other")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for cmd in (["stats", str(m.mountpoint)], ["flush", str(m.mountpoint)],
                ["umount", str(m.mountpoint)]):
        res = subprocess.run([*as_nobody, *ALIGNFS, *cmd], env=alignfs_env(),
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert res.returncode == 9, (cmd, res.returncode, res.stderr)
        assert "permission denied" in res.stderr
    assert is_mounted(m.mountpoint)


def test_stats_on_non_alignfs(tmp_path: Path) -> None:
    res = run_alignfs("stats", str(tmp_path))
    assert res.returncode == 8
    assert "not an alignfs mount" in res.stderr


def test_umount_timeout_and_wait(mount_alignfs) -> None:
    m = mount_alignfs()
    pid = m.pid
    res = run_alignfs("umount", str(m.mountpoint), "--timeout", "60")
    assert res.returncode == 0, res.stderr
    # umount returned only after the daemon exited.
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    assert wait_until(lambda: not is_mounted(m.mountpoint), 5)


def installed_alignfs_matches_repo() -> str | None:
    """Why /usr/local/bin/alignfs is not this checkout's code, or None if it is."""
    exe = Path("/usr/local/bin/alignfs")
    if not exe.exists():
        return f"{exe} missing: run scripts/setup.sh install"
    res = subprocess.run([str(exe.resolve().parent / "python"), "-c",
                          "import alignfs, os; print(os.path.dirname(alignfs.__file__))"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot import the installed alignfs: {res.stderr.strip()}"
    installed = Path(res.stdout.strip())
    for src in (ROOT / "alignfs").rglob("*.py"):
        other = installed / src.relative_to(ROOT / "alignfs")
        if not other.exists() or other.read_bytes() != src.read_bytes():
            return f"{other} differs from the checkout: run scripts/setup.sh install"
    return None


@pytest.mark.slow
@pytest.mark.skipif(Path("/proc/1/comm").read_text().strip() == "systemd",
                    reason="PID 1 is systemd: the check boots its own systemd only where none runs")
def test_units_under_a_real_systemd() -> None:
    """scripts/systemd-check.sh: the shipped units under a real systemd 252.

    It boots systemd as PID 1 of new PID/mount/cgroup namespaces and checks
    `systemctl start/stop alignfs@demo` (READY only once mounted, STATUS while
    writing back, every byte on BACKING), a stop after a write was dropped for
    good (exit 6 recorded by systemd, file and offset in the journal),
    fast.mount, the libvirtd drop-in, paths with spaces, and shutdown order;
    see the script's header. The units
    run /usr/local/bin/alignfs, so that must be this checkout (setup.sh
    installs it before the tests).
    """
    stale = installed_alignfs_matches_repo()
    assert stale is None, stale
    res = subprocess.run(["bash", str(ROOT / "scripts" / "systemd-check.sh")],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                         env={**os.environ, "SDTEST_KEEP_LOGS": "0"})
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert res.returncode == 0 and not failed, "\n".join(failed) + res.stdout[-4000:] + res.stderr
    assert "checks passed" in res.stdout
