"""Seconds per triple and stage split of a full-size exported model on this CPU (``python benchmarks/full_cpu.py --help``; the code is ``editreward_bench.full_cpu``)."""

import sys

from editreward_bench.full_cpu import main

if __name__ == "__main__":
    sys.exit(main())
