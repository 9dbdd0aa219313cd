"""``python -m cachedata``: the command line (see ``python -m cachedata --help``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m cachedata"))
