#!/usr/bin/env python3
"""Soak test: real clients and a model checker hammer one alignfs mount at once.

Usage (as root, from a checkout; not part of the default test suite):

    scripts/soak.py                      # 10 minutes
    scripts/soak.py --minutes 1 --json   # shorter, machine-readable summary
    scripts/soak.py --dir /var/tmp --keep --mount-options "--buffer-size 8M"

It mounts alignfs (this checkout, run with the current Python) over a fresh
BACKING in a temporary directory and runs three workloads concurrently until
the time is up:

* qemu-img: ``convert`` a random raw image into qcow2 on the mount and
  ``compare`` it back, then ``bench -w`` (pattern writes, O_DIRECT) over the
  qcow2 and check every byte of it through a convert back to local disk.
* fio: random writes with checksums and verification (``--verify=crc32c``),
  alternating buffered unaligned block sizes and O_DIRECT with libaio.
* a model checker: random writes, reads, truncates, fsyncs, reopens and
  write-back checks on a few files, each compared byte for byte against an
  in-memory model (reads through the mount; after ``alignfs flush`` also the
  files on BACKING).

A monitor samples the daemon's RSS. At the end the mount is unmounted with
``alignfs umount`` (its exit status must be 0) and the model's files on
BACKING are checked once more. The summary gives operations done, bytes
verified, errors, peak daemon RSS (VmHWM) and peak dirty bytes; the exit
status is 0 only if there was no error (1 otherwise, 2 for bad usage).

Every client process runs under a timeout, so a hung request is reported as
an error instead of hanging the soak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's alignfs, the one the mount runs

from alignfs.mounts import is_mountpoint  # noqa: E402
from alignfs.processes import proc_status, source_env  # noqa: E402

MiB = 1 << 20
#: A single client command that takes longer than this is reported as hung.
CLIENT_TIMEOUT = 180


def alignfs(*args: str, timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alignfs", *args], env=source_env(),
                          capture_output=True, text=True, timeout=timeout)


def run(cmd: list[str], cwd: Path, timeout: float = CLIENT_TIMEOUT) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


class Soak:
    def __init__(self, mountpoint: Path, backing: Path, scratch: Path, deadline: float,
                 seed: int) -> None:
        self.mp = mountpoint
        self.backing = backing
        self.scratch = scratch
        self.deadline = deadline
        self.seed = seed
        self.lock = threading.Lock()
        self.ops: dict[str, int] = {}
        self.verified = 0
        self.errors: list[str] = []
        self.pid = 0
        self.rss_samples: list[int] = []
        self.stop = threading.Event()

    # -- bookkeeping -----------------------------------------------------------

    def count(self, what: str, verified: int = 0) -> None:
        with self.lock:
            self.ops[what] = self.ops.get(what, 0) + 1
            self.verified += verified

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)
        print(f"soak: ERROR {message}", file=sys.stderr, flush=True)

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.stop.is_set()

    def guarded(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        def loop() -> None:
            try:
                while self.running():
                    body()
            except subprocess.TimeoutExpired as exc:
                self.error(f"{name}: {shlex.join(map(str, exc.cmd))} hung "
                           f"(no exit after {exc.timeout}s)")
            except Exception as exc:  # every failure is a soak error
                self.error(f"{name}: {exc!r}")
        return loop

    def client(self, name: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        res = run(cmd, cwd=self.scratch)  # fio leaves state files in its cwd
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {res.returncode}: "
                               f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    # -- qemu-img --------------------------------------------------------------

    def qemu_img(self) -> None:
        size = 32 * MiB
        src = self.scratch / "src.raw"
        with open(src, "wb") as f:
            f.write(random.Random(self.seed + self.ops.get("qemu-img convert", 0))
                    .randbytes(size))
        img = self.mp / "vm.qcow2"
        self.client("qemu-img", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                                 "-t", "none", str(src), str(img)])
        self.count("qemu-img convert")
        res = self.client("qemu-img", ["qemu-img", "compare", "-T", "none", "-f", "raw",
                                       "-F", "qcow2", str(src), str(img)])
        if "identical" not in res.stdout:
            raise RuntimeError(f"qemu-img compare: {res.stdout.strip()}")
        self.count("qemu-img compare", size)
        if not self.running():
            return
        pattern = random.Random().randrange(1, 256)
        self.client("qemu-img", ["qemu-img", "bench", "-w", "-t", "none", "-f", "qcow2",
                                 "-c", "1024", "-s", "65536", "-d", "8",
                                 f"--pattern={pattern}", str(img)])
        self.count("qemu-img bench")
        out = self.scratch / "back.raw"
        self.client("qemu-img", ["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                                 "-T", "none", str(img), str(out)])
        data = out.read_bytes()
        # 1024 writes of 64 KiB from offset 0 cover the whole 32 MiB image twice.
        if len(data) != size or data.count(pattern) != size:
            bad = next((i for i, b in enumerate(data) if b != pattern), len(data))
            raise RuntimeError(f"qemu-img bench pattern {pattern:#x}: byte {bad} differs "
                               f"(size {len(data)})")
        self.count("qemu-img bench verify", size)
        out.unlink()

    # -- fio -------------------------------------------------------------------

    def fio(self) -> None:
        n = self.ops.get("fio", 0)
        common = ["fio", "--name=soak", f"--filename={self.mp / 'fio.dat'}", "--size=32M",
                  "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0",
                  "--verify_state_save=0",
                  "--output-format=json"]
        if n % 2 == 0:
            cmd = common + ["--rw=randwrite", "--bsrange=1k-130k", "--bs_unaligned=1",
                            "--ioengine=psync"]
        else:
            cmd = common + ["--rw=randwrite", "--bs=16k", "--direct=1", "--ioengine=libaio",
                            "--iodepth=8"]
        res = self.client("fio", cmd)
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio error {job['error']}")
        self.count("fio", job["read"]["io_bytes"])

    # -- the model checker -----------------------------------------------------

    def model(self) -> None:
        rng = random.Random(self.seed)
        names = [f"model-{i}" for i in range(3)]
        models = {name: bytearray() for name in names}
        fds: dict[str, int] = {}
        limit = 6 * MiB

        def check(name: str, off: int, got: bytes) -> None:
            want = bytes(models[name][off:off + len(got)])
            if got != want:
                bad = next(i for i in range(len(got)) if got[i:i + 1] != want[i:i + 1])
                raise RuntimeError(f"{name}: byte {off + bad} reads {got[bad:bad + 8]!r}, "
                                   f"model has {want[bad:bad + 8]!r}")

        try:
            for name in names:
                fds[name] = os.open(self.mp / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            while self.running():
                name = rng.choice(names)
                fd, model = fds[name], models[name]
                op = rng.choices(["write", "read", "truncate", "fsync", "reopen", "backing"],
                                 [50, 30, 5, 6, 5, 2])[0]
                if op == "write":
                    off = rng.randrange(limit)
                    data = rng.randbytes(rng.choice([rng.randint(1, 4096),
                                                     rng.randint(1, 300 * 1024)]))
                    done = 0
                    while done < len(data):
                        done += os.pwrite(fd, data[done:], off + done)
                    if off > len(model):
                        model.extend(bytes(off - len(model)))
                    model[off:off + len(data)] = data
                elif op == "read":
                    off = rng.randrange(len(model) + 4096)
                    size = rng.randint(1, 512 * 1024)
                    got = os.pread(fd, size, off)
                    if len(got) != len(model[off:off + size]):
                        raise RuntimeError(f"{name}: read of {size} at {off} returned "
                                           f"{len(got)} bytes, model size {len(model)}")
                    check(name, off, got)
                    self.count("model read", len(got))
                    continue
                elif op == "truncate":
                    size = rng.randrange(limit)
                    os.ftruncate(fd, size)
                    if size < len(model):
                        del model[size:]
                    else:
                        model.extend(bytes(size - len(model)))
                elif op == "fsync":
                    os.fsync(fd)
                elif op == "reopen":
                    os.close(fd)
                    fds[name] = os.open(self.mp / name, os.O_RDWR)
                    size = os.fstat(fds[name]).st_size
                    if size != len(model):
                        raise RuntimeError(f"{name}: size {size} after reopen, model {len(model)}")
                elif op == "backing":
                    for n in names:
                        os.fsync(fds[n])
                    for n in names:
                        on_disk = (self.backing / n).read_bytes()
                        if len(on_disk) != len(models[n]):
                            raise RuntimeError(f"{n}: BACKING size {len(on_disk)} after fsync, "
                                               f"model {len(models[n])}")
                        check(n, 0, on_disk)
                        self.count("model backing check", len(on_disk))
                self.count(f"model {op}")
        finally:
            for fd in fds.values():
                os.close(fd)
        # Kept for the final check on BACKING after unmount.
        self.final_models = {name: bytes(m) for name, m in models.items()}

    # -- monitoring ------------------------------------------------------------

    def monitor(self) -> None:
        while not self.stop.wait(0.5):  # a sampling period, not synchronisation
            try:
                self.rss_samples.append(proc_status(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def vm_hwm(self) -> int:
        try:
            return proc_status(self.pid, "VmHWM")
        except KeyError:
            return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--dir", type=Path, default=None, help="where to put the temp directory")
    p.add_argument("--mount-options", default="--buffer-size 1M --max-dirty 16M "
                   "--flush-delay 0.5", help="options for alignfs mount (default: small "
                   "buffers and a short flush delay, to exercise pressure and aging)")
    p.add_argument("--seed", type=int, default=None, help="model checker seed (default random)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    ns = p.parse_args(argv)
    for tool in ("qemu-img", "fio"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} is not installed", file=sys.stderr)
            return 2
    seed = ns.seed if ns.seed is not None else random.randrange(1 << 30)
    base = Path(tempfile.mkdtemp(prefix="alignfs-soak-", dir=ns.dir))
    mp, backing, scratch = base / "mnt", base / "backing", base / "scratch"
    for d in (mp, backing, scratch):
        d.mkdir()
    log = base / "daemon.log"
    res = alignfs("mount", str(mp), str(backing), "--log", str(log),
                  *shlex.split(ns.mount_options))
    if res.returncode != 0:
        print(f"soak: mount failed ({res.returncode}): {res.stderr.strip()}", file=sys.stderr)
        return 1
    started = time.monotonic()
    soak = Soak(mp, backing, scratch, started + ns.minutes * 60, seed)
    summary: dict[str, object] = {}
    try:
        stats = json.loads(alignfs("stats", str(mp), "--json").stdout)
        soak.pid = int(stats["pid"])
        monitor = threading.Thread(target=soak.monitor, daemon=True)
        monitor.start()
        workers = [threading.Thread(target=soak.guarded(name, body), name=name)
                   for name, body in (("qemu-img", soak.qemu_img), ("fio", soak.fio),
                                      ("model", soak.model))]
        for t in workers:
            t.start()
        for t in workers:
            # Each client run is bounded by CLIENT_TIMEOUT; the model's requests by the
            # same margin (a hung one is reported here and the daemon is killed below).
            t.join(ns.minutes * 60 + 3 * CLIENT_TIMEOUT)
            if t.is_alive():
                soak.error(f"{t.name}: still running long after the deadline (hung request?)")
        soak.stop.set()
        stats = json.loads(alignfs("stats", str(mp), "--json").stdout)
        peak_rss = soak.vm_hwm()
        res = alignfs("umount", str(mp))
        if res.returncode != 0:
            soak.error(f"alignfs umount exited {res.returncode}: {res.stderr.strip()}")
        for name, model in getattr(soak, "final_models", {}).items():
            on_disk = (backing / name).read_bytes()
            if on_disk != model:
                soak.error(f"{name}: BACKING differs from the model after unmount")
            else:
                soak.count("model final check", len(on_disk))
        if log.exists() and "Traceback" in log.read_text(errors="replace"):
            soak.error(f"the daemon logged a traceback (see {log})")
        summary = {
            "seconds": round(time.monotonic() - started, 1),
            "seed": seed,
            "operations": dict(sorted(soak.ops.items())),
            "operations_total": sum(soak.ops.values()),
            "bytes_verified": soak.verified,
            "errors": soak.errors,
            "peak_daemon_rss_bytes": peak_rss,
            "max_sampled_rss_bytes": max(soak.rss_samples, default=0),
            "peak_dirty_bytes": stats["peak_dirty_bytes"],
            "backing_errors": stats["backing_errors"],
            "write_bytes": stats["write_bytes"],
            "backing_writes": stats["backing_writes"],
            "mount_options": ns.mount_options,
        }
    except Exception as exc:
        soak.error(f"soak harness: {exc!r}")
    finally:
        soak.stop.set()
        if is_mountpoint(mp):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
            if soak.pid:
                try:
                    os.kill(soak.pid, 9)
                except ProcessLookupError:
                    pass
        if not ns.keep and not soak.errors:
            shutil.rmtree(base, ignore_errors=True)
    summary["errors"] = soak.errors
    if ns.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"alignfs soak: {summary.get('seconds')} s, seed {seed}, "
              f"mount options: {ns.mount_options}")
        for name, n in summary.get("operations", {}).items():  # type: ignore[union-attr]
            print(f"  {name:28s} {n}")
        print(f"  {'operations':28s} {summary.get('operations_total')}")
        print(f"  {'bytes verified':28s} {summary.get('bytes_verified')}")
        print(f"  {'peak daemon RSS':28s} {summary.get('peak_daemon_rss_bytes', 0) / MiB:.1f} MiB")
        print(f"  {'peak dirty':28s} {summary.get('peak_dirty_bytes', 0) / MiB:.1f} MiB")
        print(f"  {'errors':28s} {len(soak.errors)}")
        for e in soak.errors:
            print(f"    {e}")
        if soak.errors:
            print(f"  kept {base} for inspection")
    return 1 if soak.errors else 0


if __name__ == "__main__":
    sys.exit(main())
