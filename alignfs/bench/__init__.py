"""``alignfs bench``: measure clients writing (or reading) directly vs. through alignfs.

The harness builds a throttled HDD model (zram + ext4 + cgroup v1 blkio
limits, default 200 IOPS and 150 MiB/s each way), then runs real clients --
qemu ``savevm``, ``qemu-img bench``, fio -- once against a directory on the
model and once through a fresh alignfs mount of that directory, alternating
and repeated, and prints the medians.  Needs root.  The read scenarios
(``loadvm``, ``qemu-img-read``, ``fio-read-4k``, ``fio-randread-4k``) run only
when named in ``--scenarios``; their input files are written unthrottled and
their umount time is recorded but not counted (nothing to make durable).  So
do the buffered producers (``dd-4k``, ``dd-64k``, ``cp``, ``qemu-img-convert``,
``dd-4k-xattr-off``), which write through the page cache.

Examples::

    alignfs bench --demo                      # ~5 min: 512M savevm + qemu-img bench,
                                              # writes its result and picture (.json, .png)
    alignfs bench                             # every write scenario, 3 repeats (~30 min)
    alignfs bench --scenarios savevm --ram 256M --repeat 1 --verify-loadvm
    alignfs bench --scenarios fio-4k,fio-1m --json-file out.json
    alignfs bench --scenarios loadvm,qemu-img-read,fio-read-4k,fio-randread-4k --repeat 1
    alignfs bench --scenarios dd-4k,dd-64k,cp,qemu-img-convert,dd-4k-xattr-off
    alignfs bench --render out.json           # print a saved result again
    alignfs bench --render out.json --plot bench.png   # ... and draw its picture (or .svg)
    alignfs bench --dir /mnt/hdd --no-throttle  # a real disk instead of the model

Entry point: :func:`main` (``alignfs bench ...`` or ``python -m alignfs.bench``).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
