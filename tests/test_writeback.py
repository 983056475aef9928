"""The kernel's writeback cache, through a real mount.

Buffered writes reach the daemon in the kernel's large requests (counted in
``alignfs stats``); what the cache changes is checked case by case: reads
through write-only handles, O_APPEND, O_SYNC, size and mtime, buffered and
O_DIRECT handles and mmap on one file, truncate over dirty pages, sync(2),
the security.capability answer, and ``--xattr off``.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import daemon_exit_status, pid_gone, read_direct, run_alignfs, wait_until
from test_coalescing import read_trace
from test_posix import NOBODY, py_as_nobody, umount_ok, write_synced

from alignfs.cli import build_parser, config_from_args, translate_mount_helper

MiB = 1 << 20
CAP = "security.capability"


def aligned(data: bytes) -> mmap.mmap:
    """*data* in page-aligned memory, for O_DIRECT."""
    mem = mmap.mmap(-1, max(4096, len(data)))
    mem[:len(data)] = data
    return mem


def pread_direct(path: Path, off: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        mem = mmap.mmap(-1, size)
        n = os.preadv(fd, [mem], off)
        return bytes(mem[:n])
    finally:
        os.close(fd)


def pwrite_direct(path: Path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [aligned(data)], off) == len(data)
    finally:
        os.close(fd)


# -- coalescing ---------------------------------------------------------------------

def test_small_buffered_writes_reach_the_daemon_coalesced(mount_alignfs, tmp_path):
    """8,192 write(2) calls of 4 KiB: the daemon gets the kernel's requests of up
    to 1 MiB (max_write), counted like passthrough_hp's writeback test does."""
    trace = tmp_path / "trace"
    m = mount_alignfs("--buffer-size", "4M", "--trace-writes", str(trace))
    data = random.Random(12).randbytes(32 * MiB)
    fd = os.open(m.mountpoint / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), 4096):
            assert os.write(fd, data[off:off + 4096]) == 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    st = m.stats()
    assert st["write_bytes"] == len(data)
    # Without the writeback cache: 8,192 requests. With it: 32 of 1 MiB when
    # the kernel writes back in whole requests; allow it to split some.
    assert st["write_requests"] <= 4 * len(data) // MiB, st
    assert st["unaligned_backing_writes"] == 0
    umount_ok(m)
    assert (m.backing / "f").read_bytes() == data
    writes = read_trace(trace)
    assert sum(length for _, _, length in writes) == len(data)
    assert len(writes) <= 16, writes  # 8 windows of 4 MiB, a few split at most


# -- what the writeback cache changes ----------------------------------------------

def test_partial_page_write_through_write_only_handle(mount_alignfs):
    """The kernel fills the rest of the page by a READ through the O_WRONLY handle."""
    m = mount_alignfs()
    base = random.Random(2).randbytes(10_000)
    write_synced(m.mountpoint / "f", base)
    umount_ok(m)
    m.remount()  # the kernel has no page of the file now
    fd = os.open(m.mountpoint / "f", os.O_WRONLY)
    try:
        os.pwrite(fd, b"XY", 5000)
    finally:
        os.close(fd)
    want = base[:5000] + b"XY" + base[5002:]
    assert (m.mountpoint / "f").read_bytes() == want
    umount_ok(m)
    assert (m.backing / "f").read_bytes() == want


def test_o_append_positioned_by_the_kernel(mount_alignfs):
    """Two O_APPEND descriptors and a plain one: each append lands at the end."""
    m = mount_alignfs()
    p = m.mountpoint / "log"
    write_synced(p, b"head\n")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    plain = os.open(p, os.O_RDWR)
    want = bytearray(b"head\n")
    try:
        for i in range(200):
            line = f"{'ab'[i % 2]}{i:05d}\n".encode()
            assert os.write(a if i % 2 == 0 else b, line) == len(line)
            want += line
            if i % 50 == 49:
                os.pwrite(plain, b"#", 0)  # a positioned write does not move appends
                want[0:1] = b"#"
            assert os.fstat(a).st_size == len(want)
        assert os.pread(plain, len(want) + 10, 0) == want
    finally:
        for fd in (a, b, plain):
            os.close(fd)
    umount_ok(m)
    assert (m.backing / "log").read_bytes() == want


def test_o_sync_buffered_write_is_on_backing_when_it_returns(mount_alignfs):
    m = mount_alignfs("--flush-delay", "3600")
    data = random.Random(3).randbytes(5000)
    fd = os.open(m.mountpoint / "s", os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
    try:
        before = m.stats()["fsyncs"]
        assert os.write(fd, data) == len(data)
        assert read_direct(m.backing / "s") == data
        assert m.stats()["fsyncs"] > before  # the kernel's FSYNC after the write
    finally:
        os.close(fd)


def test_size_and_mtime_follow_clients(mount_alignfs):
    """The kernel keeps size and mtime; BACKING ends with the same, and a
    client's utime sticks through the write-back."""
    m = mount_alignfs("--flush-delay", "3600")
    p, back = m.mountpoint / "f", m.backing / "f"
    data = random.Random(4).randbytes(300_000)
    with open(p, "wb") as f:
        f.write(data[:3000])
        f.flush()
        assert os.stat(p).st_size == 3000  # at once, nothing written out yet
        f.write(data[3000:])
        f.flush()
        assert os.stat(p).st_size == len(data)
    shown = os.stat(p).st_mtime_ns
    umount_ok(m)
    assert back.stat().st_size == len(data)
    assert back.stat().st_mtime_ns == shown
    m.remount()
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"later")
    os.utime(p, ns=(10**18, 2 * 10**18))
    assert os.stat(p).st_mtime_ns == 2 * 10**18
    umount_ok(m)
    assert back.stat().st_mtime_ns == 2 * 10**18
    assert back.read_bytes() == data[:100] + b"later" + data[105:]


def test_ctime_of_regular_files_is_the_kernels(mount_alignfs):
    """A regular file's ctime at the mount comes from the kernel (writeback
    cache): it moves on with changes, close to BACKING's, not equal to it."""
    m = mount_alignfs()
    p = m.mountpoint / "f"
    write_synced(p, b"x")
    first = os.stat(p).st_ctime_ns
    os.chmod(p, 0o600)
    second = os.stat(p).st_ctime_ns
    assert second >= first
    assert abs(second - os.stat(m.backing / "f").st_ctime_ns) < 10 * 10**9


# -- several handles on one file ----------------------------------------------------

def test_buffered_and_direct_handles_see_each_others_bytes(mount_alignfs):
    m = mount_alignfs("--flush-delay", "3600")
    p = m.mountpoint / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"A" * 8192, 0)  # dirty in the kernel's page cache
        assert pread_direct(p, 0, 8192) == b"A" * 8192
        os.pwrite(fd, b"B" * 4096, 4096)  # dirty page, then a newer direct write
        pwrite_direct(p, 4096, b"C" * 4096)
        assert os.pread(fd, 8192, 0) == b"A" * 4096 + b"C" * 4096
        assert pread_direct(p, 0, 8192) == b"A" * 4096 + b"C" * 4096
        # A direct write, then a buffered one over part of it.
        pwrite_direct(p, 8192, b"D" * 4096)
        os.pwrite(fd, b"E" * 100, 8192 + 10)
        want = b"A" * 4096 + b"C" * 4096 + b"D" * 10 + b"E" * 100 + b"D" * 3986
        assert os.pread(fd, 20000, 0) == want
        assert pread_direct(p, 0, 16384) == want
    finally:
        os.close(fd)
    umount_ok(m)
    assert (m.backing / "f").read_bytes() == want


def test_truncate_over_dirty_pages(mount_alignfs):
    m = mount_alignfs("--flush-delay", "3600")
    p = m.mountpoint / "f"
    data = random.Random(5).randbytes(64 * 1024)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    other = os.open(p, os.O_RDWR)
    try:
        os.write(fd, data)
        os.ftruncate(other, 10_000)  # through the other handle, pages still dirty
        assert os.fstat(fd).st_size == 10_000
        assert os.pread(fd, 100_000, 0) == data[:10_000]
        assert pread_direct(p, 0, 65536) == data[:10_000]
        os.truncate(p, 20_000)
        want = data[:10_000] + bytes(10_000)
        assert os.pread(other, 100_000, 0) == want
        assert pread_direct(p, 0, 65536) == want
    finally:
        os.close(fd)
        os.close(other)
    umount_ok(m)
    assert (m.backing / "f").read_bytes() == want


def test_mmap_writer_with_direct_and_buffered_readers(mount_alignfs):
    m = mount_alignfs("--flush-delay", "3600")
    p = m.mountpoint / "f"
    size = 1 * MiB
    write_synced(p, bytes(size))
    data = random.Random(6).randbytes(size)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, size) as mm:
            for off in range(0, size, 65536):
                mm[off + 7:off + 7 + 5000] = data[off + 7:off + 7 + 5000]
            want = bytearray(size)
            for off in range(0, size, 65536):
                want[off + 7:off + 7 + 5000] = data[off + 7:off + 7 + 5000]
            assert pread_direct(p, 0, size) == want  # stores not yet msync'd
            assert (m.mountpoint / "f").read_bytes() == want
            pwrite_direct(p, 0, b"Z" * 4096)  # a direct write the map sees
            want[:4096] = b"Z" * 4096
            assert mm[:4096] == b"Z" * 4096
            mm.flush()
    finally:
        os.close(fd)
    umount_ok(m)
    assert (m.backing / "f").read_bytes() == want


# -- sync(2) ------------------------------------------------------------------------

def test_sync_starts_the_write_out_without_waiting_for_flush_delay(mount_alignfs):
    """sync(2) makes the kernel send its dirty pages; alignfs writes a buffer
    the kernel's writeback filled once those writes pause, not after
    --flush-delay (an hour here). The descriptor stays open: no close, no
    fsync asks for the write-out."""
    m = mount_alignfs("--flush-delay", "3600")
    data = random.Random(7).randbytes(3 * MiB + 123)
    fd = os.open(m.mountpoint / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.sync()
        assert wait_until(lambda: read_direct(m.backing / "f") == data, timeout=60)
        st = m.stats()
        assert st["flushes"]["idle"] >= 1 and st["dirty_bytes"] == 0, st
    finally:
        os.close(fd)


def test_direct_writers_keep_their_buffers_through_pauses(mount_alignfs):
    """A file with an O_DIRECT handle (QEMU cache=none) is not sealed when its
    writes pause: its windows wait to be filled, as tests/test_coalescing.py
    pins for whole streams."""
    m = mount_alignfs("--flush-delay", "3600")
    fd = os.open(m.mountpoint / "vm", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        os.pwritev(fd, [aligned(b"q" * 65536)], 0)
        time.sleep(2)  # four times the idle rule's pause
        st = m.stats()
        assert st["backing_writes"] == 0 and st["flushes"]["idle"] == 0, st
    finally:
        os.close(fd)


# -- security.capability and privileges ---------------------------------------------

def test_capability_answer_follows_changes_through_the_mount(mount_alignfs):
    m = mount_alignfs()
    p = m.mountpoint / "f"
    write_synced(p, b"x")
    with pytest.raises(OSError) as e:
        os.getxattr(p, CAP)
    assert e.value.errno == errno.ENODATA
    subprocess.run(["setcap", "cap_net_raw+ep", str(p)], check=True)
    value = os.getxattr(p, CAP)
    assert value == os.getxattr(m.backing / "f", CAP)
    os.chown(p, 1234, 1234)  # chown drops file capabilities
    for path in (p, m.backing / "f"):
        with pytest.raises(OSError) as e:
            os.getxattr(path, CAP)
        assert e.value.errno == errno.ENODATA
    subprocess.run(["setcap", "cap_net_raw+ep", str(p)], check=True)
    assert os.getxattr(p, CAP) == value
    os.removexattr(p, CAP)
    with pytest.raises(OSError) as e:
        os.getxattr(p, CAP)
    assert e.value.errno == errno.ENODATA


@pytest.mark.parametrize("xattr", ["on", "off"])
def test_write_by_other_user_drops_setuid_setgid_and_capability(mount_alignfs, xattr):
    """The kernel clears them on a write by an unprivileged user (file_remove_privs,
    sent as SETATTR and REMOVEXATTR), with the writeback cache too, and the
    setuid/setgid bits with --xattr off as well."""
    m = mount_alignfs("--allow-other", "--xattr", xattr)
    os.chmod(m.mountpoint, 0o755)
    p = m.mountpoint / "prog"
    write_synced(p, b"#!/bin/sh\n")
    if xattr == "on":
        subprocess.run(["setcap", "cap_net_raw+ep", str(p)], check=True)
        assert os.getxattr(p, CAP)
    os.chmod(p, 0o6777)
    out = py_as_nobody(m.mountpoint, "fd = os.open('prog', os.O_WRONLY | os.O_APPEND)\n"
                                     "out['write'] = os.write(fd, b'echo hi\\n')\n"
                                     "os.close(fd)")
    assert out == {"write": 8}
    assert os.getuid() != NOBODY
    for path in (p, m.backing / "prog"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o777, path
    for path in (p, m.backing / "prog") if xattr == "on" else (m.backing / "prog",):
        with pytest.raises(OSError) as e:
            os.getxattr(path, CAP)
        assert e.value.errno == errno.ENODATA
    assert p.read_bytes() == b"#!/bin/sh\necho hi\n"


# -- --xattr off --------------------------------------------------------------------

def test_xattr_off(mount_alignfs):
    m = mount_alignfs("--xattr", "off")
    p = m.mountpoint / "f"
    write_synced(p, b"x" * 10)
    for call in (lambda: os.getxattr(p, "user.a"), lambda: os.setxattr(p, "user.a", b"1"),
                 lambda: os.listxattr(p), lambda: os.removexattr(p, "user.a")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EOPNOTSUPP
    res = subprocess.run(["setfacl", "-m", "u:1234:rw", str(p)], capture_output=True)
    assert res.returncode != 0
    assert os.listxattr(m.backing / "f") == []
    # The control channel still works (as file I/O): stats, flush, umount.
    with open(p, "ab") as f:
        f.write(b"y" * 5000)
    assert m.stats()["write_bytes"] >= 5010
    res = run_alignfs("flush", str(m.mountpoint))
    assert res.returncode == 0, res.stderr
    umount_ok(m)
    assert (m.backing / "f").read_bytes() == b"x" * 10 + b"y" * 5000


def test_xattr_option_spellings():
    ns = build_parser().parse_args(["mount", "/m", "/b", "--xattr", "off"])
    assert config_from_args(ns).xattr is False
    ns = build_parser().parse_args(["mount", "/m", "/b"])
    assert config_from_args(ns).xattr is True
    assert translate_mount_helper(["/b", "/m", "-o", "xattr=off,allow_other"]) == \
        ["mount", "/m", "/b", "--xattr", "off", "--allow-other"]


def test_flush_and_sigterm_include_the_kernels_dirty_pages(mount_alignfs):
    """Bytes still in the kernel's page cache (descriptor open, no fsync) are
    part of ``alignfs flush`` and of the write-back at SIGTERM: the daemon
    syncfs's its own mount first."""
    m = mount_alignfs("--flush-delay", "3600")
    data = random.Random(8).randbytes(2 * MiB + 5)
    fd = os.open(m.mountpoint / "a", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        res = run_alignfs("flush", str(m.mountpoint))
        assert res.returncode == 0, res.stderr
        assert read_direct(m.backing / "a") == data
    finally:
        os.close(fd)
    fd = os.open(m.mountpoint / "b", os.O_WRONLY | os.O_CREAT, 0o644)
    pid = m.pid
    try:
        os.write(fd, data)
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: pid_gone(pid), timeout=60)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
    assert daemon_exit_status(pid) == 0
    assert read_direct(m.backing / "b") == data
