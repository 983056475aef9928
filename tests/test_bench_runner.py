"""The runner end to end on a real (small) HDD model with a trivial client.

The direct side always runs; the alignfs side runs when ``python -m alignfs``
is importable (it is skipped, not failed, otherwise).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from conftest import needs_hdd_model

from alignfs.bench.hddmodel import HddModel
from alignfs.bench.mount import AlignfsCommand
from alignfs.bench.report import render_table
from alignfs.bench.results import RunResult
from alignfs.bench.runner import Progress, Runner
from alignfs.bench.scenarios import BenchContext, Case, ClientOutcome, RowDef, Scenario
from alignfs.bench.sysutil import MiB

PAYLOAD = 2 * MiB
CHUNK = 4000  # small and unaligned, like the clients alignfs is for


class TinyScenario(Scenario):
    name = "tiny"
    metric = "time"

    def __init__(self, sides: tuple[str, ...]) -> None:
        self.sides = sides
        self.prepared: list[Path] = []

    def cases(self) -> list[Case]:
        return [Case(side, side, side) for side in self.sides]

    def rows(self) -> list[RowDef]:
        return [RowDef("tiny unaligned writes", "direct", "alignfs")]

    def prepare(self, case: Case, backing: Path) -> None:
        assert list(backing.iterdir()) == []  # fresh directory every run
        self.prepared.append(backing)

    def run(self, case: Case, target: Path, ctx: BenchContext) -> ClientOutcome:
        data = os.urandom(PAYLOAD)
        began = time.monotonic()
        with open(target / "data", "wb", buffering=0) as f:
            for off in range(0, PAYLOAD, CHUNK):
                f.write(data[off : off + CHUNK])
        seconds = time.monotonic() - began
        (ctx.workdir / f"expect-{case.key}").write_bytes(data)
        return ClientOutcome(seconds, PAYLOAD, files=["data"], notes=["tiny note"],
                             started=began)

    def verify(self, case: Case, backing: Path) -> str | None:
        expect = (self.workdir / f"expect-{case.key}").read_bytes()
        if (backing / "data").read_bytes() != expect:
            return "data differs"
        return None


def make_runner(model: HddModel, workdir: Path, stream: io.StringIO) -> Runner:
    (workdir / "logs").mkdir()
    ctx = BenchContext(workdir=workdir, ram_dir=workdir / "ram", timeout=60)
    runner = Runner(model, ctx, AlignfsCommand(), repeat=2, drop=lambda: None)
    runner.progress = Progress(total=0, stream=stream)
    return runner


@needs_hdd_model
def test_runner_direct_side(tmp_path: Path) -> None:
    out = io.StringIO()
    with HddModel(size=64 * MiB) as model:
        runner = make_runner(model, tmp_path, out)
        runner.sides = {"direct"}
        sc = TinyScenario(("direct", "alignfs"))
        sc.workdir = tmp_path  # type: ignore[attr-defined]
        runner.progress.total = runner.count_runs([sc])  # type: ignore[union-attr]
        (row,) = runner.run_scenario(sc)
        assert sorted(p.name for p in model.path.iterdir()) == ["lost+found"]
    assert len(sc.prepared) == 2 and len(set(sc.prepared)) == 2
    assert [r.rep for r in row.direct_runs] == [1, 2] and row.alignfs_runs == []
    run: RunResult = row.direct_runs[0]
    assert run.ok, run.error
    assert run.throttled and (run.throttled_write_bytes or 0) >= PAYLOAD
    assert run.drain_seconds is not None and run.total_seconds is not None
    assert row.skipped_sides == ["alignfs"]
    assert "skipped" in render_table([row])
    assert "tiny note" in row.flags
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] tiny: direct (rep 1/2): ")


@needs_hdd_model
def test_runner_alignfs_side(tmp_path: Path) -> None:
    reason = AlignfsCommand().available()
    if reason:
        pytest.skip(reason)
    out = io.StringIO()
    with HddModel(size=64 * MiB) as model:
        runner = make_runner(model, tmp_path, out)
        runner.repeat = 1
        sc = TinyScenario(("alignfs",))
        sc.workdir = tmp_path  # type: ignore[attr-defined]
        (row,) = runner.run_scenario(sc)
        assert sorted(p.name for p in model.path.iterdir()) == ["lost+found"]
    (run,) = row.alignfs_runs
    assert run.ok, f"{run.error}\n{out.getvalue()}"
    assert run.stats is not None
    assert run.stats["write_bytes"] == PAYLOAD
    # The kernel's writeback cache coalesces the CHUNK-sized write(2) calls.
    assert 1 <= run.stats["write_requests"] <= PAYLOAD // CHUNK + 1
    assert (run.throttled_write_bytes or 0) >= PAYLOAD
    assert run.daemon_cpu_seconds is not None and run.daemon_cpu_seconds > 0
    # The serving thread's share is a part of the whole process' CPU (the
    # kernel rounds a thread's and a process' times separately: 2 ticks' slack).
    assert run.serving_cpu_seconds is not None
    assert 0 < run.serving_cpu_seconds <= run.daemon_cpu_seconds + 2 / os.sysconf("SC_CLK_TCK")
    assert run.extra["umount_seconds"] > 0
    # The daemon's counters were sampled during the run, the last after the fsync.
    tl = run.timeline
    assert tl is not None and tl["events"]["durable"] >= tl["events"]["client_done"]
    last = dict(zip(tl["columns"], tl["samples"][-1], strict=True))
    assert last["write_bytes"] == PAYLOAD and last["dirty_bytes"] == 0
    assert not any(p.name.startswith("mnt-") for p in tmp_path.iterdir())
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
