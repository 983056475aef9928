"""MountConfig in its command-line forms, all derived from the option table.

``alignfs mount`` reads its options with argparse (:func:`add_mount_arguments`,
:func:`config_from_args`), mount(8) passes them as ``-o name=value``
(:func:`translate_mount_helper`), and a detached daemon is started with
:func:`config_args`, which spells every option that differs from its default,
so the daemon gets exactly the parent's MountConfig. Each of them iterates
:func:`alignfs.config.options`: an option declared there appears in all forms
(and in ``--help``), and none can be left out of one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from .config import MountConfig, Option, long_name, options

#: mount(8) options that mean nothing to alignfs and are ignored.
IGNORED_MOUNT_OPTIONS = {"defaults", "noauto", "auto", "nofail", "_netdev", "rw", "user",
                         "nouser", "users", "owner", "exec", "noexec", "dev", "nodev", "suid",
                         "nosuid", "atime", "noatime", "relatime", "x-systemd.automount",
                         "comment"}


class UsageError(Exception):
    """A command line that cannot be read; the message is shown to the user."""


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    """MOUNTPOINT, BACKING and every mount option, with its help and default."""
    parser.add_argument("mountpoint", type=Path, help="where the files appear (e.g. /fast)")
    parser.add_argument("backing", type=Path, help="directory holding the files (e.g. /backing)")
    for f, opt in options():
        names = [name for name in (opt.short, long_name(f, opt)) if name]
        common: dict[str, Any] = {"dest": f.name, "default": f.default, "help": _help(f, opt)}
        if opt.kind is None:
            parser.add_argument(*names, action="store_true", **common)
        else:
            parser.add_argument(*names, type=opt.kind.parse, metavar=opt.kind.metavar, **common)


def _help(f: dataclasses.Field[Any], opt: Option) -> str:
    """The option's help with its default as a person writes it (``8M``, ``5``)."""
    if opt.hidden:
        return argparse.SUPPRESS
    text = opt.help.replace("%", "%%")  # argparse formats help with %
    if opt.kind is None:
        return text  # a flag: off unless given
    if f.default is None:
        shown = opt.default_text
    else:
        shown = (opt.kind.show or opt.kind.spell)(f.default)
    return f"{text} (default: {shown})" if shown else text


def config_from_args(ns: argparse.Namespace) -> MountConfig:
    """The validated MountConfig of parsed ``alignfs mount`` arguments (raises ConfigError)."""
    cfg = MountConfig(mountpoint=Path(os.path.abspath(ns.mountpoint)),
                      backing=Path(os.path.abspath(ns.backing)),
                      **{f.name: getattr(ns, f.name) for f, _ in options()})
    cfg.validate()
    return cfg


def config_args(cfg: MountConfig) -> list[str]:
    """Arguments of ``alignfs mount`` that give back *cfg* (defaults left out)."""
    args = [str(cfg.mountpoint), str(cfg.backing)]
    for f, opt in options():
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        name = long_name(f, opt)
        args += [name] if opt.kind is None else [name, opt.kind.spell(value)]
    return args


def translate_mount_helper(argv: list[str]) -> list[str]:
    """``BACKING MOUNTPOINT [-o a=b,c]`` -> ``mount MOUNTPOINT BACKING --a b --c``."""
    positional: list[str] = []
    items: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            items += next(it, "").split(",")
        elif arg.startswith("-o"):
            items += arg[2:].split(",")
        elif arg in ("-n", "-s", "-v"):
            continue  # mount(8) flags: no mtab, sloppy, verbose
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("mount helper usage: alignfs BACKING MOUNTPOINT [-o options]")
    backing, mountpoint = positional
    out = ["mount", mountpoint, backing]
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if key in IGNORED_MOUNT_OPTIONS or key.startswith("x-"):
            continue
        out += _mount_option_args(key, value if sep else None)
    return out


def _mount_option_args(key: str, value: str | None) -> list[str]:
    """``-o`` option *key* (``buffer_size``) as command-line arguments."""
    name = "--" + key.replace("_", "-")
    opt = next((opt for f, opt in options() if long_name(f, opt) == name), None)
    if opt is None:  # argparse refuses it, by the name it has on the command line
        return [name] if value is None else [name, value]
    if opt.kind is None:
        if value is not None:
            raise UsageError(f"mount option {key} takes no value")
        return [name]
    if value is None:
        raise UsageError(f"mount option {key} needs a value: {key}=...")
    return [name, value]
