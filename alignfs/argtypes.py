"""Value types for argparse options, shared by ``alignfs`` and ``alignfs bench``.

One definition each, so a size or a duration is read (and refused) the same
way by every command: ``alignfs mount --buffer-size 3Q`` and ``alignfs bench
--ram 3Q`` give the same message. The message of a ValueError from the
parser is the one the user sees.
"""

from __future__ import annotations

import argparse

from .sizes import parse_size


def size_arg(text: str) -> int:
    """A byte size such as ``4096``, ``64K`` or ``1G`` (see :func:`alignfs.sizes.parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(text: str) -> float:
    """A number greater than zero, e.g. seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def on_off(text: str) -> bool:
    """``on`` or ``off`` (a switch whose default is on)."""
    value = {"on": True, "off": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return value
