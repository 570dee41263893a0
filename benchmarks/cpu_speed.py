"""CPU speed benchmark: see editreward_bench.cpu_speed (``python benchmarks/cpu_speed.py --help``)."""

import sys

from editreward_bench.cpu_speed import main

if __name__ == "__main__":
    sys.exit(main())
