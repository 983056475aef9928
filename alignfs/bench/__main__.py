"""``python -m alignfs.bench``: run the benchmark with the process' arguments."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
