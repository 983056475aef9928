"""``alignfs install-systemd``: one command from a directory to a boot-time service.

Writes ``/etc/alignfs/INSTANCE.conf`` (MOUNTPOINT, BACKING, OPTIONS) for the
template unit ``alignfs@.service`` and a drop-in with what a unit file cannot
read from the config: ``RequiresMountsFor=BACKING``, and ``After=`` the mount
unit systemd makes for MOUNTPOINT, so that at shutdown the service (which
writes everything back, then unmounts) stops before systemd tries to unmount
the mount point itself. Then reloads systemd and enables the instance when
systemd is running.

Paths may hold any character: they are double-quoted in the config file
(ExecStart uses ``${MOUNTPOINT}``, one argument each) and in the drop-in,
with ``%`` doubled (unit-file specifiers). Options are split at whitespace by
systemd (``$OPTIONS``), so an option containing whitespace or quotes is
refused.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

CONF_DIR = Path("/etc/alignfs")
UNIT_DIR = Path("/etc/systemd/system")
INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def write_instance(instance: str, mountpoint: Path, backing: Path, options: list[str],
                   conf_dir: Path = CONF_DIR, unit_dir: Path = UNIT_DIR) -> list[Path]:
    """Write the config and drop-in for *instance*; return the files written."""
    if not INSTANCE_RE.match(instance):
        raise ValueError(f"instance name {instance!r} may use only letters, digits, '.', '_', '-'")
    for opt in options:
        if UNSAFE_OPTION_RE.search(opt):
            raise ValueError(f"option {opt!r}: systemd splits $OPTIONS at whitespace and "
                             "cannot carry quotes or backslashes; choose a value without them")
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / f"{instance}.conf"
    conf.write_text(
        f"# alignfs instance, read by alignfs@{instance}.service\n"
        + f"MOUNTPOINT={env_quote(str(mountpoint))}\nBACKING={env_quote(str(backing))}\n"
        + f"OPTIONS={env_quote(' '.join(options))}\n")
    dropin_dir = unit_dir / f"alignfs@{instance}.service.d"
    dropin_dir.mkdir(parents=True, exist_ok=True)
    dropin = dropin_dir / "paths.conf"
    dropin.write_text(
        "[Unit]\n"
        f"RequiresMountsFor={unit_quote(str(backing))}\n"
        f"After={mount_unit_name(str(mountpoint))}\n"
        f"Description=alignfs aligned write cache: {unit_text(str(mountpoint))} -> "
        f"{unit_text(str(backing))}\n")
    return [conf, dropin]


UNSAFE_OPTION_RE = re.compile(r"[\s'\"\\]")


def env_quote(value: str) -> str:
    """*value* as one double-quoted word of an EnvironmentFile."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(value: str) -> str:
    """*value* in a unit file setting: ``%`` starts a specifier, so it is doubled."""
    return value.replace("%", "%%")


def unit_quote(path: str) -> str:
    """*path* as one word of a space-separated path list in a unit file."""
    return '"' + unit_text(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def mount_unit_name(path: str) -> str:
    """The name of the mount unit systemd gives *path* (``systemd-escape -p --suffix=mount``)."""
    path = os.path.normpath(path).strip("/")
    if not path:
        return "-.mount"
    out = []
    for i, ch in enumerate(path):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out) + ".mount"


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def enable(instance: str) -> None:
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", f"alignfs@{instance}.service"], check=True)
