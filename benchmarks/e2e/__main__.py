"""`python -m benchmarks.e2e`: see benchmarks/e2e/__init__.py."""

import sys

from benchmarks.e2e.cli import main

sys.exit(main())
