"""alignfs: a FUSE passthrough that turns small unaligned writes into large aligned ones.

Where to read: ``operations`` (FUSE handlers) hands file data to
``write_cache`` (per-file aligned buffers and their asynchronous write-out),
which takes memory from ``buffer_pool`` and does all disk I/O through
``backing_io`` on worker threads. ``daemon`` runs a mount, ``cli`` is the
command, ``control`` is how the command talks to a running daemon.

The public names below are imported on first use (PEP 562), so that the
short-lived commands (``alignfs umount``, ``alignfs stats``, the mount(8)
helper) do not pay for importing trio and the write cache: that was about
80 ms of the ~0.2 s an ``alignfs umount`` of an idle mount took.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["CachedFile", "ExitCode", "MountConfig", "Stats", "WriteCache", "__version__"]

#: public name -> the module that defines it
_LAZY = {
    "CachedFile": "write_cache",
    "WriteCache": "write_cache",
    "MountConfig": "config",
    "ExitCode": "exitcodes",
    "Stats": "stats",
}

if TYPE_CHECKING:
    from .config import MountConfig
    from .exitcodes import ExitCode
    from .stats import Stats
    from .write_cache import CachedFile, WriteCache


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
