"""The settings of one mount, with their defaults and validation.

The same names are used on the command line (``--buffer-size 4M``), as mount(8)
``-o`` options (``buffer_size=4M``) and in systemd config files, so they are
defined once here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .sizes import compact_size, format_size

MiB = 1 << 20

#: Defaults, chosen by measurement on the HDD model (see README "Tuning").
DEFAULT_BUFFER_SIZE = 8 * MiB
DEFAULT_MAX_DIRTY = 256 * MiB
#: Default buffers per file: enough to span this much of a file at once, so a
#: client with many requests in flight (qemu-img: 64 x 128 KiB, out of order)
#: plus qcow2's metadata window fit whatever --buffer-size is (8M: 4 buffers).
DEFAULT_SPAN_PER_FILE = 32 * MiB
MIN_BUFFERS_PER_FILE = 4
DEFAULT_FLUSH_DELAY = 5.0
DEFAULT_IO_THREADS = 8
DEFAULT_READAHEAD = 8 * MiB
DEFAULT_READAHEAD_MEMORY = 64 * MiB


class ConfigError(ValueError):
    """A setting that cannot work; the message is shown to the user."""


@dataclasses.dataclass
class MountConfig:
    mountpoint: Path
    backing: Path
    #: Size of each write buffer (a multiple of the alignment).
    buffer_size: int = DEFAULT_BUFFER_SIZE
    #: Bound on all buffered (not yet written) data, over all files.
    max_dirty: int = DEFAULT_MAX_DIRTY
    #: How many buffers one file may be filling at once.
    buffers_per_file: int | None = None
    #: Seconds after which a partly filled buffer is written anyway.
    flush_delay: float = DEFAULT_FLUSH_DELAY
    #: Direct-I/O alignment; None means detect it from BACKING.
    align: int | None = None
    #: Threads doing backing writes at once.
    io_threads: int = DEFAULT_IO_THREADS
    #: Largest read-ahead window of a sequential reader; 0 turns read-ahead off.
    readahead: int = DEFAULT_READAHEAD
    #: Bound on read-ahead memory over all files.
    readahead_memory: int = DEFAULT_READAHEAD_MEMORY
    allow_other: bool = False
    #: Extended attributes passed through (``--xattr on``); off answers ENOSYS
    #: so the kernel stops asking (and POSIX ACLs are off).
    xattr: bool = True
    debug: bool = False
    log_file: Path | None = None
    #: Fault injection for tests only (see backing_io.FaultInjector); never documented.
    fault_file: Path | None = None
    #: Test-only: append "name offset length" for every backing write to this file.
    trace_file: Path | None = None

    @property
    def effective_buffers_per_file(self) -> int:
        """--buffers-per-file, or by default enough buffers to span 32 MiB of a
        file (at least 4), but no more than half the pool."""
        if self.buffers_per_file is not None:
            return self.buffers_per_file
        wanted = max(MIN_BUFFERS_PER_FILE, DEFAULT_SPAN_PER_FILE // self.buffer_size)
        return max(1, min(wanted, self.max_dirty // self.buffer_size // 2))

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work together."""
        if self.buffer_size < 4096 or self.buffer_size & (self.buffer_size - 1):
            raise ConfigError(
                f"--buffer-size must be a power of two of at least 4K, not "
                f"{format_size(self.buffer_size)}"
            )
        if self.buffer_size > 256 * MiB:
            raise ConfigError("--buffer-size must not exceed 256M")
        if self.buffers_per_file is not None and self.buffers_per_file < 1:
            raise ConfigError("--buffers-per-file must be at least 1")
        if self.max_dirty < 2 * self.buffer_size:
            raise ConfigError(
                f"--max-dirty ({format_size(self.max_dirty)}) must hold at least two "
                f"buffers of --buffer-size ({format_size(self.buffer_size)})"
            )
        if self.flush_delay <= 0:
            raise ConfigError("--flush-delay must be positive")
        if self.align is not None:
            if self.align < 512 or self.align & (self.align - 1):
                raise ConfigError("--align must be a power of two of at least 512")
            if self.buffer_size % self.align:
                raise ConfigError("--buffer-size must be a multiple of --align")
        if self.readahead and (self.readahead < 256 * 1024 or self.readahead > 256 * MiB):
            raise ConfigError("--readahead must be 0 (off) or between 256K and 256M")
        if self.readahead and self.readahead_memory < self.readahead:
            raise ConfigError("--readahead-memory must hold at least one --readahead window")
        if self.io_threads < 1:
            raise ConfigError("--io-threads must be at least 1")

    def check_alignment(self, align: int) -> None:
        """Raise ConfigError if buffers cannot be written with BACKING's *align*.

        An explicit ``--align`` is checked by :meth:`validate`; a detected one
        only at mount. Buffers that are not a multiple of it would make every
        write-out fail (O_DIRECT answers EINVAL), so the mount is refused.
        """
        if align and self.buffer_size % align:
            raise ConfigError(
                f"BACKING needs direct I/O aligned to {compact_size(align)}, which does not "
                f"divide --buffer-size {compact_size(self.buffer_size)}: use a --buffer-size "
                f"of at least {compact_size(align)}"
            )
