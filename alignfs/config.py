"""The settings of one mount: each option declared once, with defaults and validation.

Every option of ``alignfs mount`` is a field of :class:`MountConfig` whose
metadata (:func:`option`) says how it is spelled and explained: the command
line (``--buffer-size 4M``), the mount(8) form (``-o buffer_size=4M``), the
arguments a detached daemon is started with, ``--help`` and the options of
``alignfs install-systemd`` are all derived from it (:mod:`alignfs.mount_args`).
So an option is added in one place, and none can be dropped on the way to the
daemon.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .argtypes import on_off, positive_float, size_arg
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
#: Default sealed buffers one file may have waiting for (or in) write-out:
#: enough to keep a disk streaming (one is written at a time), little enough
#: that a stream outrunning a slow disk does not hold all of --max-dirty.
DEFAULT_WRITEOUT_QUEUE = 4
DEFAULT_FLUSH_DELAY = 5.0
DEFAULT_IO_THREADS = 8
DEFAULT_READAHEAD = 8 * MiB
DEFAULT_READAHEAD_MEMORY = 64 * MiB
#: How long ``alignfs mount`` waits for a detached daemon to serve the mount.
DEFAULT_START_TIMEOUT = 60.0


class ConfigError(ValueError):
    """A setting that cannot work; the message is shown to the user."""


@dataclasses.dataclass(frozen=True)
class ValueKind:
    """How values of one type are read from a command line and written back."""

    #: placeholder in ``--help`` (``--buffer-size SIZE``)
    metavar: str
    #: argparse type: text -> value (raises ArgumentTypeError or ValueError)
    parse: Callable[[str], Any]
    #: value -> text that *parse* reads back as the same value
    spell: Callable[[Any], str]
    #: value -> text for a person (``--help``); *spell* if None
    show: Callable[[Any], str] | None = None


SIZE = ValueKind("SIZE", size_arg, compact_size)
COUNT = ValueKind("N", int, str)
SECONDS = ValueKind("SECONDS", positive_float, repr, show=lambda v: f"{v:g}")
FILE = ValueKind("FILE", Path, str)
ON_OFF = ValueKind("on|off", on_off, lambda v: "on" if v else "off")


@dataclasses.dataclass(frozen=True)
class Option:
    """How one MountConfig field appears on the command line (its metadata)."""

    help: str
    #: None: a flag (``--allow-other``), off unless given
    kind: ValueKind | None
    #: the long option without ``--``, if not the field name with ``-`` for ``_``
    name: str | None = None
    short: str | None = None
    #: ``--help`` text of a default of None (what happens then)
    default_text: str | None = None
    #: test hooks and the parent-child pipe: accepted, never shown
    hidden: bool = False


def option(default: Any, kind: ValueKind | None, help: str, **more: Any) -> Any:
    """A MountConfig field that is a mount option (see :class:`Option`)."""
    if kind is None and default is not False:
        raise TypeError("a flag is off by default")
    return dataclasses.field(default=default, metadata={"option": Option(help, kind, **more)})


def flag(help: str, **more: Any) -> Any:
    """A MountConfig field that is an on/off mount option, off by default."""
    return option(False, None, help, **more)


@dataclasses.dataclass
class MountConfig:
    """What ``alignfs mount`` was asked for; every field after BACKING is a mount option."""

    mountpoint: Path
    backing: Path
    buffer_size: int = option(
        DEFAULT_BUFFER_SIZE, SIZE, "size of each aligned write buffer (bytes; K/M/G)")
    max_dirty: int = option(
        DEFAULT_MAX_DIRTY, SIZE, "bound on all buffered data; writers wait beyond it")
    #: How many buffers one file may be filling at once (None: see
    #: effective_buffers_per_file).
    buffers_per_file: int | None = option(
        None, COUNT, "buffers one file may fill at once",
        default_text=f"enough for {compact_size(DEFAULT_SPAN_PER_FILE)} of the file, at "
        f"least {MIN_BUFFERS_PER_FILE}, at most half of --max-dirty")
    writeout_queue: int = option(
        DEFAULT_WRITEOUT_QUEUE, COUNT, "buffers one file may have queued for the disk (the "
        "one being written included); a writer needing another waits for the disk "
        "(0 = only --max-dirty bounds it)")
    flush_delay: float = option(
        DEFAULT_FLUSH_DELAY, SECONDS, "write a partly filled buffer after this long")
    #: Direct-I/O alignment; None means detect it from BACKING.
    align: int | None = option(
        None, SIZE, "direct-I/O alignment", default_text="detected from BACKING, >= 4096")
    io_threads: int = option(DEFAULT_IO_THREADS, COUNT, "backing writes in flight at once")
    readahead: int = option(
        DEFAULT_READAHEAD, SIZE, "largest read-ahead window for sequential readers (0 = off)")
    readahead_memory: int = option(
        DEFAULT_READAHEAD_MEMORY, SIZE, "bound on read-ahead memory over all files")
    allow_other: bool = flag("let other users (e.g. QEMU as libvirt-qemu) use the mount; "
                             "the kernel enforces file modes")
    #: Extended attributes passed through (on); off answers ENOSYS so the
    #: kernel stops asking (and POSIX ACLs are off).
    xattr: bool = option(
        True, ON_OFF, "off: extended attributes answer ENOSYS, so the kernel stops asking for "
        "security.capability before every write(2) (small buffered writes then go at "
        "page-cache speed); gives up POSIX ACLs, security labels (SELinux, SMACK), file "
        "capabilities and every user.* xattr, e.g. libvirt's remembered owners")
    #: Checked before mounting only (FUSE itself mounts over anything).
    nonempty: bool = flag("allow mounting over a non-empty MOUNTPOINT (hides its files)")
    #: Run the daemon in this process (systemd, tests) instead of detached.
    foreground: bool = flag("stay attached and log to stderr", short="-f")
    debug: bool = flag("log every decision")
    #: How long a detached start may take (``alignfs mount`` only, not the daemon).
    start_timeout: float = option(
        DEFAULT_START_TIMEOUT, SECONDS, "give up (exit 7) if the detached daemon is not "
        "serving after this long; it is stopped and nothing stays mounted")
    log_file: Path | None = option(
        None, FILE, "log to FILE", name="log",
        default_text="stderr in the foreground, syslog otherwise")
    #: Fault injection for tests only (see backing_io.FaultInjector); never documented.
    fault_file: Path | None = option(None, FILE, "fault-injection rules", hidden=True)
    #: Test-only: append "name offset length" for every backing write to this file.
    trace_file: Path | None = option(
        None, FILE, "trace of backing writes", name="trace-writes", hidden=True)
    #: The pipe a detached daemon reports readiness on (set by ``alignfs mount``).
    ready_fd: int | None = option(None, COUNT, "readiness pipe", hidden=True)

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
        if self.writeout_queue < 0:
            raise ConfigError("--writeout-queue must be 0 (no bound) or more")
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


def options() -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """Every mount option: the MountConfig field and how it is spelled, in --help order."""
    for f in dataclasses.fields(MountConfig):
        if "option" in f.metadata:
            yield f, f.metadata["option"]


def long_name(f: dataclasses.Field[Any], opt: Option) -> str:
    """``--buffer-size`` for field ``buffer_size``."""
    return "--" + (opt.name or f.name.replace("_", "-"))
