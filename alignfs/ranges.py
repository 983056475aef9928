"""A set of byte ranges: which bytes of a write buffer hold data.

Writes may land in a buffer in any order and overlap; the buffer must know
exactly which bytes are valid so that a flush writes only those (plus
read-modify-write of partly covered edge blocks) and reads overlay only those.
Ranges are half-open ``[start, end)``, kept sorted, disjoint and non-adjacent
(touching ranges are merged), so a sequential stream stays one range and every
operation is a bisect plus a slice replacement.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator


class RangeSet:
    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> int:
        """Mark ``[start, end)`` as covered; return how many bytes were newly covered."""
        if start >= end:
            return 0
        starts, ends = self._starts, self._ends
        if ends and starts[-1] <= start <= ends[-1]:
            # A stream's next write, or a rewrite of its tail: only the last
            # range can grow.
            last = ends[-1]
            if end <= last:
                return 0
            ends[-1] = end
            return end - last
        i = bisect_left(ends, start)  # first range ending at or after start
        j = bisect_right(starts, end)  # ranges [i, j) touch or overlap
        old = 0
        if i < j:
            old = sum(ends[k] - starts[k] for k in range(i, j))
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]
        return end - start - old

    def remove(self, start: int, end: int) -> int:
        """Mark ``[start, end)`` as not covered; return how many bytes were uncovered."""
        if start >= end:
            return 0
        starts, ends = self._starts, self._ends
        if not starts or end <= starts[0]:
            return 0
        if start <= starts[0] and end < ends[0]:
            # A writer eating into the hole in front of it (CachedFile.holes):
            # only the first range shrinks.
            old = end - starts[0]
            starts[0] = end
            return old
        i = bisect_right(ends, start)  # first range ending after start
        j = bisect_left(starts, end)  # ranges [i, j) overlap
        if i >= j:
            return 0
        old = sum(ends[k] - starts[k] for k in range(i, j))
        keep_s: list[int] = []
        keep_e: list[int] = []
        if starts[i] < start:
            keep_s.append(starts[i])
            keep_e.append(start)
        if ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(ends[j - 1])
        starts[i:j] = keep_s
        ends[i:j] = keep_e
        return old - sum(e - s for s, e in zip(keep_s, keep_e, strict=True))

    def intersect(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The covered parts of ``[start, end)``, in order."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        k = bisect_right(ends, start)
        while k < len(starts) and starts[k] < end:
            yield max(starts[k], start), min(ends[k], end)
            k += 1

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that are not covered, in order."""
        out = []
        pos = start
        for s, e in self.intersect(start, end):
            if s > pos:
                out.append((pos, s))
            pos = e
        if pos < end:
            out.append((pos, end))
        return out

    def covers(self, start: int, end: int) -> bool:
        """True if every byte of ``[start, end)`` is covered."""
        if start >= end:
            return True
        k = bisect_right(self._ends, start)
        return k < len(self._starts) and self._starts[k] <= start and self._ends[k] >= end

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def first(self) -> int:
        return self._starts[0]

    def last(self) -> int:
        return self._ends[-1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)})"
