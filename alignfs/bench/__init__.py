"""``alignfs bench``: measure clients writing directly vs. through alignfs.

The harness builds a throttled HDD model (zram + ext4 + cgroup v1 blkio
limits), then runs real clients -- qemu ``savevm``, ``qemu-img bench``, fio --
once against a directory on the model and once through a fresh alignfs mount
of that directory, alternating and repeated, and prints the medians.

Entry point: :func:`main` (``alignfs bench ...`` or ``python -m alignfs.bench``).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
