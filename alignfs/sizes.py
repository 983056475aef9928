"""Parsing and printing of byte sizes such as ``4M`` or ``256MiB``.

Sizes appear on the command line, in ``-o`` mount options and in config files;
one parser keeps their spelling identical everywhere.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Return the number of bytes in *text* (``4096``, ``4k``, ``4M``, ``1GiB``, ``1.5G``).

    Raises ValueError with a message fit for the user on anything else.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r} (expected e.g. 4096, 64K, 4M, 1G)")
    number, unit, _ = match.groups()
    factor = _UNITS[unit.lower()]
    if "." in number:
        return int(float(number) * factor)
    return int(number) * factor


def format_size(n: float) -> str:
    """Human-readable binary size: ``4.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def compact_size(n: float) -> str:
    """Shortest exact spelling for labels and command lines: ``536870912`` -> ``512M``."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        factor = 1 << shift
        if n >= factor and n % factor == 0:
            return f"{int(n // factor)}{unit}"
    return str(int(n))
