"""alignfs: a FUSE passthrough that turns small unaligned writes into large aligned ones.

Where to read: ``operations`` (FUSE handlers) hands file data to
``write_cache`` (per-file aligned buffers and their asynchronous write-out),
which takes memory from ``buffer_pool`` and does all disk I/O through
``backing_io`` on worker threads. ``daemon`` runs a mount, ``cli`` is the
command, ``control`` is how the command talks to a running daemon.
"""

from .config import MountConfig
from .exitcodes import ExitCode
from .stats import Stats
from .write_cache import CachedFile, WriteCache

__version__ = "0.1.0"

__all__ = ["CachedFile", "ExitCode", "MountConfig", "Stats", "WriteCache", "__version__"]
