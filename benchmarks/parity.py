"""Parity benchmark: see editreward_bench.parity_bench (``python benchmarks/parity.py --help``)."""

import sys

from editreward_bench.parity_bench import main

if __name__ == "__main__":
    sys.exit(main())
