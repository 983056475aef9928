"""``alignfs install-systemd``: one command from a directory to a boot-time service.

Writes ``/etc/alignfs/INSTANCE.conf`` (MOUNTPOINT, BACKING, OPTIONS) for the
template unit ``alignfs@.service`` and a drop-in that adds
``RequiresMountsFor=BACKING`` (a unit file cannot read that from the config),
then reloads systemd and enables the instance when systemd is running.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CONF_DIR = Path("/etc/alignfs")
UNIT_DIR = Path("/etc/systemd/system")
INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def write_instance(instance: str, mountpoint: Path, backing: Path, options: list[str],
                   conf_dir: Path = CONF_DIR, unit_dir: Path = UNIT_DIR) -> list[Path]:
    """Write the config and drop-in for *instance*; return the files written."""
    if not INSTANCE_RE.match(instance):
        raise ValueError(f"instance name {instance!r} may use only letters, digits, '.', '_', '-'")
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / f"{instance}.conf"
    conf.write_text(
        f"# alignfs instance, read by alignfs@{instance}.service\n"
        + f"MOUNTPOINT={mountpoint}\nBACKING={backing}\n"
        + f"OPTIONS={' '.join(shlex.quote(o) for o in options)}\n")
    dropin_dir = unit_dir / f"alignfs@{instance}.service.d"
    dropin_dir.mkdir(parents=True, exist_ok=True)
    dropin = dropin_dir / "paths.conf"
    dropin.write_text("[Unit]\n"
                      f"RequiresMountsFor={backing}\n"
                      f"Description=alignfs aligned write cache: {mountpoint} -> {backing}\n")
    return [conf, dropin]


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def enable(instance: str) -> None:
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", f"alignfs@{instance}.service"], check=True)
