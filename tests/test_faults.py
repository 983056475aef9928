"""Reliability under faults, load and bad input.

Every test runs a real kernel FUSE mount (the ``mount_alignfs`` fixture) and
injects one kind of trouble: a killed or interrupted daemon, a full backing
disk, backing I/O errors (the ``--fault-file`` hook), changes made directly in
BACKING, memory pressure from many writers, concurrent writers/readers/
truncaters of one file, and command-line misuse. Data is written as tagged
4 KiB blocks (``faults_workers.block``), so every block read back says who
wrote it and whether it sits at the right offset.

Nothing here sleeps to synchronise: other processes are polled with
``wait_until``, workers run as subprocesses under timeouts, so a hung request
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ALIGNFS,
    Mount,
    alignfs_env,
    daemon_exit_status,
    errno_of,
    is_mounted,
    pid_gone,
    run_alignfs,
    set_faults,
    wait_until,
)
from faults_workers import BLOCK, ZERO, blocks, classify, file_content

from alignfs.mounts import is_stale
from alignfs.processes import proc_status

MiB = 1 << 20
WORKERS = Path(__file__).resolve().parent / "faults_workers.py"
#: Bound on any single worker process or daemon exit we wait for.
WORKER_TIMEOUT = 90


# -- helpers -------------------------------------------------------------------

def one_message(res: subprocess.CompletedProcess[str]) -> str:
    """The single ``alignfs:`` line of a failed command (no traceback, nothing else)."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("alignfs:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def worker(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKERS), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]], timeout: float = WORKER_TIMEOUT) -> None:
    """Wait for every worker (bounded); fail with their messages if any failed or hung."""
    problems = []
    try:
        for p in procs:
            try:
                _, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"{p.args[2:]}: still running after {timeout}s (hung request?)")
                continue
            if p.returncode != 0:
                problems.append(f"{p.args[2:]}: exit {p.returncode}: {err.strip()}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not problems, "\n".join(problems)


def flush(m: Mount) -> None:
    res = run_alignfs("flush", str(m.mountpoint))
    assert res.returncode == 0, res.stderr


def daemon_alive(m: Mount) -> None:
    """The daemon answers its control channel and serves a fresh file."""
    stats = m.stats()
    assert not pid_gone(stats["pid"])
    probe = m.mountpoint / f"probe-{random.randrange(1 << 30)}"
    probe.write_bytes(b"still serving")
    assert probe.read_bytes() == b"still serving"
    probe.unlink()


def bounded(m: Mount, pid: int, fn: Callable[[], object], timeout: float = 30) -> object:
    """Run *fn* (which talks to the mount); if it hangs, kill the daemon and fail.

    A request the daemon never answers blocks the caller in the kernel for
    good; killing the daemon (its *pid* taken beforehand: a wedged daemon
    answers no stats either) ends the request with ENOTCONN, so the test fails
    at once instead of hanging the suite. The dead mount is removed.
    """
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            result["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(pid), WORKER_TIMEOUT)
        t.join(WORKER_TIMEOUT)
        subprocess.run(["umount", "-l", str(m.mountpoint)], capture_output=True)
        pytest.fail(f"{getattr(fn, '__name__', fn)}: no answer from the daemon within "
                    f"{timeout}s (daemon wedged; killed it)")
    if "exc" in result:
        raise result["exc"]  # type: ignore[misc]
    return result.get("value")


def kill_stale(m: Mount) -> None:
    """Leave *m* as a stale mount: SIGKILL its daemon and wait for it to go."""
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: pid_gone(pid), WORKER_TIMEOUT)
    # statfs always reaches the daemon (stat may be answered from the kernel's cache).
    # While the dying daemon's threads still hold /dev/fuse, a request can be
    # queued and then ended with ECONNABORTED when the connection is torn down.
    assert wait_until(lambda: errno_of(lambda: os.statvfs(m.mountpoint)) == errno.ENOTCONN,
                      WORKER_TIMEOUT)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """``make(kind, size_mib)``: a fresh small filesystem, mounted; all undone afterwards.

    *kind* is ``"ext4"`` (on a loop device of its own) or ``"tmpfs"``. Request
    this fixture *before* ``mount_alignfs`` so alignfs mounts on it are taken
    down first; as a safety net, any alignfs mount whose BACKING lies on it is
    taken down here too.
    """
    made: list[tuple[Path, str]] = []

    def make(kind: str, size_mib: int) -> Path:
        n = len(made)
        mnt = tmp_path / f"{kind}-{n}"
        mnt.mkdir()
        if kind == "tmpfs":
            made.append((mnt, ""))
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                            str(mnt)], check=True, capture_output=True)
            return mnt
        img = tmp_path / f"{kind}-{n}.img"
        with open(img, "wb") as f:
            f.truncate(size_mib * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(img)],
                       check=True, capture_output=True)
        loop = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                              capture_output=True, text=True).stdout.strip()
        made.append((mnt, loop))
        subprocess.run(["mount", loop, str(mnt)], check=True, capture_output=True)
        return mnt

    try:
        yield make
    finally:
        for mnt, loop in reversed(made):
            try:
                with open("/proc/self/mountinfo") as f:
                    entries = [line.split() for line in f]
                for fields in entries:
                    fstype, source = fields[fields.index("-") + 1:fields.index("-") + 3]
                    if fstype == "fuse.alignfs" and source.startswith(f"{mnt}/"):
                        if run_alignfs("umount", fields[4], timeout=60).returncode != 0:
                            subprocess.run(["umount", "-l", fields[4]], capture_output=True)
                if is_mounted(mnt):
                    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
                        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            finally:
                if loop:
                    subprocess.run(["losetup", "-d", loop], capture_output=True)


# -- a killed or interrupted daemon ----------------------------------------------

def _stream(fd: int, data: bytes, start: int, stop: int, chunk: int,
            after: Callable[[int], None] | None = None) -> int:
    """Write data[start:stop] sequentially in *chunk* pieces; returns bytes acknowledged.

    ``after(pos)`` runs after each acknowledged write. Stops quietly at the first
    error (the daemon was killed): the caller checks what was acknowledged.
    """
    pos = start
    while pos < stop:
        try:
            n = os.pwrite(fd, data[pos:min(stop, pos + chunk)], pos)
        except OSError:
            return pos
        pos += n
        if after:
            after(pos)
    return pos


def test_sigkill_mid_stream(mount_alignfs: Callable[..., Mount]) -> None:
    """SIGKILL while a stream is half synced: synced bytes intact, the rest old or new.

    BACKING holds a file of 12 MiB of pattern O. Through the mount a writer
    streams pattern N over it from offset 0 in unaligned 128 KiB + 8 pieces,
    fsyncs at an unaligned offset (5 MiB + 3 blocks + 777), keeps writing, and
    SIGKILLs the daemon itself once 15 MiB + 1234 bytes are acknowledged (past
    the old end), then tries to write on.

    Accepted afterwards, and why: every byte before the fsync point is N (fsync
    promised it). The file is at least the old 12 MiB (nothing shrinks it) and
    at most the acknowledged length rounded up to a block. From the block
    holding the fsync point on, each 4 KiB block is checked on its own:

    * inside the old 12 MiB: entirely O (never written back), entirely N
      (written back), or N up to some byte and O after it -- a buffer sealed in
      mid-block (by the fsync, or under memory pressure) was written with a
      read-modify-write of the old block, and the rest of that block was still
      buffered;
    * past the old end: entirely N, entirely zeros, or N up to some byte and
      zeros after it. Zeros there are bytes never written back: a hole, or the
      padding of a write-out's last block (cut back to size later). Unsynced
      windows may reach BACKING out of order (a window's remainder after a
      mid-block seal waits for --flush-delay while later full windows go out),
      so holes need not be at the tail -- as after a crash of any page cache.

    N bytes always start a block (one sequential writer fills each block front
    to back, and a file's buffers are written strictly in order). Anything
    else -- bytes of neither pattern, a block at the wrong offset, old or
    non-zero bytes past the old end that are not N -- is garbage and fails.
    """
    old_size, sync_at, kill_at, chunk = 12 * MiB, 5 * MiB + 3 * BLOCK + 777, 15 * MiB + 1234, \
        128 * 1024 + 8
    m = mount_alignfs("--buffer-size", "1M", "--max-dirty", "8M", "--flush-delay", "300")
    old = blocks(b"O", 0, old_size // BLOCK)
    new = blocks(b"N", 0, 16 * MiB // BLOCK)
    target = m.backing / "stream.img"
    target.write_bytes(old)
    pid = m.pid

    killed = []

    def kill_at_mark(pos: int) -> None:
        if pos >= kill_at and not killed:
            # A setattr on the root: the kernel now caches its attributes for
            # the next second, as after any recent activity on the mount.
            os.utime(m.mountpoint)
            os.kill(pid, signal.SIGKILL)
            killed.append(pos)

    fd = os.open(m.mountpoint / "stream.img", os.O_WRONLY)
    try:
        assert _stream(fd, new, 0, sync_at, chunk) == sync_at
        os.fsync(fd)
        stopped = _stream(fd, new, sync_at, len(new), chunk, kill_at_mark)
        if stopped == len(new):
            # Writeback cache: write(2) only fills the kernel's page cache, so
            # writes may go on succeeding after SIGKILL (until the kernel next
            # asks the daemon); those bytes are lost, and fsync says so.
            assert errno_of(lambda: os.fsync(fd)) is not None, "fsync after SIGKILL worked"
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN
    assert killed, "the writer never reached the kill mark"
    assert wait_until(lambda: pid_gone(pid), WORKER_TIMEOUT)

    # The dead mount, checked at once: a daemon that just died is usually
    # noticed right away (a script restarting it). The kernel answers stat()
    # of the root from its attribute cache for up to a second, but requests
    # that reach the daemon fail with ENOTCONN, and alignfs must call the mount
    # stale right away: refuse a mount over it naming the fix, and remove it.
    assert errno_of(lambda: os.statvfs(m.mountpoint)) == errno.ENOTCONN
    assert errno_of(lambda: os.listdir(m.mountpoint)) == errno.ENOTCONN
    assert is_stale(str(m.mountpoint)), \
        "alignfs.mounts.is_stale() misses a dead daemon (stat answered from the kernel cache)"
    res = run_alignfs("mount", str(m.mountpoint), str(m.backing))
    assert res.returncode == 4, res.stderr
    assert "alignfs umount" in one_message(res)
    res = run_alignfs("umount", str(m.mountpoint))
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)

    got = target.read_bytes()
    assert got[:sync_at] == new[:sync_at], "fsync'd bytes are not on BACKING"
    assert old_size <= len(got) <= -(-stopped // BLOCK) * BLOCK, len(got)
    bad = []
    kinds: dict[str, int] = {}  # for the failure message
    for b in range(sync_at // BLOCK, -(-len(got) // BLOCK)):
        lo = b * BLOCK
        have = got[lo:lo + BLOCK]
        if have == new[lo:lo + len(have)]:
            kind = "new"
        elif lo < old_size and have == old[lo:lo + BLOCK]:
            kind = "old"
        else:
            k = next(i for i in range(len(have)) if have[i] != new[lo + i])
            rest = have[k:]
            if lo < old_size and rest == old[lo + k:lo + BLOCK]:
                kind = "new-then-old"
            elif lo >= old_size and not rest.strip(b"\0"):
                kind = "zeros" if k == 0 else "new-then-zeros"
            else:
                kind = "garbage"
                bad.append(f"block {b} ({lo}): {have[:16]!r}... differs from N at byte {k}")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert not bad, f"{kinds}\n" + "\n".join(bad[:10])

    # A new mount over the same BACKING works at once and sees what BACKING holds.
    m.remount()
    assert (m.mountpoint / "stream.img").read_bytes() == got
    with open(m.mountpoint / "stream.img", "r+b") as f:
        f.seek(sync_at)
        f.write(new[sync_at:])
        f.flush()
        os.fsync(f.fileno())
    assert target.read_bytes() == new


def test_sigint_mid_stream_writes_everything(mount_alignfs: Callable[..., Mount]) -> None:
    """SIGINT while a stream is running: every byte written before it is on BACKING at exit.

    Three files, none fsync'd: one written and closed, one written and still
    open, and one being streamed when the writer itself sends SIGINT (at an
    unaligned offset) and then keeps writing until the mount goes away. Once
    the daemon process is gone, each file on BACKING holds everything
    written before the signal (the stream may hold more of its own data, never
    anything else), the daemon's exit status is 0 and the mount is gone.
    Writes acknowledged after the signal may be lost: with the writeback cache
    write(2) only fills the kernel's page cache, and what the writer adds
    while the daemon stops never reaches it (as after a crash; fsync or
    close report it). Not only at the end: the kernel writes pages back in no
    set order, so a page written again after the signal may be lost while a
    later one arrived; such bytes read as zeros (seen once, in a full test run: a
    page half written by write(2) number 372, the other half zeros).
    """
    m = mount_alignfs("--buffer-size", "1M", "--max-dirty", "16M", "--flush-delay", "300")
    pid = m.pid
    closed = blocks(b"C", 0, 700)[:700 * BLOCK - 99]
    (m.mountpoint / "closed").write_bytes(closed)
    held = blocks(b"H", 0, 300)[:300 * BLOCK - 5]
    held_f = open(m.mountpoint / "held", "wb")  # noqa: SIM115 (open across the signal)
    try:
        held_f.write(held)
        held_f.flush()
        stream = blocks(b"S", 0, 64 * MiB // BLOCK)
        interrupted = []

        def interrupt_at_mark(pos: int) -> None:
            if pos >= 6 * MiB + 12345 and not interrupted:
                os.kill(pid, signal.SIGINT)
                interrupted.append(pos)

        fd = os.open(m.mountpoint / "stream", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            acked = _stream(fd, stream, 0, len(stream), 65536 + 13, interrupt_at_mark)
        finally:
            errno_of(lambda: os.close(fd))
        assert interrupted
        assert wait_until(lambda: pid_gone(pid), WORKER_TIMEOUT), "daemon did not exit"
    finally:
        errno_of(held_f.close)
    assert daemon_exit_status(pid) == 0
    assert wait_until(lambda: not is_mounted(m.mountpoint), WORKER_TIMEOUT)
    assert (m.backing / "closed").read_bytes() == closed
    assert (m.backing / "held").read_bytes() == held
    got = (m.backing / "stream").read_bytes()
    assert acked >= interrupted[0]
    assert len(got) >= interrupted[0], (len(got), interrupted[0])
    assert got[:interrupted[0]] == stream[:interrupted[0]], \
        "bytes written before the signal differ on BACKING"
    assert not _other_than_lost_pages(got, stream, interrupted[0]), \
        "BACKING holds bytes that are neither the stream's nor zeros (lost writes)"


def _other_than_lost_pages(got: bytes, stream: bytes, start: int) -> list[int]:
    """Offsets from *start* on where *got* holds neither *stream*'s byte nor a zero."""
    bad = []
    for page in range(start - start % 4096, len(got), 4096):
        if got[page:page + 4096] != stream[page:page + 4096]:
            bad += [i for i in range(max(page, start), min(page + 4096, len(got)))
                    if got[i] not in (0, stream[i])]
    return bad


# -- a full backing disk, backing I/O errors --------------------------------------

@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_backing_disk_full_enospc_then_recovers(small_fs: Callable[[str, int], Path],
                                                mount_alignfs: Callable[..., Mount],
                                                kind: str) -> None:
    """BACKING on a 64 MiB filesystem fills up under a buffered stream.

    ext4 on a loop device is the real case (O_DIRECT write-out, alignment from
    STATX_DIOALIGN); tmpfs reports no alignment, so alignfs probes it with a
    test write (this kernel's tmpfs accepts O_DIRECT).

    The stream's writes or its fsync fail with ENOSPC (not EIO, not success);
    the daemon keeps serving: stats answer, a file whose rewrite needs no new
    blocks (whole allocated blocks) is written, fsync'd and read back;
    ``alignfs umount`` refuses (exit 6) and the mount stays. Once space is
    freed (a ballast file made directly in BACKING beforehand is deleted) a
    retried fsync succeeds and BACKING holds exactly every byte the stream
    had acknowledged; unmounting then exits 0.

    The stream writes with O_DIRECT (as QEMU cache=none), so each write(2)
    is a request alignfs answers: through the kernel's writeback cache a
    write(2) is acknowledged by the page cache, and bytes alignfs must refuse
    once its memory is full of unwritable buffers are reported by fsync and
    lost, as with any filesystem's page cache (README, "What is durable when").
    """
    back = small_fs(kind, 64) / "back"
    back.mkdir()
    with open(back / "ballast", "wb") as f:
        f.write(b"\xbb" * 16 * MiB)
        os.fsync(f.fileno())
    small_old = blocks(b"s", 0, 16)
    with open(back / "small", "wb") as f:
        f.write(small_old)
        os.fsync(f.fileno())
    m = mount_alignfs("--buffer-size", "1M", "--max-dirty", "8M", "--flush-delay", "300",
                      backing=back)
    pid = m.pid
    data = blocks(b"B", 0, 96 * MiB // BLOCK)  # more than the whole disk
    fd = os.open(m.mountpoint / "big", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    chunk = mmap.mmap(-1, MiB)  # O_DIRECT needs aligned memory
    try:
        acked, failure = 0, None
        while acked < len(data) and failure is None:
            chunk[:] = data[acked:acked + MiB]
            try:
                acked += bounded(m, pid, lambda at=acked: os.pwritev(fd, [chunk], at))
            except OSError as exc:
                failure = exc.errno
        if failure is None:
            failure = bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd)))
        assert failure == errno.ENOSPC, \
            f"full disk reported as {failure and errno.errorcode[failure]} after {acked} bytes"
        assert acked < 64 * MiB
        assert bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd))) == errno.ENOSPC, \
            "still full: fsync must fail"

        stats = m.stats()
        assert stats["backing_errors"] >= 1 and stats["pid"] == pid
        assert (m.mountpoint / "small").read_bytes() == small_old
        small_new = blocks(b"t", 0, 16)
        with open(m.mountpoint / "small", "r+b") as f:
            f.write(small_new)
            f.flush()
            bounded(m, pid, lambda: os.fsync(f.fileno()))
        assert (m.mountpoint / "small").read_bytes() == small_new
        assert (back / "small").read_bytes() == small_new

        res = m.umount()
        assert res.returncode == 6, (res.returncode, res.stderr)
        assert is_mounted(m.mountpoint) and m.stats()["pid"] == pid

        (back / "ballast").unlink()
        bounded(m, pid, lambda: os.fsync(fd))
        assert os.fstat(fd).st_size == acked
    finally:
        errno_of(lambda: os.close(fd))
    assert (back / "big").read_bytes() == data[:acked]
    assert (m.mountpoint / "big").read_bytes() == data[:acked]
    res = m.umount()
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_mount_over_a_full_backing(small_fs: Callable[[str, int], Path],
                                   mount_alignfs: Callable[..., Mount], kind: str) -> None:
    """BACKING is already full when alignfs is mounted (e.g. restarted after a crash).

    On tmpfs (no STATX_DIOALIGN) alignfs finds the alignment with a probe
    write, which a full disk refuses. The mount must work anyway -- it is how
    one gets at the files to free space --
    existing files read fine, a new write's fsync reports ENOSPC, deleting a
    file through the mount frees space, and then a retried fsync, new writes
    and unmounting work.
    """
    back = small_fs(kind, 32) / "back"
    back.mkdir()
    kept = blocks(b"k", 0, 64)
    (back / "kept").write_bytes(kept)
    with open(back / "ballast", "wb") as f:
        assert errno_of(lambda: [f.write(b"\xbb" * MiB) for _ in range(64)]) == errno.ENOSPC
    m = mount_alignfs("--buffer-size", "1M", "--max-dirty", "8M", backing=back)
    pid = m.pid
    assert (m.mountpoint / "kept").read_bytes() == kept
    fd = os.open(m.mountpoint / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        err = errno_of(lambda: os.write(fd, blocks(b"n", 0, 512)))
        if err is None:
            err = bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd)))
        assert err == errno.ENOSPC
        os.unlink(m.mountpoint / "ballast")
        assert wait_until(lambda: os.statvfs(m.mountpoint).f_bavail > 1000, 10)
        # The file refuses writes with its write-back error until a retry works.
        bounded(m, pid, lambda: os.fsync(fd))
        os.pwrite(fd, blocks(b"n", 0, 512), 0)
        bounded(m, pid, lambda: os.fsync(fd))
    finally:
        errno_of(lambda: os.close(fd))
    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert (back / "new").read_bytes() == blocks(b"n", 0, 512)


def test_memory_bound_when_backing_is_full(small_fs: Callable[[str, int], Path],
                                           mount_alignfs: Callable[..., Mount]) -> None:
    """32 files written at once while BACKING is full: buffered data stays bounded.

    Buffers whose write-out fails cannot be freed, and alignfs lets the pool
    grow by them so other files are not starved. That growth must stay
    bounded too: --max-dirty is "the bound on all buffered data". Allowed
    here: twice --max-dirty (the bound once more for stuck buffers), in
    alignfs's own count (peak_dirty_bytes) and in the daemon's RSS (+ the
    usual 64 MiB overhead). Every writer must get ENOSPC or succeed, within
    its timeout. Afterwards the files are truncated through the mount (which
    drops their unwritable data) and unmounting exits 0.
    """
    max_dirty, nfiles = 8 * MiB, 32
    back = small_fs("ext4", 64) / "back"
    back.mkdir()
    m = mount_alignfs("--buffer-size", "1M", "--max-dirty", "8M", "--flush-delay", "300",
                      backing=back)
    pid = m.pid
    with open(back / "ballast", "wb") as f:
        assert errno_of(lambda: [f.write(b"\xbb" * MiB) for _ in range(128)]) == errno.ENOSPC
    daemon_alive_idle = proc_status(pid, "VmHWM")
    res = subprocess.run([sys.executable, str(WORKERS), "fill", str(m.mountpoint), str(nfiles),
                          str(8 * MiB), str(MiB)],
                         capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    stats = m.stats()
    peak = proc_status(pid, "VmHWM")
    try:
        assert res.returncode == 0, res.stderr
        assert int(res.stdout) >= 1, "no writer saw the disk full"
        assert stats["peak_dirty_bytes"] <= 2 * max_dirty, \
            f"{stats['peak_dirty_bytes'] / MiB:.0f} MiB buffered with --max-dirty 8M"
        assert peak <= daemon_alive_idle + 2 * max_dirty + RSS_OVERHEAD, \
            f"daemon RSS peak {peak / MiB:.1f} MiB, idle {daemon_alive_idle / MiB:.1f} MiB"
    finally:
        for i in range(nfiles):
            if (m.mountpoint / f"f{i:03d}").exists():
                bounded(m, pid, lambda i=i: os.truncate(m.mountpoint / f"f{i:03d}", 0))
        (back / "ballast").unlink()
    res = m.umount()
    assert res.returncode == 0, res.stderr


def test_backing_read_eio(mount_alignfs: Callable[..., Mount], tmp_path: Path) -> None:
    """Injected read EIO: reads that need BACKING fail with EIO, the daemon keeps serving.

    A fresh open of a file with nothing buffered reads BACKING: EIO, for a
    single read and for a sequential scan. Other files read fine meanwhile.
    """
    faults = tmp_path / "faults.json"
    m = mount_alignfs("--fault-file", str(faults), "--flush-delay", "300")
    pid = m.pid
    (m.backing / "victim.img").write_bytes(blocks(b"V", 0, 64))
    (m.backing / "bystander").write_bytes(blocks(b"Y", 0, 64))
    set_faults(faults, {"read": "EIO", "match": "victim"})

    def single_read() -> int | None:
        fd = os.open(m.mountpoint / "victim.img", os.O_RDONLY)
        try:
            return errno_of(lambda: os.pread(fd, 4096, 8192))
        finally:
            os.close(fd)

    def scan() -> int | None:
        with open(m.mountpoint / "victim.img", "rb", buffering=0) as f:
            return errno_of(lambda: [f.read(65536) for _ in range(4)])

    assert bounded(m, pid, single_read) == errno.EIO
    assert bounded(m, pid, scan) == errno.EIO
    assert bounded(m, pid, (m.mountpoint / "bystander").read_bytes) == blocks(b"Y", 0, 64)
    bounded(m, pid, lambda: daemon_alive(m))
    faults.unlink()
    assert bounded(m, pid, (m.mountpoint / "victim.img").read_bytes) == blocks(b"V", 0, 64)


def test_backing_read_eio_during_read_modify_write(mount_alignfs: Callable[..., Mount],
                                                   tmp_path: Path) -> None:
    """A partial-block write needs the old block; if reading it fails, fsync says EIO.

    The write is accepted (buffered); its write-back must read the rest of the
    4 KiB block (read-modify-write), which fails with injected EIO: fsync
    reports EIO and the daemon keeps serving (a read wholly inside the buffered
    bytes is still answered -- O_DIRECT so the kernel asks for exactly those
    bytes). Once the fault is cleared, a retried fsync writes the patch over
    the intact old bytes.
    """
    faults = tmp_path / "faults.json"
    m = mount_alignfs("--fault-file", str(faults), "--flush-delay", "300")
    pid = m.pid
    old = blocks(b"V", 0, 64)
    (m.backing / "victim.img").write_bytes(old)
    set_faults(faults, {"read": "EIO", "match": "victim"})
    # O_DIRECT: the 5 bytes reach alignfs as they are (through the page cache
    # the kernel would read the page first, and fail the write(2) itself).
    fd = os.open(m.mountpoint / "victim.img", os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, b"patch", 5000)
        dfd = os.open(m.mountpoint / "victim.img", os.O_RDONLY | os.O_DIRECT)
        try:
            assert bounded(m, pid, lambda: os.pread(dfd, 5, 5000)) == b"patch"
            assert bounded(m, pid, lambda: errno_of(lambda: os.pread(dfd, 100, 4990))) \
                == errno.EIO
        finally:
            os.close(dfd)
        assert bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd))) == errno.EIO
        bounded(m, pid, lambda: daemon_alive(m))
        faults.unlink()
        bounded(m, pid, lambda: os.fsync(fd))
    finally:
        errno_of(lambda: os.close(fd))
    expected = old[:5000] + b"patch" + old[5005:]
    assert (m.backing / "victim.img").read_bytes() == expected
    assert (m.mountpoint / "victim.img").read_bytes() == expected


def test_backing_read_eio_under_read_ahead(mount_alignfs: Callable[..., Mount],
                                           tmp_path: Path) -> None:
    """Read EIO that starts while a sequential reader is being read ahead for.

    A sequential scan of an 8 MiB file runs fine for 1 MiB, then reads start
    failing: the scan gets EIO (the backing read that fails may be a
    background read-ahead), the daemon keeps serving, and after the fault is
    cleared the file reads back intact.
    """
    faults = tmp_path / "faults.json"
    m = mount_alignfs("--fault-file", str(faults))
    pid = m.pid
    data = blocks(b"R", 0, 8 * MiB // BLOCK)
    (m.backing / "victim.img").write_bytes(data)

    def scan() -> int | None:
        with open(m.mountpoint / "victim.img", "rb", buffering=0) as f:
            for _ in range(16):
                assert f.read(65536)
            set_faults(faults, {"read": "EIO", "match": "victim"})
            return errno_of(lambda: [f.read(65536) for _ in range(128)])

    assert bounded(m, pid, scan) == errno.EIO
    bounded(m, pid, lambda: daemon_alive(m))
    faults.unlink()
    assert bounded(m, pid, (m.mountpoint / "victim.img").read_bytes) == data


def test_umount_with_persistent_write_fault(mount_alignfs: Callable[..., Mount],
                                            tmp_path: Path) -> None:
    """Write EIO that does not go away: umount exits 6 and the mount stays, data kept.

    After the fault is cleared, ``alignfs umount`` exits 0 and BACKING is complete.
    """
    faults = tmp_path / "faults.json"
    m = mount_alignfs("--fault-file", str(faults), "--flush-delay", "300",
                      "--buffer-size", "1M")
    set_faults(faults, {"write": "EIO", "match": "stuck"})
    stuck = blocks(b"K", 0, 700)[:-7]
    fine = blocks(b"F", 0, 300)[:-3]
    # O_DIRECT, as QEMU cache=none: the bytes stay in alignfs's buffers until
    # the umount writes them (a page-cache writer's full windows are written
    # at once, and its close would already report the EIO).
    fd = os.open(m.mountpoint / "stuck.img", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert os.write(fd, stuck) == len(stuck)  # FUSE direct_io: any alignment
    finally:
        os.close(fd)
    (m.mountpoint / "fine").write_bytes(fine)

    res = m.umount()
    assert res.returncode == 6, (res.returncode, res.stderr)
    assert "stays mounted" in res.stderr
    assert is_mounted(m.mountpoint)
    stats = m.stats()
    assert stats["dirty_bytes"] >= len(stuck) and stats["backing_errors"] >= 1
    assert (m.mountpoint / "stuck.img").read_bytes() == stuck
    res = m.umount()
    assert res.returncode == 6, "a retried umount while the fault persists must fail again"
    assert (m.backing / "fine").read_bytes() == fine

    faults.unlink()
    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)
    assert (m.backing / "stuck.img").read_bytes() == stuck


# -- BACKING changed directly while mounted ------------------------------------------

def test_rename_in_backing_while_open_for_writing(mount_alignfs: Callable[..., Mount]) -> None:
    """A→B renamed directly in BACKING while A is open for writing through the mount.

    Data written before and after the rename (buffered, unsynced, partly
    unaligned) lands in the file now called B; a new A created directly in
    BACKING afterwards is never touched. B seen through the mount (a fresh
    name) has the full size and content.
    """
    m = mount_alignfs("--buffer-size", "1M", "--flush-delay", "300")
    pid = m.pid
    content = blocks(b"W", 0, 1024)  # 4 MiB
    fd = os.open(m.mountpoint / "A", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, content[:1536 * 1024 + 77], 0)
        os.rename(m.backing / "A", m.backing / "B")
        os.pwrite(fd, content[1536 * 1024 + 77:3 * MiB], 1536 * 1024 + 77)
        bounded(m, pid, lambda: os.fsync(fd))
        intruder = b"created directly in BACKING\n" * 1000
        (m.backing / "A").write_bytes(intruder)
        os.pwrite(fd, content[3 * MiB:], 3 * MiB)
        assert os.pread(fd, 100, 3 * MiB - 50) == content[3 * MiB - 50:3 * MiB + 50]
    finally:
        os.close(fd)
    bounded(m, pid, lambda: flush(m))
    assert (m.backing / "B").read_bytes() == content
    assert (m.backing / "A").read_bytes() == intruder
    assert os.stat(m.mountpoint / "B").st_size == len(content)
    assert (m.mountpoint / "B").read_bytes() == content
    assert sorted(os.listdir(m.mountpoint)) == ["A", "B"]
    daemon_alive(m)


def test_delete_in_backing_while_open(mount_alignfs: Callable[..., Mount]) -> None:
    """A file deleted directly in BACKING while open through the mount with buffered data.

    Like any unlinked-but-open file: writes, reads and fsync through the open
    descriptor keep working, nothing reappears in BACKING, and once the
    kernel's name cache expires a new file of the same name made through the
    mount is a different file, in BACKING.
    """
    m = mount_alignfs("--buffer-size", "1M", "--flush-delay", "300")
    pid = m.pid
    content = blocks(b"D", 0, 600)
    fd = os.open(m.mountpoint / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, content[:1000 * 1000], 0)
        (m.backing / "gone").unlink()
        os.pwrite(fd, content[1000 * 1000:], 1000 * 1000)
        bounded(m, pid, lambda: os.fsync(fd))
        assert os.pread(fd, len(content) + 10, 0) == content
    finally:
        os.close(fd)
    bounded(m, pid, lambda: flush(m))
    assert not (m.backing / "gone").exists()
    # The kernel keeps the name for up to a second (README: entry caching);
    # until then "gone" still opens the deleted file.
    assert wait_until(lambda: not (m.mountpoint / "gone").exists(), 10)
    (m.mountpoint / "gone").write_bytes(b"second life")
    bounded(m, pid, lambda: flush(m))
    assert (m.backing / "gone").read_bytes() == b"second life"
    daemon_alive(m)


def test_truncate_in_backing_under_buffered_data(mount_alignfs: Callable[..., Mount]) -> None:
    """A file truncated directly in BACKING while the mount holds buffered data for it.

    Mixing writers is unsupported (README), so only safety is checked: no
    crash or traceback, the buffered write lands at its own offset (partial
    edge blocks completed from BACKING as it is now: zeros), every other byte
    of the file is zero (the old content was truncated away), and later writes
    through the mount work.
    """
    m = mount_alignfs("--buffer-size", "1M", "--flush-delay", "300")
    pid = m.pid
    (m.backing / "t.img").write_bytes(blocks(b"O", 0, 512))  # 2 MiB
    patch = blocks(b"P", 0, 16)[100:-100]
    # O_DIRECT: alignfs gets exactly the patch (through the page cache the
    # kernel would send whole pages, with the old bytes it read before).
    fd = os.open(m.mountpoint / "t.img", os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, patch, MiB + 100)
        os.truncate(m.backing / "t.img", 0)
        bounded(m, pid, lambda: os.fsync(fd))
        got = (m.backing / "t.img").read_bytes()
        assert got[MiB + 100:MiB + 100 + len(patch)] == patch
        rest = got[:MiB + 100] + got[MiB + 100 + len(patch):]
        assert not rest.strip(b"\0"), "old bytes survived the truncate or garbage appeared"
        os.pwrite(fd, b"after", 0)
        bounded(m, pid, lambda: os.fsync(fd))
    finally:
        os.close(fd)
    assert (m.backing / "t.img").read_bytes()[:5] == b"after"
    daemon_alive(m)


def test_backing_directory_removed_while_mounted(mount_alignfs: Callable[..., Mount]) -> None:
    """BACKING itself rmdir'ed while mounted: operations fail cleanly, nothing crashes.

    Creating a file returns an error (ENOENT: its directory is gone), the
    listing is empty, stats still answer, and unmounting exits 0.
    """
    m = mount_alignfs()
    pid = m.pid
    os.rmdir(m.backing)
    err = bounded(m, pid, lambda: errno_of(lambda: (m.mountpoint / "new").write_bytes(b"x")))
    assert err == errno.ENOENT
    assert bounded(m, pid, lambda: os.listdir(m.mountpoint)) == []
    assert bounded(m, pid, lambda: errno_of(lambda: os.mkdir(m.mountpoint / "d"))) \
        == errno.ENOENT
    assert m.stats()["pid"] == pid
    res = m.umount()
    assert res.returncode == 0, res.stderr


def test_backing_directory_renamed_while_mounted(mount_alignfs: Callable[..., Mount],
                                                 tmp_path: Path) -> None:
    """BACKING renamed away while mounted: the mount follows the directory itself.

    alignfs holds BACKING by descriptor, so files written before and after the
    rename, and files open across it, all end up in the renamed directory;
    nothing is created at the old path.
    """
    m = mount_alignfs("--flush-delay", "300")
    pid = m.pid
    (m.mountpoint / "before").write_bytes(b"before")
    f = open(m.mountpoint / "across", "wb")  # noqa: SIM115 (open across the rename)
    try:
        f.write(b"across-1 ")
        f.flush()
        moved = tmp_path / "moved-backing"
        os.rename(m.backing, moved)
        f.write(b"across-2")
        f.flush()
        bounded(m, pid, lambda: (m.mountpoint / "after").write_bytes(b"after"))
    finally:
        f.close()
    bounded(m, pid, lambda: flush(m))
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == \
        {"before": b"before", "across": b"across-1 across-2", "after": b"after"}
    assert not m.backing.exists()
    res = m.umount()
    assert res.returncode == 0, res.stderr


# -- load: memory pressure and concurrency ------------------------------------------

#: Allowed daemon RSS above its idle peak, beyond --max-dirty: Python objects for
#: up to 64 requests in flight (128 KiB each), thread stacks, allocator slack.
RSS_OVERHEAD = 64 * MiB


def test_memory_bound_with_64_concurrent_writers(mount_alignfs: Callable[..., Mount]) -> None:
    """64 files written at once under --max-dirty 16M --buffer-size 1M, with
    O_DIRECT as QEMU cache=none writes (every write reaches alignfs at once and
    full windows stay open; page-cache writers are bounded by the kernel first,
    and alignfs writes their full windows at once).

    The daemon's peak RSS (VmHWM in /proc/PID/status, which catches every
    peak, not just the ones a sampler would see) stays within its idle peak
    + 16 MiB + 64 MiB of fixed overhead; buffered data never exceeds 16 MiB;
    writers wait instead of failing (none fails) and nothing deadlocks (the
    writer process must finish within its timeout); every file is correct.
    """
    max_dirty, nfiles, size = 16 * MiB, 64, 2 * MiB + 1000
    m = mount_alignfs("--max-dirty", "16M", "--buffer-size", "1M", "--flush-delay", "300")
    pid = m.pid
    daemon_alive(m)  # load the code paths a write takes before measuring idle
    idle = proc_status(pid, "VmHWM")
    res = subprocess.run([sys.executable, str(WORKERS), "many", str(m.mountpoint), str(nfiles),
                          str(size), str(65536 + 100), "1"],
                         capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    assert res.returncode == 0, res.stderr
    peak = proc_status(pid, "VmHWM")
    stats = m.stats()
    assert peak <= idle + max_dirty + RSS_OVERHEAD, \
        f"daemon RSS peak {peak / MiB:.1f} MiB, idle {idle / MiB:.1f} MiB"
    assert stats["peak_dirty_bytes"] <= max_dirty, stats
    assert stats["writer_wait_seconds"] > 0 or stats["flushes"]["pressure"] > 0, \
        f"the bound was never reached, the test proves nothing: {stats}"
    bounded(m, pid, lambda: flush(m), timeout=WORKER_TIMEOUT)
    for i in range(nfiles):
        assert (m.backing / f"f{i:03d}").read_bytes() == file_content(i, size), f"f{i:03d}"


def test_memory_bound_with_16_sequential_readers(mount_alignfs: Callable[..., Mount]) -> None:
    """16 sequential readers at once under --readahead-memory 16M.

    Read-ahead memory is bounded "over all files": the daemon's peak RSS must
    stay within its idle peak + 16 MiB + the same 64 MiB overhead (nothing is
    written, so the write buffers stay unused), and read-ahead must not
    thrash: no more than twice the bytes the readers consume may be read
    ahead. Every reader gets the right bytes within its timeout.
    """
    budget, nfiles, size = 16 * MiB, 16, 8 * MiB
    m = mount_alignfs("--readahead-memory", "16M")
    for i in range(nfiles):
        (m.backing / f"f{i:03d}").write_bytes(file_content(i, size))
    pid = m.pid
    daemon_alive(m)
    idle = proc_status(pid, "VmHWM")
    res = subprocess.run([sys.executable, str(WORKERS), "readmany", str(m.mountpoint),
                          str(nfiles), str(size), str(128 * 1024)],
                         capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    assert res.returncode == 0, res.stderr
    peak = proc_status(pid, "VmHWM")
    stats = m.stats()
    ahead = {k: v for k, v in stats.items() if k.startswith("readahead")}
    assert peak <= idle + budget + RSS_OVERHEAD, \
        f"daemon RSS peak {peak / MiB:.1f} MiB, idle {idle / MiB:.1f} MiB; {ahead}"
    assert stats["readahead_bytes"] <= 2 * nfiles * size, f"read-ahead thrashes: {ahead}"


def test_stream_outrunning_a_slow_disk_keeps_its_writeout_queue(
        mount_alignfs: Callable[..., Mount], tmp_path: Path) -> None:
    """--writeout-queue through the mount: an O_DIRECT stream (QEMU
    cache=none) into a disk that takes 0.2 s per backing write waits for it,
    so the pool holds the file's filling buffer, its queue and the buffer one
    writer may still take, not the 16 MiB --max-dirty allows."""
    faults = tmp_path / "faults.json"
    set_faults(faults, {"write_delay": 0.2})
    bsize = 256 * 1024
    m = mount_alignfs("--fault-file", str(faults), "--buffer-size", "256K",
                      "--max-dirty", "16M", "--buffers-per-file", "1",
                      "--writeout-queue", "2", "--flush-delay", "300")
    data = blocks(b"Q", 0, 4 * MiB // BLOCK)
    chunk = mmap.mmap(-1, bsize)  # O_DIRECT needs aligned memory
    fd = os.open(m.mountpoint / "vm.img", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for off in range(0, len(data), bsize):
            chunk[:] = data[off:off + bsize]
            assert os.pwrite(fd, chunk, off) == bsize
        stats = m.stats()
        os.fsync(fd)
    finally:
        os.close(fd)
        chunk.close()
    assert stats["pool_bytes"] <= 4 * bsize, stats["pool_bytes"]
    assert (m.backing / "vm.img").read_bytes() == data


def test_same_file_disjoint_ranges(mount_alignfs: Callable[..., Mount]) -> None:
    """4 processes write interleaved, unaligned 10000-byte chunks of one file.

    The chunks share 4 KiB blocks and buffers (small buffers and a small pool
    force constant sealing and read-modify-write of shared blocks), so every
    block is assembled from several writers: the final content must be exact.
    """
    total = 6 * MiB + 1234
    m = mount_alignfs("--buffer-size", "256K", "--max-dirty", "2M", "--buffers-per-file", "2")
    pid = m.pid
    path = m.mountpoint / "shared.img"
    path.write_bytes(b"")
    finish([worker("stripe", path, w, 4, 10000, total, w) for w in range(4)])
    expected = blocks(b"S", 0, -(-total // BLOCK))[:total]
    assert bounded(m, pid, path.read_bytes) == expected
    bounded(m, pid, lambda: flush(m))
    assert (m.backing / "shared.img").read_bytes() == expected


def test_same_file_overlapping_ranges(mount_alignfs: Callable[..., Mount]) -> None:
    """3 processes each write the whole file (tags A, B, C) in 64 KiB pieces, random order.

    Overlapping writes have no defined winner, but each 4 KiB block must be
    exactly one writer's block for that offset -- never a mix, never misplaced --
    and the mount and BACKING must agree.
    """
    nblocks = 1536
    m = mount_alignfs("--buffer-size", "256K", "--max-dirty", "2M", "--buffers-per-file", "2")
    pid = m.pid
    path = m.mountpoint / "contended.img"
    path.write_bytes(b"")
    finish([worker("overlap", path, tag, nblocks, 16, 2, seed)
            for seed, tag in enumerate("ABC")])
    seen = bounded(m, pid, path.read_bytes)
    assert isinstance(seen, bytes) and len(seen) == nblocks * BLOCK
    bad = [i for i in range(nblocks) if classify(seen[i * BLOCK:(i + 1) * BLOCK], i)
           not in ("A", "B", "C")]
    assert not bad, f"{len(bad)} blocks are not one writer's block, first {bad[:5]}"
    bounded(m, pid, lambda: flush(m))
    assert (m.backing / "contended.img").read_bytes() == seen


@pytest.mark.parametrize("direct_writers", [1, 0], ids=["direct-writers", "page-cache-writers"])
def test_reads_race_writes_and_truncates(mount_alignfs: Callable[..., Mount],
                                         direct_writers: int) -> None:
    """Writers, readers and a truncater on one file at once: no hang, no EIO, no garbage.

    2 writers put whole tagged blocks (A, B) at random offsets, 2 readers (one
    through the page cache, one O_DIRECT so every read reaches the daemon and
    its buffer overlay) check every block they read is an A or B block for
    that offset or zeros
    (a hole after truncate-and-extend), 1 process truncates to random sizes.
    With O_DIRECT writers the O_DIRECT reader must never see a torn block;
    with page-cache writers the kernel's writeback may hand the daemon torn
    pages for a while (see faults_workers.reader), so no reader is strict.
    Every worker must finish within its timeout without an error. Afterwards
    the mount and BACKING agree and hold only such blocks; then a known
    content written and fsync'd reads back exactly (the model is defined again).
    """
    nblocks = 768
    m = mount_alignfs("--buffer-size", "256K", "--max-dirty", "2M", "--buffers-per-file", "2",
                      "--flush-delay", "0.2")
    pid = m.pid
    path = m.mountpoint / "raced.img"
    path.write_bytes(blocks(b"A", 0, nblocks))
    finish([worker("scribble", path, "A", nblocks, 1500, 1, direct_writers),
            worker("scribble", path, "B", nblocks, 1500, 2, direct_writers),
            worker("reader", path, "AB", nblocks, 1500, 3, 0, 0),
            worker("reader", path, "AB", nblocks, 1500, 4, 1, direct_writers),
            worker("truncater", path, nblocks, 150, 5)])
    seen = bounded(m, pid, path.read_bytes)
    assert isinstance(seen, bytes) and len(seen) % BLOCK == 0
    bad = [i for i in range(len(seen) // BLOCK)
           if classify(seen[i * BLOCK:(i + 1) * BLOCK], i) not in ("A", "B", ZERO)]
    assert not bad, f"blocks {bad[:5]}... hold garbage"
    bounded(m, pid, lambda: flush(m))
    assert (m.backing / "raced.img").read_bytes() == seen

    final = blocks(b"Z", 0, nblocks // 2)[:-123]
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(final)
        f.flush()
        bounded(m, pid, lambda: os.fsync(f.fileno()))
    assert (m.backing / "raced.img").read_bytes() == final
    assert bounded(m, pid, path.read_bytes) == final


# -- bad input ---------------------------------------------------------------------

def _mount_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_alignfs("mount", *args, timeout=60)


@pytest.mark.parametrize("case", [
    "backing-missing", "backing-is-file", "mountpoint-missing", "mountpoint-is-file",
    "mountpoint-inside-backing", "mountpoint-symlink-into-backing",
    "mountpoint-is-backing", "non-empty-mountpoint", "unknown-option", "invalid-size",
    "max-dirty-below-two-buffers"])
def test_cli_misuse(tmp_path: Path, case: str) -> None:
    """Each misuse: its own exit code, one ``alignfs:`` line naming the problem, no mount."""
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    args, code, words = {
        "backing-missing": ([str(mp), str(tmp_path / "nope")], 3, ["nope", "does not exist"]),
        "backing-is-file": ([str(mp), str(tmp_path / "file")], 3, ["file", "not a directory"]),
        "mountpoint-missing": ([str(tmp_path / "nope"), str(back)], 4,
                               ["nope", "does not exist"]),
        "mountpoint-is-file": ([str(tmp_path / "file"), str(back)], 4,
                               ["file", "not a directory"]),
        "mountpoint-inside-backing": ([str(back / "sub"), str(back)], 4, ["inside BACKING"]),
        "mountpoint-symlink-into-backing": ([str(tmp_path / "link"), str(back)], 4,
                                            ["inside BACKING"]),
        "mountpoint-is-backing": ([str(back), str(back)], 4, ["inside BACKING"]),
        "non-empty-mountpoint": ([str(mp), str(back)], 4, ["not empty", "--nonempty"]),
        "unknown-option": ([str(mp), str(back), "--bogus"], 2, ["--bogus"]),
        "invalid-size": ([str(mp), str(back), "--buffer-size", "3Q"], 2, ["3Q"]),
        "max-dirty-below-two-buffers": ([str(mp), str(back), "--buffer-size", "8M",
                                         "--max-dirty", "8M"], 2, ["--max-dirty"]),
    }[case]
    (tmp_path / "file").write_bytes(b"")
    (back / "sub").mkdir()
    (tmp_path / "link").symlink_to(back / "sub")
    if case == "non-empty-mountpoint":
        (mp / "precious").write_bytes(b"x")
    res = _mount_cli(*args)
    try:
        assert res.returncode == code, (res.returncode, res.stderr)
        line = one_message(res)
        for word in words:
            assert word in line, line
        assert res.stdout == ""
    finally:
        for p in (mp, back / "sub", back):
            if is_mounted(p):
                run_alignfs("umount", str(p))
    assert not any(is_mounted(p) for p in (mp, back, back / "sub"))


def test_cli_already_mounted(mount_alignfs: Callable[..., Mount], tmp_path: Path) -> None:
    m = mount_alignfs()
    other = tmp_path / "other-backing"
    other.mkdir()
    res = _mount_cli(str(m.mountpoint), str(other))
    assert res.returncode == 4, res.stderr
    assert "already" in one_message(res)
    daemon_alive(m)


def test_cli_stale_mountpoint(mount_alignfs: Callable[..., Mount]) -> None:
    """A mountpoint whose daemon died: mount refuses (4) naming ``alignfs umount``."""
    m = mount_alignfs()
    os.utime(m.mountpoint)  # recent activity: the kernel caches the root's attributes
    kill_stale(m)
    res = _mount_cli(str(m.mountpoint), str(m.backing))
    assert res.returncode == 4, res.stderr
    assert "stale" in one_message(res) and "alignfs umount" in res.stderr
    res = run_alignfs("umount", str(m.mountpoint))
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)


@pytest.mark.parametrize("command", ["umount", "stats", "flush"])
def test_cli_control_commands_on_a_plain_directory(tmp_path: Path, command: str) -> None:
    """umount/stats/flush of something that is not an alignfs mount: exit 8, one line."""
    res = run_alignfs(command, str(tmp_path))
    assert res.returncode == 8, (res.returncode, res.stderr)
    assert "not an alignfs mount" in one_message(res)


@pytest.mark.parametrize("command", ["stats", "flush"])
def test_cli_control_commands_on_a_stale_mount(mount_alignfs: Callable[..., Mount],
                                               command: str) -> None:
    """stats/flush of a mount whose daemon died: exit 4 (stale), naming ``alignfs umount``.

    Not 1 ("internal error, a bug"): a dead daemon is a known state of the
    mountpoint, and the message should say how to get out of it.
    """
    m = mount_alignfs()
    kill_stale(m)
    res = run_alignfs(command, str(m.mountpoint))
    assert res.returncode == 4, (res.returncode, res.stderr)
    assert "alignfs umount" in one_message(res)
    assert run_alignfs("umount", str(m.mountpoint)).returncode == 0


def _in_private_mount_ns(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sh -c script`` in a new mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, "sh", *args], capture_output=True, text=True,
                          env=alignfs_env(), timeout=60)


@pytest.mark.parametrize("how", ["missing", "not-a-fuse-device"])
def test_cli_no_dev_fuse(tmp_path: Path, how: str) -> None:
    """No usable /dev/fuse: exit 5 and one clear line; simulated in a private mount namespace.

    "missing": an empty tmpfs over /dev hides /dev/fuse. "not-a-fuse-device":
    /dev/null bind-mounted over /dev/fuse, so it exists but the kernel refuses
    the mount. Either way nothing stays mounted (the namespace dies with the
    command, and the check below looks at the host's mounts).
    """
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    hide = {"missing": "mount -t tmpfs none /dev",
            "not-a-fuse-device": "mount --bind /dev/null /dev/fuse"}[how]
    cmd = " ".join([*ALIGNFS, "mount", '"$1"', '"$2"', "--log", '"$3"'])
    res = _in_private_mount_ns(f"{hide} && exec {cmd}", str(mp), str(back),
                               str(tmp_path / "log"))
    assert res.returncode == 5, (res.returncode, res.stderr)
    line = one_message(res)
    assert "/dev/fuse" in line or "mount" in line, line
    assert not is_mounted(mp)


def test_cli_read_only_backing(tmp_path: Path) -> None:
    """A read-only BACKING (a read-only bind mount, in a private namespace): exit 3."""
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    cmd = " ".join([*ALIGNFS, "mount", '"$1"', '"$2"'])
    res = _in_private_mount_ns(f'mount --bind "$2" "$2" && mount -o remount,bind,ro "$2" && '
                               f"exec {cmd}", str(mp), str(back))
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert str(back) in one_message(res)
    assert not is_mounted(mp)


def test_cli_detected_alignment_larger_than_buffers(tmp_path: Path) -> None:
    """BACKING whose direct I/O needs more alignment than --buffer-size gives:
    every write-out would fail with EINVAL, so the mount is refused (exit 3).
    No device here needs more than 4 KiB, so the probe's answer is replaced."""
    mp, back = tmp_path / "mnt", tmp_path / "back"
    mp.mkdir()
    back.mkdir()
    code = ("import sys, alignfs.daemon as d; d.detect_alignment = lambda path: 1 << 20; "
            "from alignfs.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "mount", "--foreground",
                          "--buffer-size", "256K", str(mp), str(back)],
                         env=alignfs_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    assert "aligned to 1M, which does not divide --buffer-size 256K" in res.stderr
    assert not is_mounted(mp)


def test_name_length_limits(mount_alignfs: Callable[..., Mount]) -> None:
    """A 255-byte name works end to end; 256 bytes gives ENAMETOOLONG."""
    m = mount_alignfs()
    ok = m.mountpoint / ("n" * 255)
    ok.write_bytes(b"long name")
    assert ok.read_bytes() == b"long name"
    assert "n" * 255 in os.listdir(m.mountpoint)
    too_long = m.mountpoint / ("n" * 256)
    assert errno_of(lambda: too_long.write_bytes(b"x")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.stat(too_long)) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(too_long)) == errno.ENAMETOOLONG
    flush(m)
    assert (m.backing / ("n" * 255)).read_bytes() == b"long name"
    daemon_alive(m)


def test_write_at_largest_offsets(mount_alignfs: Callable[..., Mount]) -> None:
    """Writes at offset 2**63-1 (and ending there) fail cleanly; the daemon keeps serving.

    A write that would end past 2**63-1 fails with EFBIG or EINVAL. A 1-byte
    write at 2**63-2 (the last byte a file may have) reaches the daemon; no
    filesystem can store it, so it fails at once or its fsync reports EFBIG
    (once); either way the file and the daemon stay fine. Unmounting works;
    it exits 6 if the byte had been accepted and then dropped.
    """
    m = mount_alignfs()
    pid = m.pid
    fd = os.open(m.mountpoint / "huge", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        top = (1 << 63) - 1
        assert errno_of(lambda: os.pwrite(fd, b"x", top)) in (errno.EFBIG, errno.EINVAL)
        assert errno_of(lambda: os.pwrite(fd, b"x" * 4096, top - 4095)) \
            in (errno.EFBIG, errno.EINVAL)
        err = errno_of(lambda: os.pwrite(fd, b"y", top - 1))
        if err is None:
            assert bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd))) \
                in (errno.EFBIG, errno.EINVAL)
        else:
            assert err in (errno.EFBIG, errno.EINVAL)
        assert bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd))) is None
        os.pwrite(fd, b"small", 0)
        bounded(m, pid, lambda: os.fsync(fd))
    finally:
        os.close(fd)
    daemon_alive(m)
    assert (m.backing / "huge").read_bytes()[:5] == b"small"
    res = m.umount()
    assert res.returncode == (0 if err else 6), (res.returncode, res.stderr)
    assert not is_mounted(m.mountpoint)


def test_write_beyond_backing_max_file_size(mount_alignfs: Callable[..., Mount]) -> None:
    """ext4 (4 KiB blocks) stores at most 16 TiB per file; a buffered write past it.

    The write itself is accepted (buffered); its write-out fails with EFBIG,
    which fsync reports exactly once; the daemon keeps serving, a later write
    there fails at once, data below the limit is fine. The loss is not
    forgotten: ``alignfs flush`` exits 6, and so does ``alignfs umount``,
    which unmounts all the same (staying mounted would save nothing).
    """
    m = mount_alignfs("--flush-delay", "300")
    if subprocess.run(["stat", "-f", "-c", "%T", str(m.backing)], capture_output=True,
                      text=True).stdout.strip() != "ext2/ext3":
        pytest.skip("BACKING (the pytest tmp dir) is not on ext4")
    pid = m.pid
    beyond = 16 * (1 << 40) + MiB
    # O_DIRECT: each write(2) is a request alignfs answers (through the page
    # cache a write(2) is acknowledged by the kernel; fsync reports EFBIG).
    fd = os.open(m.mountpoint / "sparse.img", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        os.pwrite(fd, b"below the limit", 0)
        os.pwrite(fd, blocks(b"X", 0, 4), beyond)
        assert bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd))) == errno.EFBIG
        assert bounded(m, pid, lambda: errno_of(lambda: os.fsync(fd))) is None, \
            "EFBIG must be reported once"
        daemon_alive(m)
        assert errno_of(lambda: os.pwrite(fd, b"again", beyond + 8192)) == errno.EFBIG
        os.pwrite(fd, b"still fine", 100)
        bounded(m, pid, lambda: os.fsync(fd))
    finally:
        errno_of(lambda: os.close(fd))
    assert (m.backing / "sparse.img").read_bytes()[:110] == \
        b"below the limit" + bytes(85) + b"still fine"
    log = m.log.read_text()
    assert log.count("can never be written") == 1, log
    res = run_alignfs("flush", str(m.mountpoint))
    assert res.returncode == 6, (res.returncode, res.stderr)
    res = m.umount()
    assert res.returncode == 6, (res.returncode, res.stderr)
    assert not is_mounted(m.mountpoint)
    assert f"offset {beyond}" in m.log.read_text().rsplit("stopping", 1)[-1]
