"""Latency benchmark: see editreward_bench.latency (``python benchmarks/latency.py --help``)."""

import sys

from editreward_bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
