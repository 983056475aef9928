"""Guaranteed clean-up of the system resources the benchmark creates.

The benchmark creates things that outlive a crashed Python process if nobody
removes them: zram devices, cgroups, mounts, FUSE daemons, qemu processes.
Every such resource registers an undo action on a :class:`CleanupStack` the
moment it exists.  The stack is unwound in reverse order

* by the ``with`` block that owns it (normal exit and exceptions),
* by an :mod:`atexit` hook if the owner never got to unwind it, and
* on SIGTERM / SIGHUP / SIGINT, which :func:`install_signal_handlers` turns
  into a :class:`BenchInterrupted` exception so that ``finally`` blocks run.

An undo action that fails is logged and the remaining ones still run.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Self

log = logging.getLogger(__name__)

_live_stacks: list[CleanupStack] = []
_lock = threading.Lock()


class BenchInterrupted(BaseException):
    """Raised from a signal handler; derives from BaseException like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signal.Signals(signum).name}")
        self.signum = signum


class CleanupStack:
    """A LIFO list of named undo actions, unwound exactly once each."""

    def __init__(self, name: str = "bench") -> None:
        self.name = name
        self._actions: dict[int, tuple[str, Callable[[], object]]] = {}
        self._ids = itertools.count()
        self.errors: list[str] = []

    def push(self, description: str, action: Callable[[], object]) -> int:
        """Register *action*; returns a token for :meth:`run` / :meth:`forget`."""
        token = next(self._ids)
        self._actions[token] = (description, action)
        return token

    def forget(self, token: int) -> None:
        """Drop an action without running it (its resource is already gone)."""
        self._actions.pop(token, None)

    def run(self, token: int) -> bool:
        """Run one action now (if still registered); returns False if it failed."""
        entry = self._actions.pop(token, None)
        if entry is None:
            return True
        description, action = entry
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - clean-up must go on
            msg = f"clean-up step {description!r} failed: {exc}"
            log.error("%s", msg)
            self.errors.append(msg)
            return False
        log.debug("clean-up: %s", description)
        return True

    def close(self) -> bool:
        """Run every remaining action, newest first; returns True if all succeeded."""
        ok = True
        while self._actions:
            token = max(self._actions)
            ok = self.run(token) and ok
        return ok

    @property
    def pending(self) -> list[str]:
        """Descriptions of the actions not yet run, newest first."""
        return [self._actions[t][0] for t in sorted(self._actions, reverse=True)]

    def __enter__(self) -> CleanupStack:
        with _lock:
            _live_stacks.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            with _lock:
                if self in _live_stacks:
                    _live_stacks.remove(self)


class StackOwner:
    """Base of a context manager whose resources register on its own stack.

    ``with`` runs :meth:`_setup`; whatever it created before failing is undone
    at once, and leaving the block undoes the rest.
    """

    _stack: CleanupStack

    def _setup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stack.__enter__()
        try:
            self._setup()
        except BaseException:
            self._stack.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.__exit__(*exc_info)


def _close_all_live() -> None:
    with _lock:
        stacks = list(reversed(_live_stacks))
    for stack in stacks:
        if stack.pending:
            log.warning("atexit: unwinding %d leftover clean-up steps", len(stack.pending))
        stack.close()


atexit.register(_close_all_live)


_interrupted: list[int] = []


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if _interrupted:
        # Already unwinding: a second signal must not break the clean-up.
        log.warning("signal %d ignored: still cleaning up", signum)
        return
    _interrupted.append(signum)
    raise BenchInterrupted(signum)


def install_signal_handlers() -> dict[int, object]:
    """Make SIGTERM, SIGHUP and SIGINT raise :class:`BenchInterrupted`.

    Returns the previous handlers (for :func:`restore_signal_handlers`).  Only
    works in the main thread; elsewhere it does nothing.
    """
    previous: dict[int, object] = {}
    _interrupted.clear()
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        previous[sig] = signal.signal(sig, _raise_interrupted)
    return previous


def restore_signal_handlers(previous: dict[int, object]) -> None:
    """Undo :func:`install_signal_handlers`."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
