"""Real clients through the mount: qemu-img (cache=none) and fio with verification.

Each test is skipped when its client is not installed.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MiB = 1 << 20

qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # cwd: fio leaves verify state files in its working directory.
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())


def check(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"{res.args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"


@qemu_img
def test_qemu_img_bench_cache_none(mount_alignfs):
    m = mount_alignfs("--buffer-size", "4M")
    img = m.mountpoint / "bench.raw"
    size = 256 * MiB
    check(run("qemu-img", "create", "-f", "raw", str(img), str(size)))
    count, step = 2000, 131328
    check(run("qemu-img", "bench", "-w", "-t", "none", "-s", str(step), "-S", str(step),
              "-c", str(count), "--pattern=0x5a", "-f", "raw", str(img)))
    assert img.stat().st_size == size
    st = m.stats()
    assert st["unaligned_backing_writes"] == 0
    assert st["backing_errors"] == 0
    # 64 requests in parallel arrive out of order, and each one's partly covered
    # head block is read first (QEMU's read-modify-write): still about one
    # backing write per 4M window -- 64 for 63 windows in most runs, a few more
    # when a late request splits a window. When a split spreads to every later
    # window it is hundreds (deterministic versions in test_write_cache_unit:
    # test_straggler_does_not_split_later_windows,
    # test_reordered_stream_whose_first_pass_reaches_window_end).
    windows = -(-count * step // (4 * MiB))
    assert st["backing_writes"] <= 2 * windows, json.dumps(st)
    assert m.umount().returncode == 0
    written = count * step
    with open(m.backing / "bench.raw", "rb") as f:
        assert f.seek(0, 2) == size
        f.seek(0)
        pos = 0
        while pos < written:
            chunk = f.read(min(4 * MiB, written - pos))
            assert chunk == b"\x5a" * len(chunk), f"pattern broken near offset {pos}"
            pos += len(chunk)
        rest = f.read()
        assert rest == bytes(len(rest))  # never written: still a hole


def _source_image(path: Path) -> None:
    rng = random.Random(11)
    with open(path, "wb") as f:
        for i in range(40):
            if i % 3 == 0:
                f.write(bytes(MiB))  # zero runs: convert skips or zero-writes them
            else:
                f.write(rng.randbytes(MiB))
        f.write(rng.randbytes(12288))


@qemu_img
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_convert_cache_none(mount_alignfs, tmp_path, fmt):
    m = mount_alignfs("--buffer-size", "1M")
    src = tmp_path / "src.raw"
    _source_image(src)
    dst = m.mountpoint / f"dst.{fmt}"
    check(run("qemu-img", "convert", "-t", "none", "-f", "raw", "-O", fmt, str(src), str(dst)))
    check(run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(src), str(dst)))
    if fmt == "qcow2":
        check(run("qemu-img", "check", str(dst)))
    assert m.stats()["unaligned_backing_writes"] == 0
    assert m.umount().returncode == 0
    # what reached BACKING, read without the mount
    check(run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(src),
              str(m.backing / f"dst.{fmt}")))
    if fmt == "raw":
        assert (m.backing / "dst.raw").read_bytes() == src.read_bytes()


@fio
@pytest.mark.parametrize("direct,bs", [
    (0, ["--bs=4100"]),
    (1, ["--bs=4100"]),
    (0, ["--bsrange=1000-70000"]),
    (1, ["--bsrange=1000-70000"]),
])
def test_fio_randwrite_unaligned_verify(mount_alignfs, tmp_path, direct, bs):
    m = mount_alignfs("--buffer-size", "256K", "--max-dirty", "2M")
    out = tmp_path / "fio.json"
    # a multiple of every block size used: fio then never re-lays out the file
    size = 8_364_000
    res = run("fio", "--name=alignfs", f"--filename={m.mountpoint / 'fio.dat'}", f"--size={size}",
              "--rw=randwrite", *bs, f"--direct={direct}", "--ioengine=psync",
              "--verify=crc32c", "--do_verify=1", "--randseed=1234",
              "--output-format=json", f"--output={out}")
    check(res)
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    written = job["write"]["io_bytes"]
    assert written > size * 0.9
    assert job["read"]["io_bytes"] == written  # everything read back and verified
    st = m.stats()
    assert st["write_bytes"] >= written
    assert st["unaligned_backing_writes"] == 0
    assert st["backing_errors"] == 0
    assert m.umount().returncode == 0
    # and BACKING verifies too: a verify-only pass directly on the backing file
    assert (m.backing / "fio.dat").stat().st_size == size
    res = run("fio", "--name=alignfs", f"--filename={m.backing / 'fio.dat'}", f"--size={size}",
              "--rw=randwrite", *bs, "--ioengine=psync", "--verify=crc32c", "--verify_only",
              "--randseed=1234", "--output-format=json", f"--output={out}")
    check(res)
    assert json.loads(out.read_text())["jobs"][0]["error"] == 0
    assert (m.backing / "fio.dat").stat().st_size == size  # verified, not rewritten
