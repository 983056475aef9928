"""A minimal synchronous QMP (QEMU Machine Protocol) client, stdlib only.

QMP is newline-delimited JSON over a socket: the server greets, the client
sends ``qmp_capabilities``, then each ``{"execute": ...}`` gets exactly one
``{"return": ...}`` or ``{"error": ...}`` reply, with asynchronous
``{"event": ...}`` messages possibly in between (kept in :attr:`events`).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the connection broke."""


class QmpClient:
    """One connection to a QMP unix socket."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.sock: socket.socket | None = None
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._buf = b""

    def connect(self, timeout: float = 30.0, alive: Any = None) -> None:
        """Connect (retrying until the socket exists) and negotiate capabilities.

        *alive* is an optional callable; if it returns False (qemu exited)
        connecting stops early.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if alive is not None and not alive():
                    raise QmpError("qemu exited before its QMP socket came up") from exc
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {self.path} did not come up") from exc
                time.sleep(0.05)
        self.sock = sock
        self.greeting = self._read_message(timeout)
        if "QMP" not in self.greeting:
            raise QmpError(f"unexpected QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities", timeout=timeout)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Send one command and return its ``return`` value; raise QmpError on ``error``."""
        if self.sock is None:
            raise QmpError("not connected")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        log.debug("QMP -> %s", msg)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read_message(timeout)
            if "event" in reply:
                self.events.append(reply)
                continue
            log.debug("QMP <- %s", reply)
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            if "return" in reply:
                return reply["return"]
            raise QmpError(f"unexpected QMP reply: {reply}")

    def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """Run a human-monitor command; returns its text output."""
        out = self.execute("human-monitor-command", {"command-line": command_line}, timeout)
        return str(out)

    def _read_message(self, timeout: float | None) -> dict[str, Any]:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise QmpError("timed out waiting for QMP reply") from exc
            if not chunk:
                raise QmpError("QMP connection closed by qemu")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)
