"""Every mount option survives every command-line form it takes.

A detached daemon is started with arguments spelled from the parent's
MountConfig, and mount(8) passes options as ``-o name=value``: an option one
of these forms forgot would silently be its default in the daemon. So each
option is set to a value other than its default and read back through
argparse, the daemon's arguments and the ``-o`` form; the values are made up
from the option's kind, so a new option is covered without touching this
test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from alignfs.cli import build_parser
from alignfs.config import (
    COUNT,
    FILE,
    ON_OFF,
    SECONDS,
    SIZE,
    MountConfig,
    long_name,
    options,
)
from alignfs.mount_args import (
    UsageError,
    config_args,
    config_from_args,
    translate_mount_helper,
)
from alignfs.sizes import compact_size

#: Values no default has, by kind, that validate() accepts, alone and all together.
OTHER_VALUE = {SIZE: 16 << 20, COUNT: 3, SECONDS: 2.5, FILE: Path("/tmp/alignfs-test.file"),
               ON_OFF: False}
#: ... and where the kind's value would not do.
OTHER_VALUE_OF = {"align": 4096, "max_dirty": 64 << 20}


def _spell(f: dataclasses.Field[Any], value: Any) -> list[str]:
    opt = f.metadata["option"]
    name = long_name(f, opt)
    return [name] if opt.kind is None else [name, opt.kind.spell(value)]


def _parse(args: list[str]) -> MountConfig:
    return config_from_args(build_parser().parse_args(["mount", *args]))


def _other(f: dataclasses.Field[Any]) -> Any:
    kind = f.metadata["option"].kind
    value = True if kind is None else OTHER_VALUE_OF.get(f.name, OTHER_VALUE[kind])
    assert value != f.default, f"{f.name}: pick another test value"
    return value


def test_every_field_is_an_option() -> None:
    """A MountConfig field without option metadata could not reach the daemon."""
    declared = {f.name for f, _ in options()}
    fields = {f.name for f in dataclasses.fields(MountConfig)}
    assert fields - declared == {"mountpoint", "backing"}


@pytest.mark.parametrize("field", [f for f, _ in options()], ids=lambda f: f.name)
def test_option_round_trips(field: dataclasses.Field[Any]) -> None:
    value = _other(field)
    cfg = _parse(["/mnt", "/back", *_spell(field, value)])
    assert getattr(cfg, field.name) == value
    assert cfg == dataclasses.replace(MountConfig(Path("/mnt"), Path("/back")),
                                      **{field.name: value})
    # what a detached daemon is started with
    assert _parse(config_args(cfg)) == cfg
    # mount(8): alignfs BACKING MOUNTPOINT -o name=value
    name = long_name(field, field.metadata["option"])[2:].replace("-", "_")
    spelled = _spell(field, value)
    item = name if len(spelled) == 1 else f"{name}={spelled[1]}"
    helper = translate_mount_helper(["/back", "/mnt", "-o", f"defaults,{item},nofail"])
    assert config_from_args(build_parser().parse_args(helper)) == cfg


def test_all_options_at_once_round_trip() -> None:
    args = ["/mnt", "/back"]
    for f, _ in options():
        args += _spell(f, _other(f))
    cfg = _parse(args)
    assert all(getattr(cfg, f.name) != f.default for f, _ in options())
    assert _parse(config_args(cfg)) == cfg


def test_defaults_are_left_out_of_the_daemon_arguments() -> None:
    cfg = _parse(["/mnt", "/back"])
    assert config_args(cfg) == ["/mnt", "/back"]


def test_sizes_are_spelled_as_people_write_them() -> None:
    cfg = _parse(["/mnt", "/back", "--max-dirty", "268435456", "--buffer-size", "4194304"])
    args = config_args(cfg)
    assert args[args.index("--buffer-size") + 1] == "4M"
    assert "--max-dirty" not in args  # the default, however it was written
    assert compact_size(cfg.buffer_size) == "4M"


@pytest.mark.parametrize("item, message", [
    ("allow_other=1", "takes no value"),
    ("buffer_size", "needs a value"),
])
def test_mount_helper_misuse(item: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        translate_mount_helper(["/back", "/mnt", "-o", item])


def test_mount_helper_ignores_mount8_options() -> None:
    argv = translate_mount_helper(["-n", "/back", "/mnt", "-o",
                                   "rw,noauto,x-systemd.requires=/x,comment=foo,allow_other"])
    assert argv == ["mount", "/mnt", "/back", "--allow-other"]


def test_help_shows_defaults_once_and_readably(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mount", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 8M)" in out and "(default: 256M)" in out
    assert "268435456" not in out and "(default: None)" not in out
    assert "(default: False)" not in out
    assert "--ready-fd" not in out and "--fault-file" not in out
