"""``python -m bench``: run the benchmarks and write docs/performance.md."""

import sys

from bench._cli import main

sys.exit(main())
