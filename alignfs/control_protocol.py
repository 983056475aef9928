"""The names the control file's two sides agree on, and nothing else.

The daemon's side (:mod:`alignfs.control`) needs pyfuse3, which imports trio;
the commands' side (:mod:`alignfs.control_client`: ``alignfs stats``,
``flush``, ``umount``) only needs these names, so it imports them from here
and starts without either.
"""

from __future__ import annotations

CONTROL_NAME = b".alignfs-control"
XATTR_STATS = b"user.alignfs.stats"
XATTR_FLUSH = b"user.alignfs.flush"
XATTR_UMOUNT = b"user.alignfs.umount"
#: The same commands written to the file (when xattrs are off).
FILE_FLUSH = b"flush"
FILE_UMOUNT = b"umount"
FILE_COMMANDS = {XATTR_FLUSH: FILE_FLUSH, XATTR_UMOUNT: FILE_UMOUNT}
