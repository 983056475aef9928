"""The benchmark scenarios: which clients run, on which files, and what counts.

A scenario declares *cases* (one client configuration on one side, direct or
alignfs) and *rows* (which direct case the table compares with which alignfs
case).  For each case the runner calls, in order:

``prepare(case, backing)``
    create the input files in the (fresh, empty) backing directory;
``run(case, target, ctx)``
    run the client against *target* (the backing directory itself for a
    direct case, the alignfs mount point for an alignfs case) and return a
    :class:`ClientOutcome` with its timing and payload size;
``verify(case, backing)``
    check, after unmount, that the files in the backing directory are intact.

An alignfs case may carry its own ``mount_options`` (e.g. ``--xattr off``),
appended to the harness's for that case's mount only.

Scenarios whose client program is missing are skipped, not failed: see
:meth:`Scenario.missing_tools`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sizes import compact_size
from .qmp import QmpError
from .results import ALIGNFS, DIRECT
from .sysutil import GiB, KiB, MiB, fill_random, fill_zeros, run, which
from .vm import QEMU, PausedVm, make_random_file, paused_vm, qemu_argv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One client configuration on one side."""

    key: str
    side: str
    label: str
    params: tuple[tuple[str, Any], ...] = ()
    #: extra ``alignfs mount`` arguments for this (alignfs) case, after the
    #: harness's own ``--mount-options``, so they win
    mount_options: tuple[str, ...] = ()

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class RowDef:
    """A table line: compare direct case *direct* with alignfs case *alignfs*."""

    label: str
    direct: str | None
    alignfs: str | None
    notes: tuple[str, ...] = ()
    #: goal: alignfs reaches this percentage of the bandwidth limit
    target_percent: float | None = None
    #: goal: alignfs is at least this many times better than direct
    target_speedup: float | None = None


@dataclass
class ClientOutcome:
    """What a client run produced."""

    seconds: float
    payload_bytes: int
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``time.monotonic()`` when the timed part began, if not when ``run`` was
    #: called (savevm first starts a VM): where a run's timeline starts.
    started: float | None = None


@dataclass
class BenchContext:
    """What scenarios need from the harness."""

    workdir: Path
    ram_dir: Path
    logical_block_size: int = 4096
    timeout: float = 3600.0


class Scenario:
    """Base class; subclasses fill in the cases and the client."""

    name: str = ""
    description: str = ""
    metric: str = "time"
    throttled: bool = True
    tools: tuple[str, ...] = ()
    #: ``"write"`` or ``"read"``: the direction whose bandwidth limit and
    #: alignfs counters the table shows.
    direction: str = "write"
    #: Run :meth:`prepare` with the throttle off (large input files).
    unthrottled_prepare: bool = False

    def missing_tools(self) -> list[str]:
        return [t for t in self.tools if which(t) is None]

    def cases(self) -> list[Case]:
        raise NotImplementedError

    def rows(self) -> list[RowDef]:
        raise NotImplementedError

    def setup(self, ctx: BenchContext) -> None:
        """Create resources shared by all runs (called once)."""

    def teardown(self, ctx: BenchContext) -> None:
        """Remove what :meth:`setup` created (always called)."""

    def prepare(self, case: Case, backing: Path) -> None:
        """Create fresh input files in *backing* before a run."""

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        raise NotImplementedError

    def verify(self, case: Case, backing: Path) -> str | None:
        """None if the result files are intact, else what is wrong."""
        return None


# --------------------------------------------------------------------------
# savevm


class SavevmScenario(Scenario):
    """``savevm`` of a paused VM with random RAM into a qcow2 image (the headline)."""

    metric = "time"
    tools = (QEMU, "qemu-img")

    #: (case key, side, qemu cache mode)
    ALL_CASES = (
        ("direct-none", DIRECT, "none"),
        ("alignfs-none", ALIGNFS, "none"),
        ("direct-writeback", DIRECT, "writeback"),
        ("alignfs-writeback", ALIGNFS, "writeback"),
    )

    def __init__(
        self,
        *,
        ram: int = GiB,
        disk_size: int = 8 * GiB,
        name: str = "savevm",
        throttled: bool = True,
        caches: tuple[str, ...] = ("none", "writeback"),
        verify_loadvm: bool = False,
    ) -> None:
        self.name = name
        self.verify_loadvm = verify_loadvm
        self.ctx: BenchContext | None = None
        self.ram = ram
        self.disk_size = disk_size
        self.throttled = throttled
        self.caches = caches
        self.description = f"savevm of {compact_size(ram)} random RAM into qcow2"
        self.ram_file: Path | None = None

    def cases(self) -> list[Case]:
        return [
            Case(key, side, f"{side} cache={cache}", (("cache", cache),))
            for key, side, cache in self.ALL_CASES
            if cache in self.caches
        ]

    def rows(self) -> list[RowDef]:
        size = compact_size(self.ram)
        rows = [RowDef(f"savevm {size} cache=none", "direct-none", "alignfs-none")]
        if "writeback" in self.caches:
            rows += [
                RowDef(
                    f"savevm {size} alignfs cache=writeback",
                    "direct-none",
                    "alignfs-writeback",
                    ("direct side: cache=none",),
                ),
                RowDef(
                    f"savevm {size} direct cache=writeback (reference)",
                    "direct-writeback",
                    None,
                ),
            ]
        return rows

    def setup(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        ctx.ram_dir.mkdir(parents=True, exist_ok=True)
        self.ram_file = ctx.ram_dir / f"ram-{self.ram}.bin"
        log.info("creating %s of random data in %s", compact_size(self.ram), self.ram_file)
        make_random_file(self.ram_file, self.ram)

    def teardown(self, ctx: BenchContext) -> None:
        if self.ram_file is not None:
            self.ram_file.unlink(missing_ok=True)

    def prepare(self, case: Case, backing: Path) -> None:
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                str(backing / "disk.qcow2"),
                str(self.disk_size),
            ],
            timeout=60,
        )

    def _vm(self, ram_file: Path, disk: Path, cache: str, tag: str, what: str = "",
            socket: str = "qmp.sock") -> AbstractContextManager[PausedVm]:
        """A paused VM with *ram_file* as RAM and *disk* (see :func:`paused_vm`);
        its log is ``logs/qemu-NAME-TAG.log``."""
        assert self.ctx is not None
        sock = self.ctx.workdir / socket
        sock.unlink(missing_ok=True)
        argv = qemu_argv(
            ram_file=ram_file, ram_size=self.ram, disk=disk, cache=cache, qmp_socket=sock
        )
        log_path = self.ctx.workdir / "logs" / f"qemu-{self.name}-{tag}.log"
        return paused_vm(argv, sock, log_path, what)

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        assert self.ram_file is not None
        with self._vm(self.ram_file, target / "disk.qcow2", case.param("cache"), case.key) as vm:
            started = time.monotonic()
            seconds = vm.savevm("snap1", timeout=ctx.timeout)
        return ClientOutcome(seconds, self.ram, files=["disk.qcow2"], started=started)

    def verify(self, case: Case, backing: Path) -> str | None:
        image = str(backing / "disk.qcow2")
        check = run(["qemu-img", "check", "-f", "qcow2", image], check=False, timeout=600)
        if check.returncode != 0:
            return f"qemu-img check failed ({check.returncode}): {check.stdout.strip()[-400:]}"
        snaps = run(["qemu-img", "snapshot", "-l", image], check=False, timeout=600)
        if snaps.returncode != 0 or not re.search(r"\bsnap1\b", snaps.stdout):
            return f"snapshot snap1 not listed: {snaps.stdout.strip()[-400:]}"
        if self.verify_loadvm:
            return self._verify_loadvm(case, backing / "disk.qcow2")
        return None

    def _verify_loadvm(self, case: Case, image: Path) -> str | None:
        """``loadvm snap1`` into a copy of the RAM file; it must equal the original.

        Both VMs share their RAM file with qemu (``share=on``), so after the
        load the copy holds exactly what the snapshot stored.
        """
        assert self.ctx is not None and self.ram_file is not None
        copy = self.ram_file.with_name("loadvm-check.bin")
        try:
            make_random_file(copy, self.ram)  # different random data to start with
            with self._vm(copy, image, "none", f"{case.key}-loadvm",
                          socket="qmp-verify.sock") as vm:
                out = vm.qmp.hmp("loadvm snap1", timeout=self.ctx.timeout)
            if out.strip():
                return f"loadvm snap1: {out.strip()[:300]}"
            offset = first_difference(self.ram_file, copy)
            if offset is not None:
                return f"RAM restored by loadvm differs from the saved RAM at offset {offset}"
            return None
        finally:
            copy.unlink(missing_ok=True)


def first_difference(a: Path, b: Path, chunk: int = 16 << 20) -> int | None:
    """Offset of the first differing byte of two files, or None if they are equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            xa, xb = fa.read(chunk), fb.read(chunk)
            if xa != xb:
                n = min(len(xa), len(xb))
                return offset + next((i for i in range(n) if xa[i] != xb[i]), n)
            if not xa:
                return None
            offset += len(xa)


# --------------------------------------------------------------------------
# qemu-img bench


class QemuImgBenchScenario(Scenario):
    """``qemu-img bench -w -t none`` with unaligned 128 KiB + 256 B sequential writes."""

    metric = "time"
    tools = ("qemu-img",)

    def __init__(
        self,
        *,
        total: int = GiB,
        buffer_size: int = 131328,
        formats: tuple[str, ...] = ("raw", "qcow2"),
        depth: int | None = None,
        name: str = "qemu-img-bench",
        throttled: bool = True,
    ) -> None:
        self.name = name
        self.buffer_size = buffer_size
        self.count = -(-total // buffer_size)  # at least *total* bytes
        self.formats = formats
        self.depth = depth
        self.throttled = throttled
        self.description = (
            f"qemu-img bench -w -t none -s {buffer_size} -S {buffer_size} -c {self.count}"
        )

    @property
    def payload(self) -> int:
        return self.count * self.buffer_size

    def cases(self) -> list[Case]:
        return [
            Case(f"{side}-{fmt}", side, f"{side} {fmt}", (("format", fmt),))
            for fmt in self.formats
            for side in (DIRECT, ALIGNFS)
        ]

    def rows(self) -> list[RowDef]:
        return [
            RowDef(
                f"qemu-img bench {fmt} {compact_size(self.buffer_size)}B x {self.count}",
                f"direct-{fmt}",
                f"alignfs-{fmt}",
            )
            for fmt in self.formats
        ]

    def _image(self, case: Case) -> str:
        return f"bench.{case.param('format')}"

    def prepare(self, case: Case, backing: Path) -> None:
        size = -(-(self.payload + MiB) // MiB) * MiB
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                case.param("format"),
                str(backing / self._image(case)),
                str(size),
            ],
            timeout=60,
        )

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        argv = [
            "qemu-img",
            "bench",
            "-w",
            "-t",
            "none",
            "-f",
            case.param("format"),
            "-c",
            str(self.count),
            "-s",
            str(self.buffer_size),
            "-S",
            str(self.buffer_size),
        ]
        if self.depth is not None:
            argv += ["-d", str(self.depth)]
        argv.append(str(target / self._image(case)))
        t0 = time.monotonic()
        proc = run(argv, timeout=ctx.timeout)
        wall = time.monotonic() - t0
        # The process' wall time, not qemu-img's own "Run completed in" figure:
        # that one leaves out closing the image, which is where buffered data
        # gets flushed.
        match = re.search(r"Run completed in ([\d.]+) seconds", proc.stdout)
        reported = float(match.group(1)) if match else None
        return ClientOutcome(
            wall, self.payload, files=[self._image(case)], extra={"reported_seconds": reported}
        )

    def verify(self, case: Case, backing: Path) -> str | None:
        image = backing / self._image(case)
        if case.param("format") == "qcow2":
            check = run(["qemu-img", "check", "-f", "qcow2", str(image)], check=False, timeout=600)
            if check.returncode != 0:
                return f"qemu-img check failed: {check.stdout.strip()[-400:]}"
        elif image.stat().st_size < self.payload:
            return f"{image.name} is shorter than the data written"
        return None


# --------------------------------------------------------------------------
# fio


class FioScenario(Scenario):
    """Sequential fio writes of one block size with O_DIRECT, queue depth 1."""

    metric = "rate"
    tools = ("fio",)

    def __init__(
        self,
        *,
        name: str,
        bs: int,
        size: int,
        runtime: float | None = None,
        throttled: bool = True,
    ) -> None:
        self.name = name
        self.bs = bs
        self.size = size
        self.runtime = runtime
        self.throttled = throttled
        limit = f"{runtime:g} s" if runtime else compact_size(size)
        self.description = f"fio rw=write bs={bs} direct=1 psync iodepth=1, {limit}"

    def cases(self) -> list[Case]:
        return [Case(DIRECT, DIRECT, DIRECT), Case(ALIGNFS, ALIGNFS, ALIGNFS)]

    def rows(self) -> list[RowDef]:
        limit = f"{self.runtime:g}s" if self.runtime else compact_size(self.size)
        return [RowDef(f"fio write bs={compact_size(self.bs)} {limit}", DIRECT, ALIGNFS)]

    def argv(self, target: Path, direct: bool) -> list[str]:
        argv = [
            "fio",
            "--name=bench",
            f"--filename={target / 'fio.dat'}",
            "--rw=write",
            f"--bs={self.bs}",
            "--iodepth=1",
            "--ioengine=psync",
            f"--size={self.size}",
            "--fallocate=none",
            "--output-format=json",
        ]
        argv += ["--direct=1"] if direct else ["--direct=0", "--sync=1"]
        if self.runtime:
            argv += [f"--runtime={self.runtime:g}", "--time_based"]
        return argv

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        notes = []
        direct = True
        if case.side == DIRECT and self.bs < ctx.logical_block_size:
            # O_DIRECT needs logical-block alignment on the raw device; the
            # closest thing a client can do is synchronous buffered writes.
            direct = False
            notes.append(
                f"direct side used O_SYNC (O_DIRECT needs {ctx.logical_block_size}-byte blocks)"
            )
        proc = run(self.argv(target, direct), timeout=ctx.timeout + (self.runtime or 0))
        write = parse_fio_json(proc.stdout)
        return ClientOutcome(
            write["runtime"] / 1000.0,
            int(write["io_bytes"]),
            files=["fio.dat"],
            notes=notes,
            extra={"fio_iops": write.get("iops"), "fio_bw_bytes": write.get("bw_bytes")},
        )


def parse_fio_json(text: str, section: str = "write") -> dict[str, Any]:
    """The *section* (``write`` or ``read``) of the first job in fio's JSON output."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in fio output: {text[:300]!r}")
    data, _ = json.JSONDecoder().raw_decode(text[start:])
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    return job[section]


# --------------------------------------------------------------------------
# read scenarios


class LoadvmScenario(SavevmScenario):
    """``loadvm`` of a snapshot of random RAM from a qcow2 image (the read headline).

    Set-up per run (not timed, throttle off): a paused VM saves its random
    RAM into ``disk.qcow2`` in the backing directory with ``cache=writeback``.
    Then the page cache is dropped and, for an alignfs case, a fresh mount
    comes up; a second paused VM whose RAM file is all zeros opens the image
    (directly or through the mount) and ``loadvm snap1`` is timed.  Its RAM
    must then equal the saved RAM byte for byte.
    """

    direction = "read"
    unthrottled_prepare = True

    #: (case key, side, qemu cache mode); the writeback case is a reference line
    ALL_CASES = (
        ("direct-none", DIRECT, "none"),
        ("alignfs-none", ALIGNFS, "none"),
        ("direct-writeback", DIRECT, "writeback"),
    )

    #: goal from the issue: alignfs loadvm at >= 85% of the model's bandwidth
    TARGET_PERCENT = 85.0

    def __init__(
        self,
        *,
        ram: int = GiB,
        disk_size: int = 8 * GiB,
        name: str = "loadvm",
        throttled: bool = True,
        caches: tuple[str, ...] = ("none", "writeback"),
    ) -> None:
        super().__init__(
            ram=ram, disk_size=disk_size, name=name, throttled=throttled, caches=caches
        )
        self.description = f"loadvm of {compact_size(ram)} random RAM from qcow2"
        self.target_file: Path | None = None

    def rows(self) -> list[RowDef]:
        size = compact_size(self.ram)
        rows = [
            RowDef(
                f"loadvm {size} cache=none",
                "direct-none",
                "alignfs-none",
                target_percent=self.TARGET_PERCENT,
            )
        ]
        if "writeback" in self.caches:
            rows.append(
                RowDef(
                    f"loadvm {size} direct cache=writeback (reference)", "direct-writeback", None
                )
            )
        return rows

    def setup(self, ctx: BenchContext) -> None:
        super().setup(ctx)
        self.target_file = ctx.ram_dir / f"loadvm-ram-{self.ram}.bin"

    def teardown(self, ctx: BenchContext) -> None:
        super().teardown(ctx)
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)

    def prepare(self, case: Case, backing: Path) -> None:
        assert self.ctx is not None and self.ram_file is not None
        assert self.target_file is not None
        super().prepare(case, backing)  # the empty qcow2 image
        with self._vm(self.ram_file, backing / "disk.qcow2", "writeback", f"{case.key}-savevm",
                      what="set-up savevm: ") as vm:
            vm.savevm("snap1", timeout=self.ctx.timeout)
        fill_zeros(self.target_file, self.ram)

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        assert self.target_file is not None
        with self._vm(self.target_file, target / "disk.qcow2", case.param("cache"),
                      case.key) as vm:
            t0 = time.monotonic()
            out = vm.qmp.hmp("loadvm snap1", timeout=ctx.timeout)
            seconds = time.monotonic() - t0
            if out.strip():
                raise QmpError(f"loadvm snap1: {out.strip()[:300]}")
        # Nothing was written: no files to fsync.
        return ClientOutcome(seconds, self.ram, started=t0)

    def verify(self, case: Case, backing: Path) -> str | None:
        assert self.ram_file is not None and self.target_file is not None
        offset = first_difference(self.ram_file, self.target_file)
        if offset is not None:
            return f"RAM restored by loadvm differs from the saved RAM at offset {offset}"
        return None


class QemuImgReadScenario(QemuImgBenchScenario):
    """``qemu-img bench -t none`` (read) of unaligned 128 KiB + 256 B sequential requests."""

    direction = "read"
    unthrottled_prepare = True

    def __init__(
        self,
        *,
        total: int = GiB,
        buffer_size: int = 131328,
        depth: int | None = None,
        name: str = "qemu-img-read",
        throttled: bool = True,
    ) -> None:
        super().__init__(
            total=total,
            buffer_size=buffer_size,
            formats=("raw",),
            depth=depth,
            name=name,
            throttled=throttled,
        )
        self.description = (
            f"qemu-img bench -t none -s {buffer_size} -S {buffer_size} -c {self.count} (read)"
        )

    def rows(self) -> list[RowDef]:
        return [
            RowDef(
                f"qemu-img bench read raw {compact_size(self.buffer_size)}B x {self.count}",
                "direct-raw",
                "alignfs-raw",
            )
        ]

    def prepare(self, case: Case, backing: Path) -> None:
        size = -(-(self.payload + MiB) // MiB) * MiB
        fill_random(backing / self._image(case), size)

    def argv(self, image: Path) -> list[str]:
        argv = ["qemu-img", "bench", "-t", "none", "-f", "raw", "-c", str(self.count)]
        argv += ["-s", str(self.buffer_size), "-S", str(self.buffer_size)]
        if self.depth is not None:
            argv += ["-d", str(self.depth)]
        return argv + [str(image)]

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        t0 = time.monotonic()
        proc = run(self.argv(target / self._image(case)), timeout=ctx.timeout)
        wall = time.monotonic() - t0
        match = re.search(r"Run completed in ([\d.]+) seconds", proc.stdout)
        reported = float(match.group(1)) if match else None
        return ClientOutcome(wall, self.payload, extra={"reported_seconds": reported})

    def verify(self, case: Case, backing: Path) -> str | None:
        return None


class FioReadScenario(FioScenario):
    """fio 4 KiB reads (sequential or random) with O_DIRECT, queue depth 1, time-based."""

    direction = "read"
    unthrottled_prepare = True
    #: goal for the random reader: no slower than direct, within 3% noise
    RANDOM_TARGET_SPEEDUP = 0.97

    def __init__(
        self,
        *,
        name: str,
        rw: str,
        bs: int,
        size: int,
        runtime: float | None = None,
        throttled: bool = True,
    ) -> None:
        super().__init__(name=name, bs=bs, size=size, runtime=runtime, throttled=throttled)
        self.rw = rw
        limit = f"{runtime:g} s" if runtime else compact_size(size)
        self.description = (
            f"fio rw={rw} bs={bs} direct=1 psync iodepth=1 over {compact_size(size)}, {limit}"
        )

    def rows(self) -> list[RowDef]:
        limit = f"{self.runtime:g}s" if self.runtime else compact_size(self.size)
        # A random reader gets no read-ahead: the goal is only not to lose.
        # Both sides are bound by the same IOPS limit, so a few per cent
        # either way is noise, not a loss.
        speedup = self.RANDOM_TARGET_SPEEDUP if self.rw == "randread" else None
        return [
            RowDef(
                f"fio {self.rw} bs={compact_size(self.bs)} {limit}",
                DIRECT,
                ALIGNFS,
                target_speedup=speedup,
            )
        ]

    def prepare(self, case: Case, backing: Path) -> None:
        fill_random(backing / "fio.dat", self.size)

    def argv(self, target: Path, direct: bool = True) -> list[str]:
        argv = [
            "fio",
            "--name=bench",
            f"--filename={target / 'fio.dat'}",
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            "--iodepth=1",
            "--ioengine=psync",
            f"--size={self.size}",
            "--direct=1",
            "--invalidate=1",
            "--output-format=json",
        ]
        if self.rw == "randread":
            argv.append("--randrepeat=0")
        if self.runtime:
            argv += [f"--runtime={self.runtime:g}", "--time_based"]
        return argv

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        proc = run(self.argv(target), timeout=ctx.timeout + (self.runtime or 0))
        read = parse_fio_json(proc.stdout, "read")
        return ClientOutcome(
            read["runtime"] / 1000.0,
            int(read["io_bytes"]),
            extra={"fio_iops": read.get("iops"), "fio_bw_bytes": read.get("bw_bytes")},
        )


# --------------------------------------------------------------------------
# buffered producers (page cache)


#: Commands whose output is parsed run with this locale.
C_LOCALE = {**os.environ, "LC_ALL": "C"}


class PageCacheScenario(Scenario):
    """A buffered client writes one file through the page cache, then makes it durable.

    Timed from the client's start until its own fsync returned (``conv=fsync``
    or ``sync FILE``); the runner then adds its fsync and, on the alignfs
    side, the umount.  Directly, the page cache may hand the data to the disk
    by kernel writeback, which cgroup v1 does not throttle: such runs are
    flagged, and their row compares alignfs with the bandwidth limit (see
    :attr:`~alignfs.bench.results.RowResult.speedup_basis`).
    """

    metric = "time"
    #: the file the client writes, in the run directory
    target_name = "out.bin"

    def __init__(self, *, name: str, payload: int, throttled: bool = True,
                 mount_options: tuple[str, ...] = ()) -> None:
        self.name = name
        self.payload = payload
        self.throttled = throttled
        self.mount_options = mount_options

    @property
    def label(self) -> str:
        raise NotImplementedError

    def row_label(self) -> str:
        if not self.mount_options:
            return self.label
        return f"{self.label} (alignfs {' '.join(self.mount_options)})"

    def cases(self) -> list[Case]:
        alignfs = " ".join((ALIGNFS, *self.mount_options))
        return [
            Case(DIRECT, DIRECT, DIRECT),
            Case(ALIGNFS, ALIGNFS, alignfs, mount_options=self.mount_options),
        ]

    def rows(self) -> list[RowDef]:
        return [RowDef(self.row_label(), DIRECT, ALIGNFS)]

    def commands(self, target: Path) -> list[list[str]]:
        """The timed commands, run one after the other, writing *target*."""
        raise NotImplementedError

    def check_output(self, outputs: list[str]) -> dict[str, Any]:
        """What the commands' output says (raises if it shows a problem): run extras."""
        return {}

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        steps: dict[str, float] = {}
        outputs = []
        started = time.monotonic()
        for argv in self.commands(target / self.target_name):
            t0 = time.monotonic()
            outputs.append(run(argv, timeout=ctx.timeout, env=C_LOCALE).stdout)
            steps[f"{argv[0]}_seconds"] = time.monotonic() - t0
        seconds = time.monotonic() - started
        extra: dict[str, Any] = dict(steps)
        extra.update(self.check_output(outputs))
        return ClientOutcome(
            seconds, self.payload, files=[self.target_name], extra=extra, started=started
        )

    def verify_size(self, backing: Path) -> str | None:
        size = (backing / self.target_name).stat().st_size
        if size != self.payload:
            return f"{self.target_name} has {size} bytes, not {self.payload}"
        return None


#: The summary line of GNU dd (C locale): bytes and seconds.
DD_SUMMARY = re.compile(r"^(\d+) bytes\b.*\bcopied, ([\d.]+(?:e[-+]?\d+)?) s", re.MULTILINE)


def parse_dd_output(text: str) -> tuple[int, float]:
    """Bytes copied and seconds from dd's last summary line."""
    found = DD_SUMMARY.findall(text)
    if not found:
        raise ValueError(f"no summary line in dd output: {text.strip()[-300:]!r}")
    nbytes, seconds = found[-1]
    return int(nbytes), float(seconds)


class DdScenario(PageCacheScenario):
    """``dd if=/dev/zero of=FILE bs=BS count=N conv=fsync``: small buffered writes."""

    tools = ("dd",)

    def __init__(self, *, name: str, bs: int, total: int, throttled: bool = True,
                 mount_options: tuple[str, ...] = ()) -> None:
        self.bs = bs
        self.count = -(-total // bs)  # at least *total* bytes
        super().__init__(name=name, payload=self.count * bs, throttled=throttled,
                         mount_options=mount_options)
        self.description = f"dd if=/dev/zero bs={bs} count={self.count} conv=fsync"

    @property
    def label(self) -> str:
        return f"dd bs={compact_size(self.bs)} {compact_size(self.payload)} conv=fsync"

    def commands(self, target: Path) -> list[list[str]]:
        return [["dd", "if=/dev/zero", f"of={target}", f"bs={self.bs}", f"count={self.count}",
                 "conv=fsync"]]

    def check_output(self, outputs: list[str]) -> dict[str, Any]:
        nbytes, seconds = parse_dd_output(outputs[0])
        if nbytes != self.payload:
            raise RuntimeError(f"dd copied {nbytes} bytes, not {self.payload}")
        return {"reported_seconds": seconds}

    def verify(self, case: Case, backing: Path) -> str | None:
        problem = self.verify_size(backing)
        if problem:
            return problem
        offset = sampled_difference(backing / self.target_name, None, self.payload)
        return None if offset is None else f"not zero at offset {offset}"


class SourceFileScenario(PageCacheScenario):
    """Copies a random file prepared outside the model (``--ram-dir``, tmpfs).

    The source is created once per scenario, like savevm's RAM file, so
    reading it costs neither disk time nor throttle.
    """

    def __init__(self, *, name: str, size: int, throttled: bool = True,
                 mount_options: tuple[str, ...] = ()) -> None:
        super().__init__(name=name, payload=size, throttled=throttled,
                         mount_options=mount_options)
        self.source: Path | None = None

    def setup(self, ctx: BenchContext) -> None:
        ctx.ram_dir.mkdir(parents=True, exist_ok=True)
        self.source = ctx.ram_dir / f"{self.name}-source-{self.payload}.raw"
        log.info("creating %s of random data in %s", compact_size(self.payload), self.source)
        make_random_file(self.source, self.payload)

    def teardown(self, ctx: BenchContext) -> None:
        if self.source is not None:
            self.source.unlink(missing_ok=True)


class CpScenario(SourceFileScenario):
    """``cp SOURCE FILE`` then ``sync FILE`` (fsync of the copy)."""

    tools = ("cp", "sync")

    def __init__(self, *, name: str = "cp", size: int = GiB, throttled: bool = True,
                 mount_options: tuple[str, ...] = ()) -> None:
        super().__init__(name=name, size=size, throttled=throttled, mount_options=mount_options)
        self.description = f"cp of a {compact_size(size)} random file, then sync FILE"

    @property
    def label(self) -> str:
        return f"cp {compact_size(self.payload)} random + sync FILE"

    def commands(self, target: Path) -> list[list[str]]:
        assert self.source is not None
        return [["cp", str(self.source), str(target)], ["sync", str(target)]]

    def verify(self, case: Case, backing: Path) -> str | None:
        assert self.source is not None
        problem = self.verify_size(backing)
        if problem:
            return problem
        offset = sampled_difference(backing / self.target_name, self.source, self.payload)
        return None if offset is None else f"differs from the source at offset {offset}"


class QemuImgConvertScenario(SourceFileScenario):
    """``qemu-img convert -f raw -O qcow2 SOURCE FILE`` (default cache mode) then ``sync FILE``."""

    tools = ("qemu-img", "sync")
    target_name = "out.qcow2"

    def __init__(self, *, name: str = "qemu-img-convert", size: int = GiB,
                 throttled: bool = True, mount_options: tuple[str, ...] = ()) -> None:
        super().__init__(name=name, size=size, throttled=throttled, mount_options=mount_options)
        self.description = (
            f"qemu-img convert -f raw -O qcow2 of a {compact_size(size)} random image, "
            "then sync FILE"
        )

    @property
    def label(self) -> str:
        return f"qemu-img convert raw->qcow2 {compact_size(self.payload)} + sync FILE"

    def commands(self, target: Path) -> list[list[str]]:
        assert self.source is not None
        return [
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.source), str(target)],
            ["sync", str(target)],
        ]

    def verify(self, case: Case, backing: Path) -> str | None:
        image = str(backing / self.target_name)
        check = run(["qemu-img", "check", "-f", "qcow2", image], check=False, timeout=600)
        if check.returncode != 0:
            return f"qemu-img check failed ({check.returncode}): {check.stdout.strip()[-400:]}"
        info = run(["qemu-img", "info", "-f", "qcow2", "--output=json", image], timeout=60)
        size = json.loads(info.stdout).get("virtual-size")
        if size != self.payload:
            return f"virtual size {size}, not {self.payload}"
        return None


def sample_offsets(size: int, samples: int = 16, chunk: int = MiB) -> list[int]:
    """Offsets of up to *samples* chunks spread over *size* bytes: the first at 0,
    the last ending at the end."""
    if size <= chunk:
        return [0]
    last = size - chunk
    return sorted({last * i // (samples - 1) for i in range(samples)})


def sampled_difference(path: Path, reference: Path | None, size: int,
                       samples: int = 16, chunk: int = MiB) -> int | None:
    """Offset of the first of the sampled chunks in which *path* differs from
    *reference* (None: zeros), or None if they all match.

    A sample, not the whole file: verifying runs with the throttle on, and
    reading all of a 1 GiB file back would cost more than writing it.
    """
    with open(path, "rb") as f, (open(reference, "rb") if reference else nullcontext()) as r:
        for offset in sample_offsets(size, samples, chunk):
            n = min(chunk, size - offset)
            got = os.pread(f.fileno(), n, offset)
            want = os.pread(r.fileno(), n, offset) if r is not None else bytes(n)
            if got != want:
                return offset
    return None


# --------------------------------------------------------------------------
# registry


@dataclass
class ScenarioOptions:
    """Sizes and limits the scenarios are built with (from the command line)."""

    ram: int = GiB
    disk_size: int = 8 * GiB
    savevm_caches: tuple[str, ...] = ("none", "writeback")
    verify_loadvm: bool = False
    bench_total: int = GiB
    bench_depth: int | None = None
    fio_runtime: float = 10.0
    fio_small_size: int = 256 * MiB
    fio_1m_size: int = GiB
    fio_read_size: int = GiB
    dd_size: int = 512 * MiB
    copy_size: int = GiB


#: The groups of scenario names: only the write scenarios run by default.
WRITE, READ, BUFFERED = "write", "read", "buffered"


@dataclass(frozen=True)
class Registered:
    """What a scenario name builds, from its name and the options."""

    build: Callable[[str, ScenarioOptions], list[Scenario]]
    #: :data:`WRITE` scenarios run by default; :data:`READ` and :data:`BUFFERED`
    #: (page-cache producers) ones only when named
    group: str = WRITE


#: Every scenario name, in the order they run: the one list that --scenarios
#: (its check and help), --plot-timeline and :func:`build_scenarios` use.
SCENARIOS: dict[str, Registered] = {
    "savevm": Registered(lambda name, o: [SavevmScenario(
        ram=o.ram, disk_size=o.disk_size, caches=o.savevm_caches,
        verify_loadvm=o.verify_loadvm)]),
    "qemu-img-bench": Registered(lambda name, o: [
        QemuImgBenchScenario(total=o.bench_total, depth=o.bench_depth)]),
    "fio-4k": Registered(lambda name, o: [
        FioScenario(name=name, bs=4096, size=o.fio_small_size, runtime=o.fio_runtime)]),
    "fio-512": Registered(lambda name, o: [
        FioScenario(name=name, bs=512, size=o.fio_small_size, runtime=o.fio_runtime)]),
    "fio-1m": Registered(lambda name, o: [FioScenario(name=name, bs=MiB, size=o.fio_1m_size)]),
    # The same on the unthrottled fast disk: what alignfs costs where it cannot help.
    "fast": Registered(lambda name, o: [
        SavevmScenario(name="fast-savevm", ram=o.ram, disk_size=o.disk_size, throttled=False,
                       caches=("none",)),
        FioScenario(name="fast-fio-1m", bs=MiB, size=o.fio_1m_size, throttled=False)]),
    # Buffered producers through the page cache (and the FUSE writeback cache).
    "dd-4k": Registered(lambda name, o: [
        DdScenario(name=name, bs=4096, total=o.dd_size)], group=BUFFERED),
    "dd-64k": Registered(lambda name, o: [
        DdScenario(name=name, bs=64 * KiB, total=o.dd_size)], group=BUFFERED),
    "cp": Registered(lambda name, o: [CpScenario(name=name, size=o.copy_size)], group=BUFFERED),
    "qemu-img-convert": Registered(lambda name, o: [
        QemuImgConvertScenario(name=name, size=o.copy_size)], group=BUFFERED),
    "dd-4k-xattr-off": Registered(lambda name, o: [DdScenario(
        name=name, bs=4096, total=o.dd_size, mount_options=("--xattr", "off"))], group=BUFFERED),
    "loadvm": Registered(lambda name, o: [
        LoadvmScenario(ram=o.ram, disk_size=o.disk_size, caches=o.savevm_caches)], group=READ),
    "qemu-img-read": Registered(lambda name, o: [
        QemuImgReadScenario(total=o.bench_total, depth=o.bench_depth)], group=READ),
    "fio-read-4k": Registered(lambda name, o: [FioReadScenario(
        name=name, rw="read", bs=4096, size=o.fio_read_size, runtime=o.fio_runtime)],
        group=READ),
    "fio-randread-4k": Registered(lambda name, o: [FioReadScenario(
        name=name, rw="randread", bs=4096, size=o.fio_read_size, runtime=o.fio_runtime)],
        group=READ),
}
SCENARIO_NAMES = tuple(SCENARIOS)


def _group(group: str) -> tuple[str, ...]:
    return tuple(name for name, entry in SCENARIOS.items() if entry.group == group)


WRITE_SCENARIOS = _group(WRITE)
READ_SCENARIOS = _group(READ)
BUFFERED_SCENARIOS = _group(BUFFERED)


def build_scenarios(names: list[str], opts: ScenarioOptions) -> list[Scenario]:
    """Scenario objects for *names* (``fast`` expands into two)."""
    out: list[Scenario] = []
    for name in names:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIO_NAMES)})")
        out += SCENARIOS[name].build(name, opts)
    return out
