"""Data patterns and worker processes for ``tests/test_faults.py`` (not a test module).

Every 4 KiB block a test writes is ``block(tag, index)``: the tag and the
block's own index, repeated. A block read back therefore says which writer
wrote it and whether it landed at the right offset; zeros are told apart from
data. ``classify`` turns a block back into its tag.

Run as ``python faults_workers.py MODE ARGS...`` to get a worker process (the
tests bound each one with a subprocess timeout, so a hung request fails the
test instead of hanging it). A worker exits 0 when all went well, and 1 with
one line on stderr on the first unexpected error or wrong byte.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import sys
import threading
from collections.abc import Callable

BLOCK = 4096


def block(tag: bytes, idx: int) -> bytes:
    """Block number *idx* of the pattern *tag*."""
    unit = b"%s%011d|" % (tag, idx)
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


def blocks(tag: bytes, first: int, count: int) -> bytes:
    return b"".join(block(tag, i) for i in range(first, first + count))


ZERO = "zero"


def classify(data: bytes, idx: int, tag_len: int = 1) -> str | None:
    """``ZERO``, the tag if *data* is (a prefix of) ``block(tag, idx)``, else None."""
    if not data.strip(b"\0"):
        return ZERO
    tag = data[:tag_len]
    return tag.decode("latin-1") if data == block(tag, idx)[:len(data)] else None


def torn_ok(data: bytes, idx: int, tags: str) -> bool:
    """Each byte is that offset's byte of one of the *tags*' blocks, or zero.

    What a page-cache read may see while a write to the same block runs: the
    kernel's buffered read takes no lock against a write copying into the
    page (with the writeback cache as on ext4), so a block can be read half
    old, half new. Bytes from anywhere else are garbage.
    """
    versions = [block(t.encode(), idx)[:len(data)] for t in tags]
    return all(b == 0 or any(v[k] == b for v in versions) for k, b in enumerate(data))


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


# -- modes ---------------------------------------------------------------------

def stripe(path: str, worker: int, workers: int, chunk: int, total: int, seed: int) -> None:
    """Write every *workers*-th chunk of ``blocks(b"S", ...)`` (disjoint ranges)."""
    content = blocks(b"S", 0, -(-total // BLOCK))[:total]
    chunks = list(range(worker, -(-total // chunk), workers))
    random.Random(seed).shuffle(chunks)
    fd = os.open(path, os.O_WRONLY)
    try:
        for k in chunks:
            piece = content[k * chunk:(k + 1) * chunk]
            if os.pwrite(fd, piece, k * chunk) != len(piece):
                fail(f"short write at chunk {k}")
    finally:
        os.close(fd)


def overlap(path: str, tag: str, nblocks: int, piece: int, rounds: int, seed: int) -> None:
    """Write the whole file, *piece* blocks at a time in random order, *rounds* times."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(rounds):
            starts = list(range(0, nblocks, piece))
            rng.shuffle(starts)
            for s in starts:
                n = min(piece, nblocks - s)
                os.pwrite(fd, blocks(tag.encode(), s, n), s * BLOCK)
    finally:
        os.close(fd)


def scribble(path: str, tag: str, nblocks: int, count: int, seed: int, direct: int) -> None:
    """*count* writes of 1..16 whole blocks at random block offsets; with
    *direct* through O_DIRECT (each write one WRITE request from this
    process' own, unchanging buffer), else through the page cache."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, 16 * BLOCK)  # page-aligned, as O_DIRECT requires
    try:
        for _ in range(count):
            s = rng.randrange(nblocks)
            n = min(rng.randint(1, 16), nblocks - s)
            buf[:n * BLOCK] = blocks(tag.encode(), s, n)
            with memoryview(buf) as view:
                os.pwrite(fd, view[:n * BLOCK], s * BLOCK)
    finally:
        os.close(fd)
        buf.close()


def reader(path: str, tags: str, nblocks: int, count: int, seed: int, direct: int,
           strict: int) -> None:
    """*count* reads at random block offsets; every block must be a known tag or zeros.

    With *direct*, the file is opened O_DIRECT so every read reaches the daemon
    (no kernel page cache in between). A block read while a write to it runs
    may be torn between versions (see torn_ok) unless *strict*: for an
    O_DIRECT reader while the writers are O_DIRECT too, since the daemon
    applies each WRITE and answers each READ in one step. Writers through the
    page cache are another matter: the kernel's writeback (6.18) sends a page
    the writer is still copying into, so the daemon itself receives torn
    blocks for a while (seen: a WRITE from kernel writeback holding a block
    of A and B bytes), until the page's next writeback.
    """
    rng = random.Random(seed)
    allowed = set(tags) | {ZERO}
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        for _ in range(count):
            s = rng.randrange(nblocks)
            n = rng.randint(1, 32)
            data = os.pread(fd, n * BLOCK, s * BLOCK)
            for i in range(0, len(data), BLOCK):
                got = classify(data[i:i + BLOCK], s + i // BLOCK)
                if got not in allowed and (strict or not torn_ok(data[i:i + BLOCK],
                                                                 s + i // BLOCK, tags)):
                    fail(f"block {s + i // BLOCK} read as {data[i:i + 32]!r}... "
                         f"(not one of {sorted(allowed)})")
    finally:
        os.close(fd)


def truncater(path: str, nblocks: int, count: int, seed: int) -> None:
    """*count* ftruncates to random whole-block sizes."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            os.ftruncate(fd, rng.randrange(nblocks + 1) * BLOCK)
    finally:
        os.close(fd)


def file_content(index: int, size: int) -> bytes:
    """What ``many`` writes to file number *index*."""
    return blocks(b"F%03d" % index, 0, -(-size // BLOCK))[:size]


def in_threads(fn: Callable[[int], None], n: int, errors: list[str]) -> None:
    """Run fn(0) .. fn(n-1) in threads at once; fail the process if any left an error."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        fail("; ".join(errors))


def many(directory: str, nfiles: int, size: int, chunk: int, direct: int = 0) -> None:
    """*nfiles* threads, each writing its own new file sequentially in *chunk* pieces
    (with O_DIRECT if *direct*: QEMU cache=none's way, every write straight to
    alignfs, unaligned; FUSE's direct_io takes any alignment)."""
    errors: list[str] = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)

    def write_one(i: int) -> None:
        try:
            data = file_content(i, size)
            fd = os.open(os.path.join(directory, f"f{i:03d}"), flags, 0o644)
            try:
                for off in range(0, size, chunk):
                    view = memoryview(data)[off:off + chunk]
                    while view:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except Exception as exc:  # reported below, the process fails
            errors.append(f"f{i:03d}: {exc!r}")

    in_threads(write_one, nfiles, errors)


def fill(directory: str, nfiles: int, size: int, chunk: int) -> None:
    """Like ``many``, for a full disk: a writer stops at its first error, which must be ENOSPC.

    Prints how many writers got ENOSPC.
    """
    errors: list[str] = []
    full = []

    def write_one(i: int) -> None:
        try:
            fd = os.open(os.path.join(directory, f"f{i:03d}"), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for off in range(0, size, chunk):
                    os.pwrite(fd, file_content(i, size)[off:off + chunk], off)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                full.append(i)
            else:
                errors.append(f"f{i:03d}: {exc!r}")

    in_threads(write_one, nfiles, errors)
    print(len(full))


def readmany(directory: str, nfiles: int, size: int, chunk: int) -> None:
    """*nfiles* threads, each reading file ``f<i>`` sequentially; content must match."""
    errors: list[str] = []

    def read_one(i: int) -> None:
        try:
            got = bytearray()
            with open(os.path.join(directory, f"f{i:03d}"), "rb", buffering=0) as f:
                while piece := f.read(chunk):
                    got += piece
            if got != file_content(i, size):
                errors.append(f"f{i:03d}: content differs")
        except Exception as exc:  # reported below, the process fails
            errors.append(f"f{i:03d}: {exc!r}")

    in_threads(read_one, nfiles, errors)


MODES = {"stripe": (stripe, (str, int, int, int, int, int)),
         "overlap": (overlap, (str, str, int, int, int, int)),
         "scribble": (scribble, (str, str, int, int, int, int)),
         "reader": (reader, (str, str, int, int, int, int, int)),
         "truncater": (truncater, (str, int, int, int)),
         "many": (many, (str, int, int, int, int)),
         "readmany": (readmany, (str, int, int, int)),
         "fill": (fill, (str, int, int, int))}


def main(argv: list[str]) -> None:
    fn, types = MODES[argv[0]]
    args = [t(a) for t, a in zip(types, argv[1:], strict=True)]
    try:
        fn(*args)
    except OSError as exc:
        fail(f"{argv[0]}: {exc!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
