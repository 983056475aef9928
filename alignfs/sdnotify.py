"""systemd's readiness protocol (sd_notify), without libsystemd.

With ``Type=notify`` systemd sets NOTIFY_SOCKET; the daemon sends READY=1 once
the mount answers, STOPPING=1 when it starts writing back at shutdown, and
STATUS=/EXTEND_TIMEOUT_USEC= while the write-back runs. Without NOTIFY_SOCKET
every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send *lines* to systemd; return False if there is no notify socket."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True
