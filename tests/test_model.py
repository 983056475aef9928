"""Randomized model-based test through a real mount.

A seeded generator drives interleaved operations on 2-3 files through several
handles -- writes of random sizes at random (unaligned, overlapping, sparse,
past-EOF) offsets, O_APPEND writes, reads, truncates up and down, fsync and
fdatasync, close and reopen (with and without O_TRUNC) -- and checks the mount
against an in-memory model after every step, BACKING against the model after
every fsync and after unmount. Small buffers (64K, 1M dirty, 2 per file) make
sealing, moved-on and pressure write-outs happen all the time.

Checking reads use an O_DIRECT handle, so they reach the daemon (not the
kernel's page cache) and test its overlay of buffered on backing data; a
cached read is done now and then as well.

On failure the message names the seed and step and shows the last operations;
rerun one seed with ``-k 'seed-N'``.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import is_mounted

B = 64 * 1024
MAX_SIZE = 1 << 20  # keep files small enough to compare whole after every step


@dataclass
class H:
    name: str
    fd: int
    flags: int
    cursor: int = 0

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY

    @property
    def readable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_WRONLY

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


class DirectReader:
    """Reads whole files at the mount with O_DIRECT (so the daemon answers)."""

    def __init__(self) -> None:
        self.mem = mmap.mmap(-1, MAX_SIZE + 16 * B)

    def read(self, path: Path, size: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            want = -(-(size + 1) // 4096) * 4096  # one more byte: must hit EOF
            view = memoryview(self.mem)[:want]
            done = 0
            while done < want:
                n = os.preadv(fd, [view[done:]], done)
                if n == 0:
                    break
                done += n
            out = bytes(view[:done])
            view.release()
            return out
        finally:
            os.close(fd)

    def close(self) -> None:
        self.mem.close()


class Runner:
    def __init__(self, mount, seed: int, files: int) -> None:
        self.m = mount
        self.seed = seed
        self.rng = random.Random(seed)
        self.names = [f"file{i}.img" for i in range(files)]
        self.model: dict[str, bytearray] = {n: bytearray() for n in self.names}
        self.handles: list[H] = []
        self.log: deque[str] = deque(maxlen=25)
        self.step = 0
        self.reader = DirectReader()
        self.counts: dict[str, int] = {}
        for n in self.names:
            (mount.mountpoint / n).write_bytes(b"")

    def where(self) -> str:
        return (f"seed {self.seed} step {self.step}; last operations:\n  "
                + "\n  ".join(self.log))

    # -- operations ----------------------------------------------------------------

    def op_open(self) -> None:
        name = self.rng.choice(self.names)
        r = self.rng.random()
        if r < 0.15:
            flags = os.O_RDONLY
        elif r < 0.35:
            flags = os.O_WRONLY | os.O_APPEND
        elif r < 0.45:
            flags = os.O_RDWR | os.O_APPEND
        elif r < 0.6:
            flags = os.O_WRONLY
        elif r < 0.7:
            flags = os.O_RDWR | os.O_DIRECT  # as QEMU with cache=none
        else:
            flags = os.O_RDWR
        if flags != os.O_RDONLY and self.rng.random() < 0.08:
            flags |= os.O_TRUNC
            self.model[name].clear()
        fd = os.open(self.m.mountpoint / name, flags)
        self.handles.append(H(name, fd, flags))
        self.log.append(f"open {name} flags={flags:#o} -> fd {fd}")

    def op_close(self) -> None:
        h = self.handles.pop(self.rng.randrange(len(self.handles)))
        os.close(h.fd)
        self.log.append(f"close fd {h.fd} ({h.name})")

    def _length(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randrange(1, 100)
        if r < 0.6:
            return self.rng.randrange(1, 9000)
        if r < 0.75:
            return 4096 * self.rng.randrange(1, 20) + self.rng.choice([-1, 0, 1, 8])
        return self.rng.randrange(1, 3 * B + 1000)

    def op_write(self, h: H) -> None:
        model = self.model[h.name]
        n = self._length()
        data = self.rng.randbytes(n)
        if h.append:
            off = len(model)
            if off + n > MAX_SIZE:
                return
            assert os.write(h.fd, data) == n, self.where()
        else:
            r = self.rng.random()
            if r < 0.5:
                off = self.rng.randrange(0, len(model) + 1)  # inside / at EOF
            elif r < 0.8:
                off = self.rng.randrange(0, len(model) + 3 * B + 1)  # maybe sparse
            else:
                off = self.rng.randrange(0, 8 * B)
            if off + n > MAX_SIZE:
                return
            assert os.pwrite(h.fd, data, off) == n, self.where()
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off:off + n] = data
        self.log.append(f"write fd {h.fd} ({h.name}) off {off} len {n}"
                        + (" append" if h.append else ""))

    def op_read(self, h: H) -> None:
        model = self.model[h.name]
        off = self.rng.randrange(0, len(model) + 2 * B)
        n = self.rng.randrange(1, 3 * B)
        got = os.pread(h.fd, n, off)
        self.log.append(f"read fd {h.fd} ({h.name}) off {off} len {n}")
        assert got == bytes(model[off:off + n]), self.where()

    def op_seq_read(self, h: H) -> None:
        """A run of small sequential reads from the handle's cursor (a stream
        reader: this is what read-ahead serves)."""
        model = self.model[h.name]
        pos = h.cursor if h.cursor <= len(model) else 0
        for _ in range(self.rng.randrange(3, 12)):
            n = self.rng.choice([8, 4096, 4104, 65536, 131328])
            got = os.pread(h.fd, n, pos)
            assert got == bytes(model[pos:pos + n]), \
                f"sequential read at {pos} len {n}: {self.where()}"
            pos += len(got)
            if not got:
                pos = 0
        h.cursor = pos
        self.log.append(f"seq-read fd {h.fd} ({h.name}) up to {pos}")

    def op_truncate(self, h: H | None) -> str:
        name = h.name if h else self.rng.choice(self.names)
        model = self.model[name]
        r = self.rng.random()
        if r < 0.4:
            size = self.rng.randrange(0, len(model) + 1)
        elif r < 0.7:
            size = self.rng.randrange(0, len(model) + 2 * B)
        else:
            size = max(0, len(model) + self.rng.randrange(-5000, 5000))
        size = min(size, MAX_SIZE)
        if h is not None:
            os.ftruncate(h.fd, size)
            self.log.append(f"ftruncate fd {h.fd} ({name}) {size}")
        else:
            os.truncate(self.m.mountpoint / name, size)
            self.log.append(f"truncate {name} {size}")
        if size < len(model):
            del model[size:]
        else:
            model.extend(bytes(size - len(model)))
        return name

    def op_fsync(self, h: H) -> None:
        if self.rng.random() < 0.5:
            os.fsync(h.fd)
            self.log.append(f"fsync fd {h.fd} ({h.name})")
        else:
            os.fdatasync(h.fd)
            self.log.append(f"fdatasync fd {h.fd} ({h.name})")
        on_backing = (self.m.backing / h.name).read_bytes()
        assert on_backing == bytes(self.model[h.name]), \
            f"BACKING differs after fsync: {self.where()}"

    # -- driver --------------------------------------------------------------------

    def check(self, name: str) -> None:
        model = self.model[name]
        path = self.m.mountpoint / name
        assert os.stat(path).st_size == len(model), self.where()
        got = self.reader.read(path, len(model))
        if got != bytes(model):
            first = next((i for i, (a, b) in enumerate(zip(got, model, strict=False)) if a != b),
                         min(len(got), len(model)))
            raise AssertionError(f"{name}: mount differs from model at byte {first} "
                                 f"(got {len(got)} bytes, want {len(model)}): {self.where()}")

    def one_step(self) -> None:
        rng = self.rng
        if len(self.handles) < 2 or (len(self.handles) < 6 and rng.random() < 0.06):
            self.op_open()
            return
        r = rng.random()
        h = rng.choice(self.handles)
        if r < 0.05:
            self.op_close()
            return
        if r < 0.6:
            if h.writable:
                self.op_write(h)
                name = h.name
            else:
                self.op_read(h)
                name = h.name
        elif r < 0.72:
            if h.readable:
                if rng.random() < 0.5:
                    self.op_read(h)
                else:
                    self.op_seq_read(h)
            name = h.name
        elif r < 0.8:
            name = self.op_truncate(h if h.writable and rng.random() < 0.7 else None)
        elif r < 0.85:
            if h.writable or rng.random() < 0.5:
                self.op_fsync(h)
            name = h.name
        else:
            name = h.name
        self.counts[name] = self.counts.get(name, 0) + 1
        self.check(name)

    def run(self, steps: int) -> None:
        try:
            for self.step in range(steps):
                self.one_step()
            for name in self.names:
                self.check(name)
        finally:
            for h in self.handles:
                os.close(h.fd)
            self.handles.clear()
            self.reader.close()

    def check_backing(self) -> None:
        for name in self.names:
            on_backing = (self.m.backing / name).read_bytes()
            assert on_backing == bytes(self.model[name]), \
                f"BACKING {name} differs after unmount (seed {self.seed})"


MOUNT_OPTIONS = ("--buffer-size", "64K", "--max-dirty", "1M", "--buffers-per-file", "2")


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in range(8)])
def test_random_operations_match_model(mount_alignfs, seed):
    # every other seed with a short flush delay, so age write-outs interleave too;
    # every third with memory for 3 buffers only, so writers hit pressure
    delay = "0.2" if seed % 2 else "30"
    max_dirty = 3 * B if seed % 3 == 2 else 1 << 20
    m = mount_alignfs("--buffer-size", "64K", "--max-dirty", str(max_dirty),
                      "--buffers-per-file", "2", "--flush-delay", delay)
    runner = Runner(m, seed, files=2 + seed % 2)
    runner.run(300)
    st = m.stats()
    assert st["unaligned_backing_writes"] == 0
    assert st["backing_errors"] == 0
    assert st["peak_dirty_bytes"] <= max_dirty
    if max_dirty == 3 * B:
        assert st["flushes"]["pressure"] > 0
    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)
    runner.check_backing()


def test_concurrent_writers_disjoint_stripes(mount_alignfs):
    """Threads writing interleaved unaligned stripes of one file at once (requests in
    flight together in the daemon), plus a second file, under memory pressure."""
    m = mount_alignfs(*MOUNT_OPTIONS)
    stripe = 3001
    nthreads = 4
    rounds = 120
    size = stripe * nthreads * rounds
    rng = random.Random(42)
    data = rng.randbytes(size)
    other = rng.randbytes(700_001)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            fd = os.open(m.mountpoint / "shared", os.O_WRONLY)
            try:
                for r in range(rounds):
                    off = (r * nthreads + k) * stripe
                    assert os.pwrite(fd, data[off:off + stripe], off) == stripe
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def other_worker() -> None:
        try:
            with open(m.mountpoint / "other", "wb", buffering=0) as f:
                for pos in range(0, len(other), 7777):
                    f.write(other[pos:pos + 7777])
        except BaseException as exc:
            errors.append(exc)

    (m.mountpoint / "shared").write_bytes(b"")
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    threads.append(threading.Thread(target=other_worker))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (m.mountpoint / "shared").read_bytes() == data
    assert (m.mountpoint / "other").read_bytes() == other
    st = m.stats()
    assert st["unaligned_backing_writes"] == 0
    assert m.umount().returncode == 0
    assert (m.backing / "shared").read_bytes() == data
    assert (m.backing / "other").read_bytes() == other
