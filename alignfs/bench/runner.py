"""Executing scenarios: fresh files, cold caches, alternating sides, repeats.

For every repetition the runner walks the scenario's cases in order (they
alternate direct / alignfs), and for each one:

1. creates a fresh, empty run directory inside the HDD model and lets the
   scenario create its input files there (without the throttle if the
   scenario asks for it: read scenarios prefill large files);
2. syncs and drops the page cache, sets the throttle for the scenario;
3. for an alignfs case, mounts a fresh alignfs over the run directory (with
   the case's own extra mount options, if any);
4. runs the client (timed by the scenario); on the alignfs side the daemon's
   counters are sampled ~10 times a second until the umount returns (the
   run's ``timeline``, drawn by ``--plot``);
5. drains: ``fsync`` of the client's files, then for alignfs ``stats`` and
   ``umount`` (which only returns once all data is written) -- the drain
   time is part of the measured time of a write scenario (a read scenario
   has nothing to make durable: its drain is recorded, not counted);
6. verifies the files in the backing directory and deletes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .hddmodel import HddModel
from .mount import AlignfsCommand, AlignfsMount
from .results import ALIGNFS, DIRECT, RowResult, RunResult
from .sampler import DEFAULT_INTERVAL, CounterSampler
from .scenarios import BenchContext, Case, ClientOutcome, Scenario
from .sysutil import cpu_pressure_total, drop_caches

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Prints one line per run to stderr (overwritten in place on a terminal)."""

    total: int
    stream: object = sys.stderr
    done: int = 0
    enabled: bool = True

    def _write(self, text: str, final: bool) -> None:
        if not self.enabled:
            return
        stream = self.stream
        tty = getattr(stream, "isatty", lambda: False)()
        if tty:
            stream.write("\r\x1b[K" + text + ("\n" if final else ""))  # type: ignore[attr-defined]
        elif final:
            stream.write(text + "\n")  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]

    def start(self, what: str) -> None:
        self._write(f"[{self.done + 1}/{self.total}] {what} ...", final=False)

    def finish(self, what: str, outcome: str) -> None:
        self.done += 1
        self._write(f"[{self.done}/{self.total}] {what}: {outcome}", final=True)


def describe_run(r: RunResult, metric: str) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    parts = []
    if r.total_seconds is not None:
        parts.append(f"{r.total_seconds:.2f} s")
        if r.drain_seconds and r.drain_seconds >= 0.01:
            uncounted = "" if r.drain_counted else ", not counted"
            parts.append(f"(drain {r.drain_seconds:.2f} s{uncounted})")
    if r.rate is not None:
        parts.append(f"{r.rate / 1e6:.1f} MB/s")
    if r.throttle_short:
        parts.append(f"[{r.throttled_share:.0%} throttled]")
    elif r.escaped:
        parts.append("[escaped throttle]")
    return " ".join(parts)


class Runner:
    """Runs scenarios on one HDD model."""

    def __init__(
        self,
        model: HddModel,
        ctx: BenchContext,
        alignfs: AlignfsCommand,
        *,
        repeat: int = 3,
        alignfs_unavailable: str | None = None,
        progress: Progress | None = None,
        drop: Callable[[], None] = drop_caches,
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.alignfs = alignfs
        self.repeat = repeat
        self.alignfs_unavailable = alignfs_unavailable
        self.progress = progress
        self.drop = drop
        self.sides = {DIRECT, ALIGNFS}
        #: seconds between samples of the daemon's counters during an alignfs run
        self.sample_interval = DEFAULT_INTERVAL
        self._run_no = 0

    def _cases(self, scenario: Scenario) -> list[Case]:
        return [c for c in scenario.cases() if c.side in self.sides]

    def count_runs(self, scenarios: list[Scenario]) -> int:
        return sum(len(self._cases(s)) for s in scenarios) * self.repeat

    def run_scenario(self, scenario: Scenario) -> list[RowResult]:
        cases = self._cases(scenario)
        runs: dict[str, list[RunResult]] = {c.key: [] for c in cases}
        scenario.setup(self.ctx)
        try:
            for rep in range(1, self.repeat + 1):
                for case in cases:
                    runs[case.key].append(self.run_case(scenario, case, rep))
        finally:
            scenario.teardown(self.ctx)
            self.model.set_throttled(True)
        throttle = self.model.throttle
        limit = None
        if throttle and scenario.throttled:
            limit = throttle.read_bps if scenario.direction == "read" else throttle.write_bps
        rows = []
        for row in scenario.rows():
            rows.append(
                RowResult(
                    scenario=scenario.name,
                    label=row.label if scenario.throttled else f"{row.label} (no throttle)",
                    metric=scenario.metric,
                    direct_case=row.direct,
                    alignfs_case=row.alignfs,
                    direct_runs=runs.get(row.direct, []) if row.direct else [],
                    alignfs_runs=runs.get(row.alignfs, []) if row.alignfs else [],
                    bandwidth_limit=float(limit) if limit else None,
                    notes=list(row.notes),
                    skipped_sides=[side for side in (DIRECT, ALIGNFS) if side not in self.sides],
                    direction=scenario.direction,
                    target_percent=row.target_percent,
                    target_speedup=row.target_speedup,
                )
            )
        return rows

    def run_case(self, scenario: Scenario, case: Case, rep: int) -> RunResult:
        what = f"{scenario.name}: {case.label} (rep {rep}/{self.repeat})"
        if self.progress:
            self.progress.start(what)
        result = RunResult(
            scenario=scenario.name,
            case=case.key,
            side=case.side,
            rep=rep,
            direction=scenario.direction,
        )
        if case.side == ALIGNFS and self.alignfs_unavailable:
            result.ok = False
            result.error = f"alignfs unavailable: {self.alignfs_unavailable}"
        else:
            waited, began = cpu_pressure_total(), time.monotonic()
            try:
                self._execute(scenario, case, result)
            except Exception as exc:  # noqa: BLE001 - one failed run must not end the benchmark
                log.debug("run failed", exc_info=True)
                result.ok = False
                result.error = f"{type(exc).__name__}: {exc}"
            # Share of the run during which some task waited for a CPU: other
            # work on the machine skews CPU-bound (alignfs) runs the most.
            now = cpu_pressure_total()
            if waited is not None and now is not None:
                result.extra["cpu_pressure"] = (now - waited) / max(time.monotonic() - began, 1e-3)
        result.extra["loadavg_1m"] = os.getloadavg()[0]
        if self.progress:
            self.progress.finish(what, describe_run(result, scenario.metric))
        return result

    def _execute(self, scenario: Scenario, case: Case, result: RunResult) -> None:
        self._run_no += 1
        backing = self.model.path / f"run-{self._run_no:03d}-{scenario.name}-{case.key}"
        backing.mkdir()
        mountpoint = self.ctx.workdir / f"mnt-{self._run_no:03d}"
        try:
            if scenario.unthrottled_prepare:
                # Input files are set-up, not measurement: write them at full speed.
                self.model.set_throttled(False)
            scenario.prepare(case, backing)
            self.drop()
            self.model.set_throttled(scenario.throttled)
            result.throttled = self.model.throttled
            before = self.model.io_counters()
            if case.side == ALIGNFS:
                mountpoint.mkdir()
                try:
                    self._run_alignfs(scenario, case, result, backing, mountpoint)
                finally:
                    mountpoint.rmdir()
            else:
                outcome = scenario.run(case, backing, self.ctx)
                self._record_outcome(result, outcome)
                t0 = time.monotonic()
                _fsync_files(backing, outcome.files)
                result.drain_seconds = time.monotonic() - t0
            delta = self.model.io_counters() - before
            result.throttled_write_bytes = delta.throttled_write
            result.throttled_read_bytes = delta.throttled_read
            result.device_write_bytes = delta.device_write
            result.device_read_bytes = delta.device_read
            problem = scenario.verify(case, backing)
            if problem:
                result.ok = False
                result.error = f"verification failed: {problem}"
        finally:
            self.model.set_throttled(True)
            shutil.rmtree(backing, ignore_errors=True)

    def _run_alignfs(
        self, scenario: Scenario, case: Case, result: RunResult, backing: Path, mountpoint: Path
    ) -> None:
        logs = self.ctx.workdir / "logs"
        cmd = self.alignfs
        if case.mount_options:
            cmd = dataclasses.replace(
                cmd, mount_options=[*cmd.mount_options, *case.mount_options]
            )
            result.extra["case_mount_options"] = list(case.mount_options)
        with AlignfsMount(cmd, mountpoint, backing, logs) as mnt:
            cpu0 = mnt.daemon_cpu()
            sampler = CounterSampler(mnt.control_stats, interval=self.sample_interval)
            sampler.start()
            try:
                began = time.monotonic()
                outcome = scenario.run(case, mountpoint, self.ctx)
                self._record_outcome(result, outcome)
                t0 = time.monotonic()
                _fsync_files(mountpoint, outcome.files)
                fsync_seconds = time.monotonic() - t0
                result.stats = mnt.stats()
                sampler.add(time.monotonic(), result.stats)
                ok = mnt.umount()
                durable = time.monotonic()
            finally:
                sampler.stop()
            start = outcome.started if outcome.started is not None else began
            result.timeline = sampler.timeline(
                origin=start,
                events={"client_done": start + outcome.seconds, "durable": durable},
            )
            # the last sample before the daemon exited
            if cpu0 is not None and mnt.last_daemon_cpu is not None:
                result.daemon_cpu_seconds = mnt.last_daemon_cpu - cpu0[0]
            if cpu0 is not None and mnt.last_serving_cpu is not None:
                result.serving_cpu_seconds = mnt.last_serving_cpu - cpu0[1]
            result.drain_seconds = fsync_seconds + (mnt.umount_seconds or 0.0)
            result.extra["umount_seconds"] = mnt.umount_seconds
            if not ok:
                raise RuntimeError(mnt.umount_error or "alignfs umount failed")

    @staticmethod
    def _record_outcome(result: RunResult, outcome: ClientOutcome) -> None:
        result.client_seconds = outcome.seconds
        result.payload_bytes = outcome.payload_bytes
        result.notes.extend(outcome.notes)
        result.extra.update(outcome.extra)


def _fsync_files(directory: Path, names: list[str]) -> None:
    """fsync each of the client's files after the client has exited.

    Opened write-only: Linux allows fsync on a read-only descriptor, but a
    FUSE file system may refuse it, and this must measure the flush, not that.
    """
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        fd = os.open(path, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
