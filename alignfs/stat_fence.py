"""Which backing stats may still be reported: the fence around a file's last write-out.

While a file has a :class:`~alignfs.write_cache.CachedFile`, the cache knows its
size and mtime (BACKING lags behind the buffers) and every answer overlays
them. Once the CachedFile ends (its last write-out done, no handle left),
BACKING is the truth again. A stat of BACKING is taken on a worker thread and
turned into attributes on the trio thread later; if the CachedFile ends in
between, the stat is older than what clients wrote and nothing overlays it: a
size cut short (the data still buffered when the stat ran), which the kernel
then caches and a new CachedFile would even write back as the file's size.

The fence records, while any stat is in flight, which files' CachedFiles ended
and when. A caller takes a :meth:`StatFence.mark` before its stat, keeps the
fence :meth:`StatFence.open` until it has built its answer (no ``await``
between the check and the answer: trio runs it atomically), and stats again
if :meth:`StatFence.stale` says a CachedFile of that file ended meanwhile. A
stat taken after the end is exact: no write-out of that file is in flight.
Records are dropped whenever no stat is in flight, so the fence holds nothing
between requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: A backing key: (st_dev, st_ino) of the backing file.
Key = tuple[int, int]


class StatFence:
    """Ends of CachedFiles seen while backing stats were in flight."""

    def __init__(self) -> None:
        self._open = 0
        self._seq = 0
        #: Key -> sequence number of its last CachedFile end (only while open).
        self._ended: dict[Key, int] = {}

    @contextmanager
    def open(self) -> Iterator[None]:
        """Keep records of ends while a stat (or a batch of them) is in flight."""
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1
            if not self._open:
                self._ended.clear()

    def mark(self) -> int:
        """A point in time to judge a stat taken after it (inside :meth:`open`)."""
        return self._seq

    def stale(self, key: Key, mark: int) -> bool:
        """A CachedFile of *key* ended after *mark*: a stat taken since may be old."""
        return self._ended.get(key, 0) > mark

    def file_ended(self, key: Key) -> None:
        """The CachedFile of *key* was dropped: BACKING holds everything written."""
        self._seq += 1
        if self._open:
            self._ended[key] = self._seq
