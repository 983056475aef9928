"""The inode table: FUSE inode numbers <-> backing files.

Each known inode holds an ``O_PATH`` descriptor of its backing file, so every
operation is done relative to a descriptor (``*at`` calls, or a reopen of
``/proc/self/fd/N``) and never by path: nothing can escape BACKING through
``..`` or symlinks, and renames done directly in BACKING do not confuse the
table. Inodes are keyed by the backing ``(st_dev, st_ino)``; holding the
descriptor keeps the backing inode alive, so its number cannot be reused for
another file while the kernel still knows ours. Hard links are one inode.

FUSE inode numbers are the backing inode numbers where that is unambiguous
(same device as the root), so ``ls -i`` agrees with BACKING; files on other
devices get synthetic numbers above 2**62.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyfuse3

SYNTHETIC_BASE = 1 << 62

#: Inode.capability before the backing file's has been read.
UNKNOWN = object()


@dataclass
class Inode:
    ino: int
    #: O_PATH | O_NOFOLLOW descriptor of the backing file.
    fd: int
    key: tuple[int, int]
    mode: int
    lookups: int = 0
    #: Last name seen for this inode (for log messages) and the directory it was
    #: seen in: the only way to reach a symlink's own extended attributes.
    name: str = ""
    parent: int = 0
    raw_name: bytes = b""
    #: The backing file's ``security.capability``: its value, None if it has
    #: none, or UNKNOWN until read. The kernel asks for it before every
    #: write(2) (file_remove_privs), so it is answered from here; every change
    #: through the mount (setxattr, removexattr, chown, create) forgets it.
    capability: bytes | None | object = UNKNOWN
    #: Bumped by every such change: a read that started before one is not kept.
    capability_gen: int = 0

    def forget_capability(self) -> None:
        """An xattr, the owner or the file itself changed: read the capability again."""
        self.capability = UNKNOWN
        self.capability_gen += 1

    @property
    def proc_path(self) -> str:
        """A path that reopens exactly this inode (not a symlink's target)."""
        return f"/proc/self/fd/{self.fd}"


class InodeTable:
    """The known inodes by FUSE number and by backing (st_dev, st_ino).

    :meth:`remember` counts a kernel lookup (adopting the O_PATH descriptor
    of a new file), :meth:`forget` drops lookups and hands back the
    descriptor to close when the kernel knows the inode no more. The root is
    never forgotten.
    """

    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        self.root = Inode(pyfuse3.ROOT_INODE, root_fd, (st.st_dev, st.st_ino), st.st_mode,
                          lookups=1, name="/")
        self._by_ino: dict[int, Inode] = {self.root.ino: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._next_synthetic = SYNTHETIC_BASE

    def __getitem__(self, ino: int) -> Inode:
        return self._by_ino[ino]

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def __len__(self) -> int:
        return len(self._by_ino)

    def _number_for(self, st: os.stat_result) -> int:
        ino = st.st_ino
        if st.st_dev == self.root_dev and ino != pyfuse3.ROOT_INODE and ino < SYNTHETIC_BASE \
                and ino not in self._by_ino:
            return ino
        self._next_synthetic += 1
        return self._next_synthetic

    def number_of(self, st: os.stat_result) -> int:
        """The FUSE inode number of a known file, else its backing number (for "..")."""
        inode = self._by_key.get((st.st_dev, st.st_ino))
        return inode.ino if inode is not None else st.st_ino

    def remember(self, fd: int, st: os.stat_result, name: bytes,
                 parent: int = 0) -> tuple[Inode, bool]:
        """Count one more kernel reference to the file behind *fd*.

        Returns the inode and whether *fd* was adopted; if the inode was already
        known, *fd* is not adopted and the caller must close it.
        """
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        adopted = inode is None
        if inode is None:
            inode = Inode(self._number_for(st), fd, key, st.st_mode)
            self._by_key[key] = inode
            self._by_ino[inode.ino] = inode
        inode.lookups += 1
        if name and name not in (b".", b".."):
            inode.name = os.fsdecode(name)
            inode.raw_name = name
            inode.parent = parent
        return inode, adopted

    def forget(self, ino: int, n: int) -> int | None:
        """Drop *n* kernel references; return the O_PATH fd to close if it was the last."""
        inode = self._by_ino.get(ino)
        if inode is None or inode is self.root:
            return None
        inode.lookups -= n
        if inode.lookups > 0:
            return None
        del self._by_ino[ino]
        del self._by_key[inode.key]
        return inode.fd
