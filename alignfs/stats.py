"""Counters kept by the daemon and shown by ``alignfs stats``.

They are how coalescing is proven rather than claimed: for a sequential
unaligned stream, ``backing_writes`` is about ``write_bytes / buffer_size`` and
``unaligned_backing_writes`` stays 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FLUSH_CAUSES = ("full", "moved_on", "age", "idle", "pressure", "fsync", "close", "unmount",
                "truncate")


@dataclasses.dataclass
class Stats:
    # requests from clients
    write_requests: int = 0
    write_bytes: int = 0
    read_requests: int = 0
    read_bytes: int = 0
    #: reads answered entirely from buffered data (no backing read)
    reads_from_buffers: int = 0
    # what reached BACKING
    backing_writes: int = 0
    backing_write_bytes: int = 0
    #: O_DIRECT writes that were not aligned (a bug if ever non-zero)
    unaligned_backing_writes: int = 0
    #: the part of a last block below EOF, written through the page cache
    #: (an O_DIRECT write of the whole block would pad the file past its size)
    tail_writes: int = 0
    backing_reads: int = 0
    backing_read_bytes: int = 0
    rmw_block_reads: int = 0
    #: reads served from read-ahead segments, bytes read ahead, bytes dropped unread
    readahead_hits: int = 0
    readahead_bytes: int = 0
    readahead_wasted_bytes: int = 0
    fsyncs: int = 0
    backing_fsyncs: int = 0
    backing_errors: int = 0
    # memory
    dirty_bytes: int = 0
    peak_dirty_bytes: int = 0
    buffers_in_use: int = 0
    writer_wait_seconds: float = 0.0
    flushes: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FLUSH_CAUSES, 0))

    def add_dirty(self, n: int) -> None:
        self.dirty_bytes += n
        if self.dirty_bytes > self.peak_dirty_bytes:
            self.peak_dirty_bytes = self.dirty_bytes

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean_backing_write_size"] = (
            self.backing_write_bytes // self.backing_writes if self.backing_writes else 0)
        return out
