"""Coalescing through a real mount, proven by counting backing writes.

Every backing pwrite is recorded by ``--trace-writes`` (``name offset length``)
and counted in the daemon's stats; the tests derive the exact expected
numbers from the write pattern.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
from pathlib import Path

from conftest import is_mounted

MiB = 1 << 20


def read_trace(path: Path) -> list[tuple[str, int, int]]:
    out = []
    for line in path.read_text().splitlines():
        name, off, length = line.rsplit(" ", 2)
        out.append((name, int(off), int(length)))
    return out


def ceil_to(n: int, a: int) -> int:
    return -(-n // a) * a


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def check_full_buffer_trace(trace: list[tuple[int, int]], size: int, bsize: int,
                            align: int) -> None:
    """Writes of one sequentially filled file: one aligned pwrite per window; in
    the last window, the aligned part, then the rest of the last block up to
    EOF (written through the page cache: BACKING is never padded past EOF)."""
    expected = [(k * bsize, bsize) for k in range(size // bsize)]
    last_off = size - size % bsize
    aligned = (size - last_off) - (size - last_off) % align
    if aligned:
        expected.append((last_off, aligned))
    if size % align:
        expected.append((last_off + aligned, size % align))
    assert sorted(trace) == expected


def test_qemu_migration_stream_becomes_full_aligned_buffers(mount_alignfs, tmp_path):
    """QEMU-file-like stream: writev of [8-byte header, 4 KiB page] pairs, unaligned."""
    bsize = 4 * MiB
    trace_file = tmp_path / "trace"
    m = mount_alignfs("--buffer-size", "4M", "--trace-writes", str(trace_file))
    align = m.stats()["align"]
    assert align >= 4096 and bsize % align == 0

    rng = random.Random(7)
    pairs_per_writev = 32  # 32 * 4104 = 131328 bytes per writev
    n_writev = 64 * MiB // (4096 * pairs_per_writev)
    expect = hashlib.sha256()
    total = 0
    # O_DIRECT, as QEMU cache=none: each writev reaches alignfs as it is (a
    # buffered descriptor's bytes would come through the kernel's writeback
    # cache, in its own pieces and at its own time).
    fd = os.open(m.mountpoint / "vmstate",
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for i in range(n_writev):
            iov = []
            for j in range(pairs_per_writev):
                iov.append((i * pairs_per_writev + j).to_bytes(8, "big"))
                iov.append(rng.randbytes(4096))
            n = os.writev(fd, iov)
            assert n == sum(map(len, iov))
            for piece in iov:
                expect.update(piece)
            total += n
        tail = b"end-of-stream" * 7  # an odd-sized last record
        assert os.write(fd, tail) == len(tail)
        expect.update(tail)
        total += len(tail)

        # before close: only the unfilled last window is still buffered
        st = m.stats()
        assert st["write_bytes"] == total
        assert st["dirty_bytes"] >= total % bsize  # full ones may still be in flight
        assert st["backing_writes"] <= total // bsize  # so far full windows only
    finally:
        os.close(fd)
    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mountpoint)

    trace = read_trace(trace_file)
    assert {name for name, _, _ in trace} == {"vmstate"}
    check_full_buffer_trace([(o, n) for _, o, n in trace], total, bsize, align)
    assert (m.backing / "vmstate").stat().st_size == total
    assert sha256_file(m.backing / "vmstate") == expect.hexdigest()


def test_stream_counters(mount_alignfs, tmp_path):
    """The same proof by the daemon's own counters, read before unmount."""
    bsize = 1 * MiB
    m = mount_alignfs("--buffer-size", "1M")
    rng = random.Random(8)
    data = rng.randbytes(20 * MiB + 12345)
    with open(m.mountpoint / "s", "wb", buffering=0) as f:
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 8, 4104, 65537, 131328])
            f.write(data[pos:pos + n])
            pos += n
        os.fsync(f.fileno())
    st = m.stats()
    align = st["align"]
    windows = -(-len(data) // bsize)
    # one write per window, and one for the last block below EOF (never padded)
    assert len(data) % align and st["tail_writes"] == 1
    assert st["backing_writes"] == windows + 1
    assert st["flushes"]["full"] + st["flushes"]["fsync"] == windows
    assert st["flushes"]["fsync"] >= 1
    assert st["unaligned_backing_writes"] == 0
    assert st["rmw_block_reads"] == 0
    assert st["backing_write_bytes"] == len(data)
    assert st["mean_backing_write_size"] >= bsize // 2
    assert st["backing_fsyncs"] == 1
    assert st["dirty_bytes"] == 0
    assert (m.backing / "s").read_bytes() == data


def test_interleaved_files_each_coalesce(mount_alignfs, tmp_path):
    """Two unaligned streams written alternately: still one pwrite per window each."""
    bsize = 1 * MiB
    trace_file = tmp_path / "trace"
    m = mount_alignfs("--buffer-size", "1M", "--trace-writes", str(trace_file))
    align = m.stats()["align"]
    rng = random.Random(9)
    datas = {"a": rng.randbytes(9 * MiB + 1), "b": rng.randbytes(7 * MiB + 4097)}
    files = {k: open(m.mountpoint / k, "wb", buffering=0) for k in datas}  # noqa: SIM115
    try:
        pos = dict.fromkeys(datas, 0)
        while any(pos[k] < len(datas[k]) for k in datas):
            for k, f in files.items():
                n = 12345
                f.write(datas[k][pos[k]:pos[k] + n])
                pos[k] += n
    finally:
        for f in files.values():
            f.close()
    assert m.umount().returncode == 0
    trace = read_trace(trace_file)
    for k, data in datas.items():
        check_full_buffer_trace([(o, n) for name, o, n in trace if name == k], len(data),
                                bsize, align)
        assert (m.backing / k).read_bytes() == data


def test_qemu_cache_none_pattern_reads_answered_from_buffers(mount_alignfs, tmp_path):
    """QEMU with cache=none on a 4K-aligned image, guest writing 131328-byte requests.

    Each guest write is unaligned, so QEMU reads the partly covered head block
    (the one holding the previous write's end) with O_DIRECT, merges, and
    writes the aligned span: 135168 bytes at a 4K offset. Those reads must be
    answered from the buffers, and BACKING must still see full buffers.
    """
    bsize = 4 * MiB
    trace_file = tmp_path / "trace"
    m = mount_alignfs("--buffer-size", "4M", "--trace-writes", str(trace_file))
    align = m.stats()["align"]
    guest = 131328
    n_writes = 400  # ~50 MiB, 12 full windows
    rng = random.Random(10)
    image = bytearray()
    head_reads = 0
    buf = mmap.mmap(-1, 135168)
    block = mmap.mmap(-1, 4096)
    fd = os.open(m.mountpoint / "disk.raw", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for k in range(n_writes):
            g = k * guest
            start, end = g - g % 4096, ceil_to(g + guest, 4096)
            assert end - start == 135168
            payload = rng.randbytes(guest)
            buf[:] = bytes(135168)
            if g % 4096:
                assert os.preadv(fd, [block], start) == 4096
                head_reads += 1
                assert bytes(block) == bytes(image[start:start + 4096])
                buf[:4096] = block
            buf[g - start:g - start + guest] = payload
            assert os.pwrite(fd, buf, start) == 135168
            image[start:] = bytes(buf)
            del image[end:]
    finally:
        os.close(fd)
        buf.close()
        block.close()
    st = m.stats()
    assert st["read_requests"] == head_reads
    # a head block can only be missing from the buffers when its window was
    # just completed and written out: at most once per window
    windows = -(-len(image) // bsize)
    assert st["backing_reads"] <= windows
    assert st["reads_from_buffers"] >= head_reads - windows
    assert st["rmw_block_reads"] == 0
    assert st["unaligned_backing_writes"] == 0
    assert m.umount().returncode == 0
    check_full_buffer_trace([(o, n) for _, o, n in read_trace(trace_file)], len(image),
                            bsize, align)
    assert (m.backing / "disk.raw").read_bytes() == bytes(image)
