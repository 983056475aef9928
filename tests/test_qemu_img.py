"""qemu-img (and qemu-io) as real clients of an alignfs mount.

Each test does the same work twice -- once at MOUNTPOINT, once in a plain
directory on the same filesystem -- and compares:

* what the tools print (paths replaced by ``<DIR>``): check, compare, info;
* the files, byte for byte, on BACKING after ``alignfs umount`` against the
  plain copies. qcow2 output of ``qemu-img convert`` is deterministic for the
  same input and options. The one exception is the snapshot table: every
  entry holds the wall-clock time the snapshot was taken (``date_sec``,
  ``date_nsec``), so for images with snapshots those 8 bytes per entry are
  masked and every other byte must match (the header, L1/L2 and refcount
  tables, and all data clusters, including those copied on write after the
  snapshot).

Snapshot commands on the byte-compared image run with
``pass-discard-snapshot=off``: by default qemu punches holes (fallocate
PUNCH_HOLE) into clusters a revert or delete frees. alignfs has no fallocate
(pyfuse3 offers no such handler, so the kernel answers EOPNOTSUPP and qemu
leaves the bytes), while the plain directory gets holes, so those clusters
would differ although both images are valid and read the same. Deleting a
snapshot is checked on a second, small image with the tools only.

The source is 64 MiB of seeded random data with every fifth MiB zero, so the
converted image also has unallocated clusters.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img not installed (apt-get install qemu-utils)")

MiB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qemu-src") / "src.raw"
    rng = random.Random(7)
    with open(path, "wb") as f:
        for i in range(64):
            f.write(bytes(MiB) if i % 5 == 3 else rng.randbytes(MiB))
    return path


def run(tool: str, *args: str | Path, rc: int = 0) -> str:
    res = subprocess.run([tool, *map(str, args)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == rc, f"{tool} {args}: exit {res.returncode}\n{res.stderr}"
    return res.stdout


def qemu_img(*args: str | Path, rc: int = 0) -> str:
    return run("qemu-img", *args, rc=rc)


def info(image: Path) -> dict:
    """``qemu-img info`` without what depends on the place or the clock."""
    out = json.loads(qemu_img("info", "--output=json", "-U", image))
    out.pop("filename")
    out.pop("actual-size", None)  # st_blocks: allocation policy of the filesystem
    for snap in out.get("snapshots", []):
        snap.pop("date-sec")
        snap.pop("date-nsec")
    return out


def snapshot_table_dates(image: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the date fields of every qcow2 snapshot table entry."""
    assert image[:4] == b"QFI\xfb"
    nb_snapshots, snapshots_offset = struct.unpack_from(">IQ", image, 60)
    spans = []
    pos = snapshots_offset
    for _ in range(nb_snapshots):
        id_len, name_len = struct.unpack_from(">HH", image, pos + 12)
        (extra_len,) = struct.unpack_from(">I", image, pos + 36)
        spans.append((pos + 16, 8))  # date_sec, date_nsec
        pos += 40 + extra_len + id_len + name_len
        pos += -pos % 8
    return spans


def masked(image: bytes) -> bytes:
    buf = bytearray(image)
    for off, n in snapshot_table_dates(image):
        buf[off:off + n] = bytes(n)
    return bytes(buf)


def both(mount_alignfs, tmp_path: Path):
    m = mount_alignfs()
    direct = tmp_path / "direct"
    direct.mkdir()
    return m, direct


def test_create_convert_check_compare_info(mount_alignfs, tmp_path, source):
    m, direct = both(mount_alignfs, tmp_path)
    outputs = {}
    for d in (m.mountpoint, direct):
        out = {
            "create": qemu_img("create", "-f", "qcow2", d / "empty.qcow2", "64M"),
            "convert": qemu_img("convert", "-t", "none", "-T", "none", "-f", "raw",
                                "-O", "qcow2", source, d / "img.qcow2"),
            "check": qemu_img("check", "-f", "qcow2", d / "img.qcow2"),
            "compare": qemu_img("compare", "-f", "raw", "-F", "qcow2", source, d / "img.qcow2"),
            # Back to raw, onto the same directory (a 64 MiB sequential writer).
            "to raw": qemu_img("convert", "-t", "none", "-f", "qcow2", "-O", "raw",
                               d / "img.qcow2", d / "back.raw"),
            "compare raw": qemu_img("compare", "-f", "raw", "-F", "raw", source,
                                    d / "back.raw"),
            "info": info(d / "img.qcow2"),
            "info empty": info(d / "empty.qcow2"),
        }
        outputs[d] = json.loads(json.dumps(out).replace(str(d), "<DIR>"))
    at_mount = outputs[m.mountpoint]
    assert "No errors were found" in at_mount["check"]
    assert at_mount["compare"].strip() == "Images are identical."
    assert at_mount["compare raw"].strip() == "Images are identical."
    assert at_mount["info"]["virtual-size"] == 64 * MiB
    assert at_mount["info"]["format"] == "qcow2"
    assert at_mount == outputs[direct]

    res = m.umount()
    assert res.returncode == 0, res.stderr
    for name in ("empty.qcow2", "img.qcow2", "back.raw"):
        assert (m.backing / name).read_bytes() == (direct / name).read_bytes(), name
    assert "No errors were found" in qemu_img("check", m.backing / "img.qcow2")
    qemu_img("compare", m.backing / "img.qcow2", direct / "img.qcow2")


def no_discard(image: Path) -> str:
    """--image-opts for *image* that keep freed clusters' bytes (no hole punching)."""
    return f"driver=qcow2,pass-discard-snapshot=off,file.filename={image}"


def test_snapshots(mount_alignfs, tmp_path, source):
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    m, direct = both(mount_alignfs, tmp_path)
    outputs = {}
    for d in (m.mountpoint, direct):
        img = d / "snap.qcow2"
        qemu_img("convert", "-t", "none", "-T", "none", "-f", "raw", "-O", "qcow2", source, img)
        qemu_img("snapshot", "--image-opts", "-c", "s1", no_discard(img))
        # Overwrite allocated clusters (copy on write) and zero a range.
        run("qemu-io", "-t", "none", "-f", "qcow2", "-c", "write -P 0x5a 1M 192k",
            "-c", "write -z 8M 64k", img)
        out = {
            "list": qemu_img("snapshot", "-l", img).splitlines()[:2],
            "snapshots": [(s["id"], s["name"]) for s in info(img)["snapshots"]],
            "changed": qemu_img("compare", "-f", "raw", "-F", "qcow2", source, img, rc=1),
            "extract s1": qemu_img("convert", "-t", "none", "-f", "qcow2", "-O", "raw",
                                   "-l", "snapshot.name=s1", img, d / "s1.raw"),
            "s1": qemu_img("compare", "-f", "raw", "-F", "raw", source, d / "s1.raw"),
            "check": qemu_img("check", "-f", "qcow2", img),
        }
        qemu_img("snapshot", "--image-opts", "-a", "s1", no_discard(img))
        out["reverted"] = qemu_img("compare", "-f", "raw", "-F", "qcow2", source, img)
        out["check reverted"] = qemu_img("check", "-f", "qcow2", img)
        out["info"] = info(img)

        # Deleting snapshots, on a small image (checked by the tools, not byte-compared:
        # see test docstring).
        small = d / "small.qcow2"
        qemu_img("create", "-f", "qcow2", small, "16M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", small)
        qemu_img("snapshot", "-c", "a", small)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 512k", small)
        qemu_img("snapshot", "-c", "b", small)
        qemu_img("snapshot", "-d", "a", small)
        run("qemu-io", "-f", "qcow2", "-c", "read -P 0x22 0 512k", "-c", "read -P 0x11 512k 512k",
            small)
        out["small snapshots"] = [s["name"] for s in info(small)["snapshots"]]
        out["small check"] = qemu_img("check", "-f", "qcow2", small)
        outputs[d] = json.loads(json.dumps(out).replace(str(d), "<DIR>"))
    at_mount = outputs[m.mountpoint]
    assert at_mount["list"][0] == "Snapshot list:"
    assert at_mount["snapshots"] == [["1", "s1"]]
    assert at_mount["changed"].strip() == "Content mismatch at offset 1048576!"
    assert at_mount["s1"].strip() == at_mount["reverted"].strip() == "Images are identical."
    assert "No errors were found" in at_mount["check reverted"]
    assert at_mount["small snapshots"] == ["b"]
    assert "No errors were found" in at_mount["small check"]
    assert at_mount == outputs[direct]

    res = m.umount()
    assert res.returncode == 0, res.stderr
    assert (m.backing / "s1.raw").read_bytes() == (direct / "s1.raw").read_bytes()
    ours, theirs = (m.backing / "snap.qcow2").read_bytes(), (direct / "snap.qcow2").read_bytes()
    assert len(snapshot_table_dates(ours)) == 1
    assert len(ours) == len(theirs)
    assert masked(ours) == masked(theirs)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", m.backing / "snap.qcow2",
             direct / "snap.qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", m.backing / "small.qcow2",
             direct / "small.qcow2")
