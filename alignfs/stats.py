"""Counters kept by the daemon and shown by ``alignfs stats``.

They are how coalescing is proven rather than claimed: for a sequential
unaligned stream, ``backing_writes`` is about ``write_bytes / buffer_size`` and
``unaligned_backing_writes`` stays 0.

Each counter is declared once, here, with what every view of it needs: the
row label of ``alignfs stats``, the help text and type of its Prometheus
metric, and its unit (how it is printed, and which rates ``--watch`` makes of
it). :func:`describe` lists them; the views iterate it, so a counter added or
renamed here shows up everywhere, and nowhere under its old name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

FLUSH_CAUSES = ("full", "moved_on", "age", "idle", "pressure", "fsync", "close", "unmount",
                "truncate")


@dataclasses.dataclass(frozen=True)
class Counter:
    """What the views of one Stats field need to know."""

    key: str
    #: "counter" (only grows) or "gauge" (goes up and down)
    kind: str
    #: "count", "bytes" or "seconds"
    unit: str
    #: row label of ``alignfs stats``
    label: str
    #: one sentence for the Prometheus HELP line
    help: str


def _field(kind: str, unit: str, label: str, help: str, default: Any = 0) -> Any:
    meta = {"kind": kind, "unit": unit, "label": label, "help": help}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _count(label: str, help: str, unit: str = "count") -> Any:
    return _field("counter", unit, label, help)


def _gauge(label: str, help: str, unit: str = "bytes") -> Any:
    return _field("gauge", unit, label, help)


@dataclasses.dataclass
class Stats:
    # requests from clients
    write_requests: int = _count("write requests in", "Write requests received from clients.")
    write_bytes: int = _count("bytes written in", "Bytes written by clients.", "bytes")
    read_requests: int = _count("read requests in", "Read requests received from clients.")
    read_bytes: int = _count("bytes read out", "Bytes read by clients.", "bytes")
    reads_from_buffers: int = _count(
        "reads answered from buffers", "Reads answered entirely from buffered data.")
    hole_reads: int = _count(
        "reads of known holes", "Reads that touched a known hole of BACKING (zeros, not read).")
    # what reached BACKING
    backing_writes: int = _count("backing writes out", "Writes made to BACKING.")
    backing_write_bytes: int = _count("bytes written out", "Bytes written to BACKING.", "bytes")
    unaligned_backing_writes: int = _count(
        "unaligned backing writes", "O_DIRECT writes to BACKING that were not aligned.")
    tail_writes: int = _count(
        "last blocks below EOF", "Parts of a last block below EOF, written through the page "
        "cache (a whole O_DIRECT block would pad the file past its size).")
    backing_reads: int = _count("backing reads out", "Reads made from BACKING.")
    backing_read_bytes: int = _count("bytes read from backing", "Bytes read from BACKING.",
                                     "bytes")
    rmw_block_reads: int = _count(
        "read-modify-write block reads",
        "Partly covered blocks read back from BACKING before a write.")
    zero_fill_bytes: int = _count(
        "zeros written to join writes",
        "Zeros written past BACKING's end to join nearby extents into one write.", "bytes")
    gap_read_bytes: int = _count(
        "bytes read to join writes",
        "Bytes read back from BACKING to join a buffer's nearby extents into one write.",
        "bytes")
    readahead_hits: int = _count("read-ahead hits", "Reads served from read-ahead data.")
    readahead_bytes: int = _count("bytes read ahead", "Bytes read ahead from BACKING.", "bytes")
    readahead_wasted_bytes: int = _count(
        "read-ahead wasted", "Bytes read ahead and dropped unread.", "bytes")
    readahead_errors: int = _count(
        "read-ahead errors", "Read-ahead fetches that failed (their reads went to BACKING).")
    fsyncs: int = _count("fsync requests", "fsync and fdatasync requests from clients.")
    backing_fsyncs: int = _count("backing fsyncs", "fsyncs of BACKING files.")
    backing_errors: int = _count("backing errors", "Failed writes, reads or fsyncs of BACKING.")
    lost_writes: int = _count(
        "writes dropped (permanent error)", "Writes dropped by a permanent write-out error "
        "(EFBIG).")
    lost_bytes: int = _count("bytes dropped", "Bytes dropped by permanent write-out errors.",
                             "bytes")
    # memory
    dirty_bytes: int = _gauge("dirty now", "Bytes buffered and not yet written to BACKING.")
    peak_dirty_bytes: int = _gauge("dirty peak", "Highest dirty bytes since the mount.")
    buffers_in_use: int = _gauge("buffers in use", "Write buffers taken from the pool.",
                                 "count")
    pool_bytes: int = _gauge(
        "buffer pool", "Memory the write-buffer pool has made (it keeps it until unmount).")
    pool_touch_seconds: float = _field(
        "counter", "seconds", "pool first touch (CPU s)",
        "CPU seconds spent faulting in new write buffers: once per buffer per mount.", 0.0)
    writer_wait_seconds: float = _field(
        "counter", "seconds", "writer wait (s)",
        "Seconds writers waited for buffer memory (--max-dirty) or for their file's "
        "write-out queue (--writeout-queue): the disk is behind.", 0.0)
    flushes: dict[str, int] = _field(
        "counter", "count", "buffer flushes by cause",
        "Buffers written to BACKING, by the reason they were written.",
        lambda: dict.fromkeys(FLUSH_CAUSES, 0))

    def add_dirty(self, n: int) -> None:
        self.dirty_bytes += n
        if self.dirty_bytes > self.peak_dirty_bytes:
            self.peak_dirty_bytes = self.dirty_bytes

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy cost the daemon 2% of its
        # CPU while the bench sampled the stats ten times a second.
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        out["flushes"] = dict(self.flushes)
        out["mean_backing_write_size"] = (
            self.backing_write_bytes // self.backing_writes if self.backing_writes else 0)
        return out


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Stats))


def describe() -> Iterator[Counter]:
    """Every field of :class:`Stats`, in declaration order."""
    for f in dataclasses.fields(Stats):
        yield Counter(f.name, **f.metadata)
