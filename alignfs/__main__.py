"""``python -m alignfs`` is the ``alignfs`` command."""

import sys

from .cli import main

sys.exit(main())
