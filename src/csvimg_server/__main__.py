"""``python -m csvimg_server``: the same as the ``csvimg`` command."""

from __future__ import annotations

import sys

from csvimg_server.cli import main

if __name__ == "__main__":
    sys.exit(main())
