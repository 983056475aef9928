"""A paused qemu VM whose RAM is a file of random data, for timing ``savevm``.

The VM never runs a single guest instruction (``-S``): it only exists so
that ``savevm`` has RAM to write into the qcow2 image.  The RAM comes from a
``memory-backend-file`` that is pre-filled with random bytes, so qemu cannot
skip zero pages and the snapshot really writes the full RAM size.  That file
must live outside the HDD model, on tmpfs, so reading it costs nothing.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .qmp import QmpClient, QmpError
from .sysutil import fill_random

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"


def make_random_file(path: Path, size: int, chunk: int = 16 << 20) -> None:
    """Create *path* with *size* random bytes (unless it already has that size)."""
    try:
        if path.stat().st_size == size:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_suffix(".part")
    fill_random(tmp, size, chunk)
    tmp.rename(path)


def qemu_argv(
    *, ram_file: Path, ram_size: int, disk: Path, cache: str, qmp_socket: Path, fmt: str = "qcow2"
) -> list[str]:
    """The command line of the paused VM."""
    return [
        QEMU,
        "-machine",
        "pc,accel=tcg,memory-backend=ram",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        f"{ram_size // (1 << 20)}M",
        "-object",
        f"memory-backend-file,id=ram,size={ram_size},mem-path={ram_file},share=on",
        "-drive",
        f"file={disk},if=none,id=d0,cache={cache},format={fmt}",
        "-device",
        "virtio-blk-pci,drive=d0",
        "-qmp",
        f"unix:{qmp_socket},server=on,wait=off",
    ]


@contextmanager
def paused_vm(argv: list[str], qmp_socket: Path, log_path: Path,
              what: str = "") -> Iterator[PausedVm]:
    """A paused VM for the ``with`` body; then qemu is asked to quit.

    Whatever fails -- qemu, QMP, the body, or qemu's exit status -- is raised
    as RuntimeError with the tail of qemu's log, prefixed by *what*. The QMP
    socket is removed in any case.
    """
    vm = PausedVm(argv, qmp_socket, log_path)
    try:
        with vm:
            yield vm
            status = vm.quit()
    except Exception as exc:
        raise RuntimeError(f"{what}{exc} [qemu log: {vm.log_tail(500)}]") from exc
    finally:
        qmp_socket.unlink(missing_ok=True)
    if status != 0:
        raise RuntimeError(f"{what}qemu exited with {status}: {vm.log_tail(500)}")


class PausedVm:
    """Context manager around the qemu process and its QMP connection."""

    def __init__(self, argv: list[str], qmp_socket: Path, log_path: Path) -> None:
        self.argv = argv
        self.qmp_socket = qmp_socket
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QmpClient(qmp_socket)

    def __enter__(self) -> PausedVm:
        log.debug("qemu: %s", " ".join(self.argv))
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf
            )
        try:
            self.qmp.connect(timeout=60, alive=lambda: self.proc.poll() is None)  # type: ignore[union-attr]
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    def savevm(self, tag: str, timeout: float) -> float:
        """Run ``savevm TAG``; returns its wall time in seconds."""
        t0 = time.monotonic()
        out = self.qmp.hmp(f"savevm {tag}", timeout=timeout)
        seconds = time.monotonic() - t0
        if out.strip():
            # HMP savevm prints nothing on success and the error text otherwise.
            raise QmpError(f"savevm {tag}: {out.strip()}")
        return seconds

    def quit(self, timeout: float = 120) -> int:
        """Ask qemu to exit and wait for it; returns its exit status."""
        assert self.proc is not None
        try:
            self.qmp.execute("quit", timeout=30)
        except QmpError:
            pass  # the connection may close before the reply arrives
        return self.proc.wait(timeout=timeout)

    def _stop(self) -> None:
        self.qmp.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        # A qemu busy in savevm only handles SIGTERM once savevm is done; the
        # VM is disposable, so do not wait long before killing it.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, n: int = 1000) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-n:]
        except OSError:
            return ""
